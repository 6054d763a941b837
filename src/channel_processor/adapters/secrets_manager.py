"""``SecretSource`` on AWS Secrets Manager; boto errors become ours in one table, and no message
this module writes ever holds a secret's value."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from channel_processor.errors import (
    ProcessorError,
    SecretInvalid,
    SecretsUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_secretsmanager import SecretsManagerClient

logger = logging.getLogger(__name__)

_PERMANENT = "permanent"
_TRANSIENT = "transient"

# Error code of a ClientError -> (kind, our code). The codes GetSecretValue declares, plus the
# ones every AWS API can answer with.
CLIENT_ERRORS: Mapping[str, tuple[str, str]] = {
    "ResourceNotFoundException": (_PERMANENT, "secret_not_found"),
    # GetSecretValue answers InvalidRequestException for a secret scheduled for deletion.
    "InvalidRequestException": (_PERMANENT, "secret_deleted_or_invalid"),
    "InvalidParameterException": (_PERMANENT, "secret_invalid_parameter"),
    # The KMS key is gone or the role may not use it: a fix is needed, a retry will not do.
    "DecryptionFailure": (_PERMANENT, "secret_decryption_failed"),
    "AccessDeniedException": (_PERMANENT, "secret_access_denied"),
    "InternalServiceError": (_TRANSIENT, "secrets_internal_error"),
    "ThrottlingException": (_TRANSIENT, "secrets_throttled"),
    "Throttling": (_TRANSIENT, "secrets_throttled"),
    "TooManyRequestsException": (_TRANSIENT, "secrets_throttled"),
    "RequestLimitExceeded": (_TRANSIENT, "secrets_throttled"),
    "ServiceUnavailable": (_TRANSIENT, "secrets_unavailable"),
    "ServiceUnavailableException": (_TRANSIENT, "secrets_unavailable"),
    "RequestTimeout": (_TRANSIENT, "secrets_timeout"),
    "RequestTimeoutException": (_TRANSIENT, "secrets_timeout"),
    # Credentials of the Lambda role that expired mid-flight are refreshed on the next attempt.
    "ExpiredTokenException": (_TRANSIENT, "aws_credentials_expired"),
}

# botocore's own errors (no HTTP answer): a bad name is permanent; connection failures, timeouts
# and credential lookups are transient, and so is anything else botocore raises.
# (NoRegionError included: a deployment problem, so messages wait in the queue until it is fixed.)
BOTOCORE_PERMANENT: tuple[type[BotoCoreError], ...] = (ParamValidationError,)


def translate_error(exc: ClientError | BotoCoreError, name: str) -> ProcessorError:
    """The one place boto exceptions become ours; messages name the secret, never its value."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code") or "")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        kind, our_code = CLIENT_ERRORS.get(code, (_TRANSIENT if status >= 500 else _PERMANENT, ""))
        message = f"Secrets Manager {code or status} for secret {name!r}"
        if kind == _TRANSIENT:
            return SecretsUnavailable(message)
        return SecretInvalid(message, code=our_code or f"secrets_{code or status}")
    if isinstance(exc, BOTOCORE_PERMANENT):
        return SecretInvalid(
            f"secret name {name!r} was refused by the SDK: {type(exc).__name__}",
            code="secret_invalid_parameter",
        )
    return SecretsUnavailable(
        f"Secrets Manager unreachable for secret {name!r}: {type(exc).__name__}"
    )


class SecretsManagerSource:
    """``get`` is one GetSecretValue call; caching is ``CachedSecretSource``'s job."""

    def __init__(self, client: SecretsManagerClient) -> None:
        self._client = client

    def get(self, name: str) -> str:
        try:
            answer = self._client.get_secret_value(SecretId=name)
        except (ClientError, BotoCoreError) as exc:
            error = translate_error(exc, name)
            logger.warning(
                "secret fetch failed",
                extra={"secret_name": name, "error": type(error).__name__},
            )
            raise error from exc
        text = answer.get("SecretString")
        if text is not None:
            return text
        binary = answer.get("SecretBinary")
        if binary is None:
            raise SecretInvalid(f"secret {name!r} has no value", code="secret_empty")
        try:
            return bytes(binary).decode("utf-8")
        except UnicodeDecodeError:
            raise SecretInvalid(
                f"secret {name!r} is binary and not UTF-8 text", code="secret_not_text"
            ) from None
