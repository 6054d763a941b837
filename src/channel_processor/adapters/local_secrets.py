"""``SecretSource`` over the secrets section of the local configuration file (embedded default)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from channel_processor.errors import SecretInvalid


class LocalSecretSource:
    """A value that is an object is returned as its JSON text, as Secrets Manager would store it."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def get(self, name: str) -> str:
        value = self._values.get(name)
        if value is None:
            raise SecretInvalid(
                f"secret {name!r} is not in the local configuration", code="secret_not_found"
            )
        if isinstance(value, str):
            return value
        return json.dumps(value)
