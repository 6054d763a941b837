"""``FakeSecretSource``: values from a dict, optionally scripted per call, gets counted per name."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

from channel_processor.errors import SecretInvalid

# Called before the lookup: return a value to use instead, None to use ``values``, or raise.
SecretScript = Callable[[str, int], "str | None"]


class FakeSecretSource:
    def __init__(self, values: Mapping[str, Any], script: SecretScript | None = None) -> None:
        self.values = dict(values)
        self.script = script
        self.gets: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get(self, name: str) -> str:
        with self._lock:
            self.gets[name] += 1
            call_number = self.gets[name]
        if self.script is not None:
            scripted = self.script(name, call_number)
            if scripted is not None:
                return scripted
        value = self.values.get(name)
        if value is None:
            raise SecretInvalid(f"secret {name!r} does not exist", code="secret_not_found")
        return value if isinstance(value, str) else json.dumps(value)
