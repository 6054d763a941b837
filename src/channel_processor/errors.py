"""The processor's error tree; the pipeline decides retry vs fail from the class alone.

ProcessorError
├── RetryableError               transient: release the lease, let SQS redeliver
│   ├── StoreUnavailable         DynamoDB/SQLite throttled, timed out, unreachable
│   ├── SecretsUnavailable       Secrets Manager throttled or unreachable
│   ├── ComposerUnavailable      OpenAI 429/5xx/timeout (not insufficient_quota)
│   ├── SendThrottled            Twilio said 429 before accepting: nothing was sent
│   ├── LeaseLost                heartbeat lost the receipt handle / lease taken over
│   └── LookupUnavailable        Twilio message lookup failed: cannot tell if sent
├── PermanentError               never retried; carries the record's failed_* status
│   ├── InvalidInput             failed_invalid_input (problems: list of JSON-path messages)
│   ├── NoConsent                failed_no_consent
│   ├── SecretInvalid            failed_secrets_fetch (missing secret, not JSON, missing key)
│   ├── ComposeFailed            failed_to_process_ai (quota, schema broken after re-asks)
│   └── SendRejected             failed_to_send_message (Twilio 4xx other than 429)
├── SendOutcomeUnknown           Twilio may have accepted it (timeout, 5xx, reset): never resend
├── ConfigurationError           bad settings; raised at start-up, not per message
└── StateConflict                "already done / not mine": a conditional write lost the race
    └── RecordExists             create found a record; carries it so no extra read is needed
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channel_processor.domain import Status

if TYPE_CHECKING:
    from channel_processor.domain import ConversationRecord


class ProcessorError(Exception):
    """Root of every error the processor raises on purpose."""


class RetryableError(ProcessorError):
    """Transient: the same delivery may succeed later."""


class StoreUnavailable(RetryableError):
    pass


class SecretsUnavailable(RetryableError):
    pass


class ComposerUnavailable(RetryableError):
    pass


class SendThrottled(RetryableError):
    """Twilio refused before accepting (HTTP 429 / code 20429): nothing was sent."""


class LeaseLost(RetryableError):
    pass


class LookupUnavailable(RetryableError):
    """The provider could not be asked whether a message exists."""


class PermanentError(ProcessorError):
    """Retrying cannot help; the record gets ``status`` with ``code`` and the message as reason."""

    status: Status = Status.FAILED_UNKNOWN

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or type(self).__name__

    @property
    def reason(self) -> str:
        return str(self)


class InvalidInput(PermanentError):
    status = Status.FAILED_INVALID_INPUT

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems), code="invalid_input")


class NoConsent(PermanentError):
    status = Status.FAILED_NO_CONSENT


class SecretInvalid(PermanentError):
    status = Status.FAILED_SECRETS_FETCH


class ComposeFailed(PermanentError):
    status = Status.FAILED_TO_PROCESS_AI


class SendRejected(PermanentError):
    status = Status.FAILED_TO_SEND_MESSAGE


class SendOutcomeUnknown(ProcessorError):
    """The request may have reached Twilio: the message may or may not exist."""


class ConfigurationError(ProcessorError):
    pass


class StateConflict(ProcessorError):
    """A conditional write found the record in another state than expected."""


class RecordExists(StateConflict):
    def __init__(self, existing: ConversationRecord) -> None:
        super().__init__(f"record {existing.conversation_id!r} already exists")
        self.existing = existing
