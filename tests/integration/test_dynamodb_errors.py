"""How the DynamoDB store and the SQS adapters translate their SDK's failures, driven through real
boto3 clients: against a tiny local HTTP server that answers with AWS error bodies, and moto."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from channel_processor.adapters import dynamodb_store, sqs
from channel_processor.adapters.dynamodb_store import DynamoDBConversationStore, table_definition
from channel_processor.adapters.sqs import SQSDeadLetters, SQSRepairLog, SQSVisibilityExtender
from channel_processor.domain import Expect, PendingFinalUpdate, RecordKey, Status
from channel_processor.errors import (
    LeaseLost,
    RecordExists,
    StateConflict,
    StoreUnavailable,
)

KEY = RecordKey("+12025550123", "co-1#pr-1#req-1#447700900123")
ITEM = {
    "primary_channel": KEY.primary_channel,
    "conversation_id": KEY.conversation_id,
    "conversation_status": "processing",
    "updated_at": "2025-03-01T09:00:00.000Z",
}
FAST = Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=1, read_timeout=1)


# -- a local AWS-shaped HTTP server -----------------------------------------------------------

# reply(operation, request_body) -> (HTTP status, response JSON, extra headers); None: hang up.
Reply = Callable[[str, dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]


@dataclass
class FakeAWS:
    url: str
    reply: Reply
    operations: list[str] = field(default_factory=list)
    delay_seconds: float = 0.0


@pytest.fixture()
def fake_aws() -> Iterator[FakeAWS]:
    state = FakeAWS(url="", reply=lambda op, body: (200, {}, {}))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
            operation = self.headers.get("X-Amz-Target", "").rsplit(".", 1)[-1]
            state.operations.append(operation)
            if state.delay_seconds:
                time.sleep(state.delay_seconds)
            status, payload, headers = state.reply(operation, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-amz-json-1.0")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def dynamodb_error(code: str) -> dict[str, Any]:
    return {"__type": f"com.amazonaws.dynamodb.v20120810#{code}", "message": "nope"}


def local_store(fake: FakeAWS) -> DynamoDBConversationStore:
    client = boto3.client("dynamodb", endpoint_url=fake.url, region_name="us-east-1", config=FAST)
    return DynamoDBConversationStore(client, "conversations")


# -- DynamoDB: errors that are not "the record exists" ---------------------------------------


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (400, "ProvisionedThroughputExceededException"),
        (400, "ThrottlingException"),
        (400, "RequestLimitExceeded"),
        (500, "InternalServerError"),
        (400, "TransactionConflictException"),
        (400, "ResourceNotFoundException"),
    ],
)
def test_throttled_or_failing_create_is_store_unavailable_not_record_exists(
    fake_aws: FakeAWS, status: int, code: str
) -> None:
    fake_aws.reply = lambda op, body: (status, dynamodb_error(code), {})
    store = local_store(fake_aws)

    with pytest.raises(StoreUnavailable) as raised:
        store.create(ITEM)

    assert not isinstance(raised.value, StateConflict)
    assert code in str(raised.value)


def test_throttled_update_is_store_unavailable_not_state_conflict(fake_aws: FakeAWS) -> None:
    fake_aws.reply = lambda op, body: (
        400,
        dynamodb_error("ProvisionedThroughputExceededException"),
        {},
    )
    store = local_store(fake_aws)

    with pytest.raises(StoreUnavailable):
        store.update(KEY, Expect.status(Status.PROCESSING), {"lease_owner": None})
    with pytest.raises(StoreUnavailable):
        store.get(KEY)
    with pytest.raises(StoreUnavailable):
        store.list_open(Status.PROCESSING, datetime.now(UTC))


def test_an_unknown_error_code_is_store_unavailable_and_logged(
    fake_aws: FakeAWS, caplog: pytest.LogCaptureFixture
) -> None:
    fake_aws.reply = lambda op, body: (400, dynamodb_error("BrandNewException"), {})

    with pytest.raises(StoreUnavailable):
        local_store(fake_aws).create(ITEM)

    assert "BrandNewException" in caplog.text


def test_a_read_timeout_is_store_unavailable(fake_aws: FakeAWS) -> None:
    fake_aws.delay_seconds = 2.0  # beyond FAST's one-second read timeout

    with pytest.raises(StoreUnavailable, match="ReadTimeoutError"):
        local_store(fake_aws).get(KEY)


def test_an_unreachable_endpoint_is_store_unavailable() -> None:
    client = boto3.client(
        "dynamodb", endpoint_url="http://127.0.0.1:9", region_name="us-east-1", config=FAST
    )

    with pytest.raises(StoreUnavailable, match="EndpointConnectionError"):
        DynamoDBConversationStore(client, "conversations").get(KEY)


def test_condition_failure_without_the_old_item_falls_back_to_a_consistent_read(
    fake_aws: FakeAWS,
) -> None:
    stored = {name: {"S": value} for name, value in ITEM.items()}
    requests: dict[str, dict[str, Any]] = {}

    def reply(op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        requests[op] = body
        if op == "PutItem":
            return 400, dynamodb_error("ConditionalCheckFailedException"), {}
        return 200, {"Item": stored}, {}

    fake_aws.reply = reply

    with pytest.raises(RecordExists) as raised:
        local_store(fake_aws).create({**ITEM, "lease_owner": "worker-b"})

    assert raised.value.existing.attributes == ITEM
    assert fake_aws.operations == ["PutItem", "GetItem"]
    assert requests["GetItem"]["ConsistentRead"] is True
    assert requests["PutItem"]["ReturnValuesOnConditionCheckFailure"] == "ALL_OLD"


def test_create_on_a_taken_key_costs_no_second_read_on_dynamodb(moto_endpoint: str) -> None:
    client = boto3.client("dynamodb", endpoint_url=moto_endpoint, region_name="us-east-1")
    name = f"conversations-{uuid.uuid4().hex[:12]}"
    client.create_table(**table_definition(name))
    calls: list[str] = []
    client.meta.events.register(
        "before-call.dynamodb.*", lambda model, **_: calls.append(model.name)
    )
    store = DynamoDBConversationStore(client, name)
    store.create(ITEM)

    with pytest.raises(RecordExists) as raised:
        store.create({**ITEM, "lease_owner": "worker-b"})

    assert raised.value.existing.attributes == ITEM
    assert calls == ["PutItem", "PutItem"]


def test_dynamodb_error_table_covers_every_error_of_the_operations_the_store_calls() -> None:
    model = boto3.client("dynamodb", region_name="us-east-1").meta.service_model
    operations = ("PutItem", "UpdateItem", "GetItem", "Query")

    modelled = {shape.name for op in operations for shape in model.operation_model(op).error_shapes}

    assert modelled <= set(dynamodb_store.CLIENT_ERRORS)
    assert {
        code for code, error in dynamodb_store.CLIENT_ERRORS.items() if error is StateConflict
    } == {"ConditionalCheckFailedException"}


@pytest.mark.parametrize(
    "exc",
    [
        EndpointConnectionError(endpoint_url="http://x"),
        ReadTimeoutError(endpoint_url="http://x"),
        ConnectTimeoutError(endpoint_url="http://x"),
        ConnectionClosedError(endpoint_url="http://x"),
    ],
    ids=type,
)
def test_transport_failures_translate_to_store_unavailable(exc: Exception) -> None:
    assert isinstance(dynamodb_store.translate(exc, "PutItem"), StoreUnavailable)
    assert isinstance(sqs.translate(exc, "SendMessage"), StoreUnavailable)


# -- SQS --------------------------------------------------------------------------------------


def sqs_client(endpoint: str) -> Any:
    return boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1", config=FAST)


def sqs_error(
    code: str, query_code: str | None = None, message: str = "nope"
) -> Callable[[str, dict[str, Any]], tuple[int, dict[str, Any], dict[str, str]]]:
    """An SQS JSON-protocol error; real SQS also names the old query code in a header."""
    headers = {"x-amzn-query-error": f"{query_code};Sender"} if query_code else {}
    return lambda op, body: (
        400,
        {"__type": f"com.amazonaws.sqs#{code}", "message": message},
        headers,
    )


def test_extending_with_an_invalid_receipt_handle_on_sqs_is_lease_lost(moto_endpoint: str) -> None:
    client = sqs_client(moto_endpoint)
    url = client.create_queue(QueueName=f"work-{uuid.uuid4().hex[:12]}")["QueueUrl"]

    with pytest.raises(LeaseLost):
        SQSVisibilityExtender(client, url).extend("not-a-receipt-handle", 60)


def test_extending_a_deleted_message_on_sqs_is_lease_lost(moto_endpoint: str) -> None:
    client = sqs_client(moto_endpoint)
    url = client.create_queue(QueueName=f"work-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody="{}")
    handle = client.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    client.delete_message(QueueUrl=url, ReceiptHandle=handle)

    with pytest.raises(LeaseLost):
        SQSVisibilityExtender(client, url).extend(handle, 60)


def test_extending_a_live_message_keeps_it_hidden_beyond_its_first_timeout(
    moto_endpoint: str,
) -> None:
    client = sqs_client(moto_endpoint)
    url = client.create_queue(QueueName=f"work-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody="{}")
    handle = client.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"][0][
        "ReceiptHandle"
    ]

    SQSVisibilityExtender(client, url).extend(handle, 30)
    time.sleep(1.5)

    assert client.receive_message(QueueUrl=url).get("Messages", []) == []


def test_extending_past_sqs_twelve_hour_total_is_lease_lost(moto_endpoint: str) -> None:
    # SQS counts the 12 hours from the receive: 43200 more seconds a moment later is too many.
    client = sqs_client(moto_endpoint)
    url = client.create_queue(QueueName=f"work-{uuid.uuid4().hex[:12]}")["QueueUrl"]
    client.send_message(QueueUrl=url, MessageBody="{}")
    handle = client.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    time.sleep(1.1)

    with pytest.raises(LeaseLost):
        SQSVisibilityExtender(client, url).extend(handle, 100_000)


def test_visibility_extension_is_clamped_to_twelve_hours(fake_aws: FakeAWS) -> None:
    seen: list[dict[str, Any]] = []

    def reply(op: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        seen.append(body)
        return 200, {}, {}

    fake_aws.reply = reply

    SQSVisibilityExtender(sqs_client(fake_aws.url), f"{fake_aws.url}/1/q").extend("h", 50_000)

    assert seen[0]["VisibilityTimeout"] == sqs.MAX_VISIBILITY_SECONDS


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (sqs_error("RequestThrottled", "RequestThrottled"), StoreUnavailable),
        (sqs_error("ThrottlingException"), StoreUnavailable),
        (sqs_error("MessageNotInflight", "AWS.SimpleQueueService.MessageNotInflight"), LeaseLost),
        (sqs_error("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue"), LeaseLost),
        (
            sqs_error(
                "InvalidParameterValue",
                "InvalidParameterValue",
                "Value h for parameter ReceiptHandle is invalid. Reason: Message does not exist "
                "or is not available for visibility timeout change.",
            ),
            LeaseLost,
        ),
        (
            sqs_error("InvalidParameterValue", "InvalidParameterValue", "VisibilityTimeout bad"),
            StoreUnavailable,
        ),
    ],
    ids=[
        "throttled",
        "throttling",
        "not-inflight",
        "no-queue",
        "expired-handle",
        "other-parameter",
    ],
)
def test_visibility_extender_translates_sqs_errors(
    fake_aws: FakeAWS, reply: Reply, expected: type[Exception]
) -> None:
    fake_aws.reply = reply

    with pytest.raises(expected) as raised:
        SQSVisibilityExtender(sqs_client(fake_aws.url), f"{fake_aws.url}/1/q").extend("h", 60)

    assert type(raised.value) is expected


def test_a_missing_queue_on_send_is_store_unavailable_not_lease_lost(fake_aws: FakeAWS) -> None:
    fake_aws.reply = sqs_error("QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue")
    client = sqs_client(fake_aws.url)
    update = PendingFinalUpdate(
        primary_channel=KEY.primary_channel,
        conversation_id=KEY.conversation_id,
        send_attempt_id="a-1",
        message_sid="SM1",
        thread_id=None,
        updated_at="2025-03-01T09:00:00.000Z",
        processing_time_ms=10,
    )

    with pytest.raises(StoreUnavailable):
        SQSRepairLog(client, f"{fake_aws.url}/1/q").put(update)
    with pytest.raises(StoreUnavailable):
        SQSDeadLetters(client, f"{fake_aws.url}/1/q").forward("{}", ["bad"], None)


def test_sqs_error_table_covers_every_error_of_the_operations_the_adapters_call() -> None:
    model = boto3.client("sqs", region_name="us-east-1").meta.service_model
    operations = ("SendMessage", "ReceiveMessage", "DeleteMessage", "ChangeMessageVisibility")

    modelled = {shape.name for op in operations for shape in model.operation_model(op).error_shapes}

    assert modelled <= set(sqs.SQS_ERRORS)
    lease_lost = {code for code, error in sqs.SQS_ERRORS.items() if error is LeaseLost}
    assert {"ReceiptHandleIsInvalid", "AWS.SimpleQueueService.NonExistentQueue"} <= lease_lost
    assert {"RequestThrottled", "ThrottlingException", "OverLimit"}.isdisjoint(lease_lost)
