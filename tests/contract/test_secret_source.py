"""Contract of the ``SecretSource`` port, held by the fake, the local and the Secrets Manager
source (on the moto server), plus the Secrets Manager error table."""

from __future__ import annotations

import json
import socket
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from botocore.stub import Stubber

from channel_processor.adapters.local_secrets import LocalSecretSource
from channel_processor.adapters.secrets_manager import (
    CLIENT_ERRORS,
    SecretsManagerSource,
    translate_error,
)
from channel_processor.domain import Status
from channel_processor.errors import SecretInvalid, SecretsUnavailable
from channel_processor.ports import SecretSource
from tests.fakes.secrets import FakeSecretSource

TWILIO_SECRET = {
    "twilio_account_sid": "AC00000000000000000000000000000001",
    "twilio_auth_token": "token-that-must-stay-secret",
    "twilio_template_sid": "HX00000000000000000000000000000001",
}

# Builds a source holding these secrets: name -> JSON object or string.
SourceFactory = Callable[[dict[str, Any]], SecretSource]


def _sm_client(endpoint: str, **config: Any) -> Any:
    return boto3.client(
        "secretsmanager",
        region_name="us-east-1",
        endpoint_url=endpoint,
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, **config),
    )


@pytest.fixture(params=["fake", "local", "secrets_manager"])
def make_source(request: pytest.FixtureRequest) -> Iterator[SourceFactory]:
    if request.param == "fake":
        yield lambda values: FakeSecretSource(values)
    elif request.param == "local":
        yield lambda values: LocalSecretSource(values)
    else:
        client = _sm_client(request.getfixturevalue("moto_endpoint"))

        def build(values: dict[str, Any]) -> SecretSource:
            for name, value in values.items():
                text = value if isinstance(value, str) else json.dumps(value)
                client.create_secret(Name=name, SecretString=text)
            return SecretsManagerSource(client)

        yield build


def unique(name: str) -> str:
    # The moto server is shared by the session: unique names keep tests independent of each other.
    return f"{name}-{uuid.uuid4().hex[:8]}"


# --- every source ---


def test_a_json_secret_comes_back_as_its_json_text(make_source: SourceFactory) -> None:
    # given a secret stored as a JSON object
    name = unique("twilio/company-a")
    source = make_source({name: TWILIO_SECRET})

    # when reading it
    value = source.get(name)

    # then the text parses back to the same object
    assert json.loads(value) == TWILIO_SECRET


def test_a_string_secret_comes_back_unchanged(make_source: SourceFactory) -> None:
    name = unique("openai/company-a")
    source = make_source({name: "sk-bare-key"})

    assert source.get(name) == "sk-bare-key"


def test_a_missing_secret_is_invalid_and_named(make_source: SourceFactory) -> None:
    # given a source without the secret asked for
    present = unique("present")
    source = make_source({present: "x"})
    missing = unique("missing")

    # when reading it, then it is a permanent, named failure with the secrets status
    with pytest.raises(SecretInvalid) as caught:
        source.get(missing)
    assert missing in str(caught.value)
    assert caught.value.status is Status.FAILED_SECRETS_FETCH


# --- Secrets Manager specifics ---


def test_secrets_manager_binary_secret_is_decoded_as_utf8(moto_endpoint: str) -> None:
    # given a secret stored as binary
    client = _sm_client(moto_endpoint)
    name = unique("binary")
    client.create_secret(Name=name, SecretBinary=json.dumps({"ai_api_key": "sk-ü"}).encode())

    # when reading it, then it is its UTF-8 text
    assert json.loads(SecretsManagerSource(client).get(name)) == {"ai_api_key": "sk-ü"}


def test_secrets_manager_secret_scheduled_for_deletion_is_invalid(moto_endpoint: str) -> None:
    # given a secret deleted with a recovery window (GetSecretValue answers InvalidRequest)
    client = _sm_client(moto_endpoint)
    name = unique("deleted")
    client.create_secret(Name=name, SecretString="value-never-shown")
    client.delete_secret(SecretId=name, RecoveryWindowInDays=7)

    # when reading it, then it is permanent, named, and the value is not in the message
    with pytest.raises(SecretInvalid) as caught:
        SecretsManagerSource(client).get(name)
    assert name in str(caught.value)
    assert caught.value.code == "secret_deleted_or_invalid"
    assert "value-never-shown" not in str(caught.value)


def test_secrets_manager_unreachable_is_retryable() -> None:
    # given an endpoint where nothing listens
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = _sm_client(f"http://127.0.0.1:{port}", connect_timeout=1, read_timeout=1)

    # when reading, then it is transient
    with pytest.raises(SecretsUnavailable):
        SecretsManagerSource(client).get("any-name")


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("ResourceNotFoundException", 400, SecretInvalid),
        ("DecryptionFailure", 400, SecretInvalid),
        ("InvalidRequestException", 400, SecretInvalid),
        ("AccessDeniedException", 400, SecretInvalid),
        ("ThrottlingException", 400, SecretsUnavailable),
        ("InternalServiceError", 500, SecretsUnavailable),
        ("SomethingNewAndServerSide", 503, SecretsUnavailable),
    ],
)
def test_secrets_manager_error_codes_map_to_our_errors(
    code: str, status: int, expected: type[Exception]
) -> None:
    # given Secrets Manager answering with this error (botocore's own Stubber, no network)
    client = boto3.client("secretsmanager", region_name="us-east-1")
    source = SecretsManagerSource(client)
    with Stubber(client) as stub:
        stub.add_client_error("get_secret_value", service_error_code=code, http_status_code=status)
        # when reading, then it becomes our error, naming the secret
        with pytest.raises(expected) as caught:
            source.get("company-a/twilio")
    assert "company-a/twilio" in str(caught.value)


def test_error_table_covers_every_error_get_secret_value_declares() -> None:
    # given the errors the service model declares for GetSecretValue, plus AWS-wide throttling
    client = boto3.client("secretsmanager", region_name="us-east-1")
    declared = {
        s.name for s in client.meta.service_model.operation_model("GetSecretValue").error_shapes
    }

    # then each has an explicit entry (not the status-code fallback)
    assert declared | {"ThrottlingException", "AccessDeniedException"} <= set(CLIENT_ERRORS)


def test_every_botocore_error_becomes_one_of_ours() -> None:
    # given every BotoCoreError subclass botocore defines
    import botocore.exceptions as boto_errors

    classes = [
        c
        for c in vars(boto_errors).values()
        if isinstance(c, type) and issubclass(c, BotoCoreError)
    ]
    assert len(classes) > 20
    for cls in classes:
        # (botocore's constructors format their message from kwargs; bypass for the test)
        exc = cls.__new__(cls)
        translated = translate_error(exc, "name")
        assert isinstance(translated, SecretInvalid | SecretsUnavailable), cls.__name__


def test_client_error_without_known_code_is_decided_by_http_status() -> None:
    def client_error(code: str, status: int) -> ClientError:
        return ClientError(
            {
                "Error": {"Code": code, "Message": "m"},
                "ResponseMetadata": {"HTTPStatusCode": status},
            },
            "GetSecretValue",
        )

    assert isinstance(translate_error(client_error("Brand", 400), "n"), SecretInvalid)
    assert isinstance(translate_error(client_error("Brand", 502), "n"), SecretsUnavailable)
