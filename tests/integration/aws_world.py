"""An AWS account on moto's server (table, queues, secrets) plus the Twilio and OpenAI fakes, and the
environment the Lambda handler and the worker read, so both run exactly as deployed."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import boto3
import pytest
from botocore.exceptions import ClientError

from channel_processor.adapters.dynamodb_store import table_definition
from channel_processor.entrypoints import lambda_sqs
from tests.fakes.openai_server import OpenAIFake
from tests.fakes.twilio_server import ACCOUNT_SID, AUTH_TOKEN, CONTENT_SID, TwilioFake
from tests.support import OPENAI_SECRET_NAME, TWILIO_SECRET_NAME

REGION = "us-east-1"
MAX_RECEIVE_COUNT = 3


@dataclass
class AwsWorld:
    endpoint: str
    twilio: TwilioFake
    openai: OpenAIFake
    table: str
    queue_url: str
    dlq_url: str
    repair_url: str
    calls: Counter[str] = field(default_factory=Counter)

    def client(self, service: str) -> Any:
        return boto3.client(service, region_name=REGION, endpoint_url=self.endpoint)  # type: ignore[call-overload]

    # -- the queue as Lambda's event source would present it --------------------------------
    def send(self, body: str) -> str:
        return str(
            self.client("sqs").send_message(QueueUrl=self.queue_url, MessageBody=body)["MessageId"]
        )

    def receive_event(self, max_messages: int = 10) -> dict[str, Any]:
        reply = self.client("sqs").receive_message(
            QueueUrl=self.queue_url,
            MaxNumberOfMessages=max_messages,
            WaitTimeSeconds=1,
            MessageSystemAttributeNames=["ApproximateReceiveCount"],
        )
        arn = f"arn:aws:sqs:{REGION}:123456789012:{self.queue_url.rsplit('/', 1)[-1]}"
        return {
            "Records": [
                {
                    "messageId": m["MessageId"],
                    "receiptHandle": m["ReceiptHandle"],
                    "body": m["Body"],
                    "attributes": {
                        "ApproximateReceiveCount": m["Attributes"]["ApproximateReceiveCount"]
                    },
                    "eventSource": "aws:sqs",
                    "eventSourceARN": arn,
                }
                for m in reply.get("Messages", [])
            ]
        }

    def dlq_bodies(self) -> list[dict[str, Any]]:
        reply = self.client("sqs").receive_message(
            QueueUrl=self.dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        )
        return [json.loads(m["Body"]) for m in reply.get("Messages", [])]

    def repair_entries(self) -> list[dict[str, Any]]:
        reply = self.client("sqs").receive_message(
            QueueUrl=self.repair_url, MaxNumberOfMessages=10, WaitTimeSeconds=0
        )
        return [json.loads(m["Body"]) for m in reply.get("Messages", [])]

    def record(self, primary_channel: str, conversation_id: str) -> dict[str, Any] | None:
        table = boto3.resource("dynamodb", region_name=REGION, endpoint_url=self.endpoint).Table(
            self.table
        )
        item = table.get_item(
            Key={"primary_channel": primary_channel, "conversation_id": conversation_id},
            ConsistentRead=True,
        ).get("Item")
        return dict(item) if item else None

    # -- fault injection at the SDK seam: the real client raises as AWS would ----------------
    def on_call(self, service: str, operation: str, hook: Callable[[dict[str, Any]], None]) -> None:
        """Run ``hook(params)`` before every ``operation`` of clients built from now on."""

        def handler(params: dict[str, Any], **_: Any) -> None:
            self.calls[f"{service}.{operation}"] += 1
            hook(params)

        boto3.DEFAULT_SESSION.events.register(
            f"before-parameter-build.{service}.{operation}", handler
        )  # type: ignore[union-attr]

    def count_calls(self, service: str, operation: str) -> None:
        self.on_call(service, operation, lambda params: None)


def aws_error(code: str, operation: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": f"injected {code}"}}, operation)


@pytest.fixture()
def aws(
    moto_reset: str,
    twilio_fake: TwilioFake,
    openai_fake: OpenAIFake,
    monkeypatch: pytest.MonkeyPatch,
) -> AwsWorld:
    boto3.setup_default_session()  # a fresh session per test: event hooks do not leak
    sqs = boto3.client("sqs", region_name=REGION, endpoint_url=moto_reset)
    suffix = uuid.uuid4().hex[:8]
    dlq_url = sqs.create_queue(QueueName=f"whatsapp-dlq-{suffix}")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    queue_url = sqs.create_queue(
        QueueName=f"whatsapp-{suffix}",
        Attributes={
            "VisibilityTimeout": "30",
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVE_COUNT)}
            ),
        },
    )["QueueUrl"]
    repair_url = sqs.create_queue(QueueName=f"whatsapp-repair-{suffix}")["QueueUrl"]
    table = f"conversations-{suffix}"
    boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_reset).create_table(
        **table_definition(table)
    )
    secrets = boto3.client("secretsmanager", region_name=REGION, endpoint_url=moto_reset)
    secrets.create_secret(
        Name=TWILIO_SECRET_NAME,
        SecretString=json.dumps(
            {
                "twilio_account_sid": ACCOUNT_SID,
                "twilio_auth_token": AUTH_TOKEN,
                "twilio_template_sid": CONTENT_SID,
            }
        ),
    )
    secrets.create_secret(
        Name=OPENAI_SECRET_NAME, SecretString=json.dumps({"ai_api_key": "sk-test-key"})
    )
    for name, value in {
        "AWS_ENDPOINT_URL": moto_reset,
        "AWS_REGION": REGION,
        "CP_TABLE_NAME": table,
        "CP_QUEUE_URL": queue_url,
        "CP_DLQ_URL": dlq_url,
        "CP_REPAIR_QUEUE_URL": repair_url,
        "CP_MAX_RECEIVE_COUNT": str(MAX_RECEIVE_COUNT),
        "CP_OPENAI_BASE_URL": openai_fake.base_url,
        "CP_TWILIO_BASE_URL": twilio_fake.base_url,
        "CP_TWILIO_TIMEOUT_SECONDS": "2",
        "CP_OPENAI_TIMEOUT_SECONDS": "5",
        "CP_SEND_SETTLE_SECONDS": "0",
    }.items():
        monkeypatch.setenv(name, value)
    lambda_sqs.reset()
    yield AwsWorld(moto_reset, twilio_fake, openai_fake, table, queue_url, dlq_url, repair_url)  # type: ignore[misc]
    lambda_sqs.reset()
