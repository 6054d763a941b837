"""WhatsApp channel processor: Context Object in, WhatsApp template out, conversation record written."""

__version__ = "0.1.0"
