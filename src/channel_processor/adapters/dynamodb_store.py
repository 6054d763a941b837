"""Conversation records in one DynamoDB table, every transition a conditional write.

Also home of the record value rules shared by every store: floats become exact ``Decimal``s on
the way in, integral numbers come back as ``int`` (what a DynamoDB read gives, made friendlier).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from decimal import Context, Decimal, DecimalException
from typing import TYPE_CHECKING, Any, NoReturn

from boto3.dynamodb.types import TypeDeserializer, TypeSerializer
from botocore.exceptions import BotoCoreError, ClientError

from channel_processor.domain import (
    OPEN_INDEX_NAME,
    OPEN_STATUS_ATTR,
    STATUS_ATTR,
    ConversationRecord,
    Expect,
    RecordKey,
    Status,
    iso,
)
from channel_processor.errors import (
    ProcessorError,
    RecordExists,
    StateConflict,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.client import DynamoDBClient

log = logging.getLogger(__name__)

KEY_ATTRS = ("primary_channel", "conversation_id")
# Attributes that key a sparse index: an empty string is not a valid index key, so "no value"
# must mean "attribute absent" for these, never "".
SPARSE_ATTRS = frozenset({"gsi_company_whatsapp_number", "gsi_recipient_tel", OPEN_STATUS_ATTR})
MESSAGES_ATTR = "messages"
ATTEMPT_COUNT_ATTR = "attempt_count"

# The one translation table of DynamoDB error codes. Only a failed condition means "the record is
# not in the state you expected"; everything else means the write may not have happened and the
# caller should retry later. Codes not listed are treated as unavailable too, but logged.
CLIENT_ERRORS: Mapping[str, type[ProcessorError]] = {
    "ConditionalCheckFailedException": StateConflict,
    "ProvisionedThroughputExceededException": StoreUnavailable,
    "ThrottlingException": StoreUnavailable,
    "RequestLimitExceeded": StoreUnavailable,
    "InternalServerError": StoreUnavailable,
    "ServiceUnavailable": StoreUnavailable,
    "TransactionConflictException": StoreUnavailable,
    "ReplicatedWriteConflictException": StoreUnavailable,
    # The item collection (one partition key, i.e. one recipient) outgrew 10 GB with an LSI: a
    # retry will not help, but the message must still reach the DLQ through SQS's retries.
    "ItemCollectionSizeLimitExceededException": StoreUnavailable,
    # Wrong table name or region: a deployment fault; retrying lets SQS move it to the DLQ intact.
    "ResourceNotFoundException": StoreUnavailable,
}
# Transport failures (connect/read timeouts, resets) are all BotoCoreError subclasses.
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (BotoCoreError,)

# DynamoDB numbers: 38 significant digits, magnitude 1E-130 .. 9.99E+125. Longer numbers are
# rounded to 38 digits; numbers out of range (and NaN / infinity) are kept as text rather than
# failing the whole write.
_NUMBER_CONTEXT = Context(prec=38)
_MAX_EXPONENT = 125
_MIN_EXPONENT = -130


def translate(exc: Exception, operation: str) -> ProcessorError:
    """Map an SDK exception to the processor's error tree (the only place that does it)."""
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        error = CLIENT_ERRORS.get(code)
        if error is None:
            log.warning("unmapped DynamoDB error %s on %s: treated as unavailable", code, operation)
            error = StoreUnavailable
        return error(f"DynamoDB {operation}: {code}")
    if isinstance(exc, TRANSPORT_ERRORS):
        return StoreUnavailable(f"DynamoDB {operation}: {type(exc).__name__}")
    raise TypeError(f"not an SDK error: {exc!r}") from exc


def _number(value: float | Decimal) -> Decimal | str:
    # str(), not Decimal(float): Decimal(0.1) is 0.1000000000000000055511151231257827...
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if not number.is_finite():
        return str(value)
    try:
        number = _NUMBER_CONTEXT.create_decimal(number)
    except DecimalException:
        return str(value)
    if number and not _MIN_EXPONENT <= number.adjusted() <= _MAX_EXPONENT:
        return str(value)
    return number


def to_storable(value: Any) -> Any:
    """A value as DynamoDB can hold it: floats as exact ``Decimal`` (4.5, 0.1 stay 4.5, 0.1)."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, float | Decimal):
        return _number(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        return str(value)  # StrEnum members become plain text
    if isinstance(value, Mapping):
        return {str(k): to_storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_storable(v) for v in value]
    raise TypeError(f"cannot store a {type(value).__name__} in a conversation record")


def from_storage(value: Any) -> Any:
    """A stored value as the store hands it back: numbers as ``int`` when integral, else
    ``Decimal``; containers as plain dicts and lists."""
    if isinstance(value, Decimal):
        if value.is_finite() and value == value.to_integral_value():
            return int(value)
        return value
    if isinstance(value, Mapping):
        return {k: from_storage(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [from_storage(v) for v in value]
    if isinstance(value, set | frozenset):
        return {from_storage(v) for v in value}
    return value


def is_blank(name: str, value: Any) -> bool:
    """Whether writing ``value`` to ``name`` means "no such attribute"."""
    return value is None or (name in SPARSE_ATTRS and value == "")


def new_item(item: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes ``create`` writes: blanks dropped, numbers made storable."""
    for name in KEY_ATTRS:
        if not item.get(name):
            raise ValueError(f"a conversation record needs {name}")
    return {name: to_storable(v) for name, v in item.items() if not is_blank(name, v)}


def check_changes(
    changes: Mapping[str, Any], append_message: object, increment_attempts: bool
) -> None:
    """Reject updates no store can apply (programming errors, not store failures)."""
    if not changes and append_message is None and not increment_attempts:
        raise ValueError("an update must change something")
    for name in KEY_ATTRS:
        if name in changes:
            raise ValueError(f"{name} is part of the key and cannot be updated")
    if append_message is not None and MESSAGES_ATTR in changes:
        raise ValueError("set messages or append a message, not both")


def table_definition(table_name: str) -> dict[str, Any]:
    """``create_table`` arguments for the conversations table with the reconciler's sparse index."""
    return {
        "TableName": table_name,
        "AttributeDefinitions": [
            {"AttributeName": "primary_channel", "AttributeType": "S"},
            {"AttributeName": "conversation_id", "AttributeType": "S"},
            {"AttributeName": OPEN_STATUS_ATTR, "AttributeType": "S"},
            {"AttributeName": "updated_at", "AttributeType": "S"},
        ],
        "KeySchema": [
            {"AttributeName": "primary_channel", "KeyType": "HASH"},
            {"AttributeName": "conversation_id", "KeyType": "RANGE"},
        ],
        "GlobalSecondaryIndexes": [
            {
                "IndexName": OPEN_INDEX_NAME,
                "KeySchema": [
                    {"AttributeName": OPEN_STATUS_ATTR, "KeyType": "HASH"},
                    {"AttributeName": "updated_at", "KeyType": "RANGE"},
                ],
                "Projection": {"ProjectionType": "ALL"},
            }
        ],
        "BillingMode": "PAY_PER_REQUEST",
    }


class _Expression:
    """Collects ``#name`` / ``:value`` placeholders. Every attribute name goes through one, so
    reserved words (``status``, ``name``, ``timestamp`` ...) never break an expression."""

    def __init__(self, serializer: TypeSerializer) -> None:
        self._serializer = serializer
        self.names: dict[str, str] = {}
        self.values: dict[str, Any] = {}

    def name(self, attribute: str) -> str:
        for placeholder, existing in self.names.items():
            if existing == attribute:
                return placeholder
        placeholder = f"#n{len(self.names)}"
        self.names[placeholder] = attribute
        return placeholder

    def value(self, value: Any) -> str:
        placeholder = f":v{len(self.values)}"
        self.values[placeholder] = self._serializer.serialize(to_storable(value))
        return placeholder


class DynamoDBConversationStore:
    """``ports.ConversationStore`` on a DynamoDB table (boto3 *client* built by the caller)."""

    def __init__(self, client: DynamoDBClient, table_name: str) -> None:
        self._client = client
        self._table = table_name
        self._serializer = TypeSerializer()
        self._deserializer = TypeDeserializer()

    # -- port -------------------------------------------------------------------------------

    def create(self, item: Mapping[str, Any]) -> ConversationRecord:
        attributes = new_item(item)
        expr = _Expression(self._serializer)
        condition = " AND ".join(f"attribute_not_exists({expr.name(k)})" for k in KEY_ATTRS)
        try:
            self._client.put_item(
                TableName=self._table,
                Item=self._serialize(attributes),
                ConditionExpression=condition,
                ExpressionAttributeNames=expr.names,
                # The existing item comes back with the failure: no second read on redelivery.
                ReturnValuesOnConditionCheckFailure="ALL_OLD",
            )
        except (ClientError, BotoCoreError) as exc:
            error = translate(exc, "PutItem")
            if not isinstance(error, StateConflict):
                raise error from exc
            self._raise_exists(exc, RecordKey(*(str(attributes[k]) for k in KEY_ATTRS)))
        return ConversationRecord(from_storage(attributes))

    def get(self, key: RecordKey) -> ConversationRecord | None:
        try:
            response = self._client.get_item(
                TableName=self._table, Key=self._key(key), ConsistentRead=True
            )
        except (ClientError, BotoCoreError) as exc:
            raise translate(exc, "GetItem") from exc
        item = response.get("Item")
        return self._record(item) if item else None

    def update(
        self,
        key: RecordKey,
        expect: Expect,
        changes: Mapping[str, Any],
        append_message: Mapping[str, Any] | None = None,
        increment_attempts: bool = False,
    ) -> ConversationRecord:
        check_changes(changes, append_message, increment_attempts)
        if not expect.statuses:
            raise StateConflict("no status can match an empty expectation")
        expr = _Expression(self._serializer)
        sets: list[str] = []
        removes: list[str] = []
        for name, value in changes.items():
            if is_blank(name, value):
                removes.append(expr.name(name))
            else:
                sets.append(f"{expr.name(name)} = {expr.value(value)}")
        if append_message is not None:
            messages = expr.name(MESSAGES_ATTR)
            # if_not_exists: records written before ``messages`` existed still get a history.
            sets.append(
                f"{messages} = list_append(if_not_exists({messages}, {expr.value([])}), "
                f"{expr.value([dict(append_message)])})"
            )
        if increment_attempts:
            count = expr.name(ATTEMPT_COUNT_ATTR)
            sets.append(f"{count} = if_not_exists({count}, {expr.value(0)}) + {expr.value(1)}")
        update = " ".join(
            part
            for part in (
                f"SET {', '.join(sets)}" if sets else "",
                f"REMOVE {', '.join(removes)}" if removes else "",
            )
            if part
        )
        try:
            response = self._client.update_item(
                TableName=self._table,
                Key=self._key(key),
                UpdateExpression=update,
                ConditionExpression=self._condition(expr, expect),
                ExpressionAttributeNames=expr.names,
                ExpressionAttributeValues=expr.values,
                ReturnValues="ALL_NEW",
            )
        except (ClientError, BotoCoreError) as exc:
            error = translate(exc, "UpdateItem")
            if isinstance(error, StateConflict):
                raise StateConflict(
                    f"{key.conversation_id!r} is missing or not in the expected state"
                ) from exc
            raise error from exc
        return self._record(response["Attributes"])

    def find(self, conversation_id: str) -> list[ConversationRecord]:
        # The key starts with the recipient, which an operator may not have: a filtered scan,
        # paginated, for the occasional look-up (the processor never calls this).
        expr = _Expression(self._serializer)
        request: dict[str, Any] = {
            "TableName": self._table,
            "FilterExpression": f"{expr.name('conversation_id')} = {expr.value(conversation_id)}",
            "ExpressionAttributeNames": expr.names,
            "ExpressionAttributeValues": expr.values,
            "ConsistentRead": True,
        }
        records: list[ConversationRecord] = []
        while True:
            try:
                response = self._client.scan(**request)
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, "Scan") from exc
            records.extend(self._record(item) for item in response.get("Items", []))
            last = response.get("LastEvaluatedKey")
            if not last:
                return records
            request["ExclusiveStartKey"] = last

    def list_open(
        self, status: Status, updated_before: datetime, limit: int = 100
    ) -> list[ConversationRecord]:
        expr = _Expression(self._serializer)
        condition = (
            f"{expr.name(OPEN_STATUS_ATTR)} = {expr.value(status.value)} AND "
            f"{expr.name('updated_at')} < {expr.value(iso(updated_before))}"
        )
        records: list[ConversationRecord] = []
        for item in self._query(expr, condition, limit):
            records.append(self._record(item))
            if len(records) >= limit:
                break
        return records

    # -- helpers ----------------------------------------------------------------------------

    def _query(self, expr: _Expression, condition: str, limit: int) -> Iterator[dict[str, Any]]:
        request: dict[str, Any] = {
            "TableName": self._table,
            "IndexName": OPEN_INDEX_NAME,
            "KeyConditionExpression": condition,
            "ExpressionAttributeNames": expr.names,
            "ExpressionAttributeValues": expr.values,
            "ScanIndexForward": True,  # oldest first
            "Limit": max(1, limit),
        }
        while True:
            try:
                response = self._client.query(**request)
            except (ClientError, BotoCoreError) as exc:
                raise translate(exc, "Query") from exc
            yield from response.get("Items", [])
            last = response.get("LastEvaluatedKey")
            if not last:
                return
            request["ExclusiveStartKey"] = last

    @staticmethod
    def _condition(expr: _Expression, expect: Expect) -> str:
        statuses = ", ".join(expr.value(s.value) for s in sorted(expect.statuses))
        parts = [
            f"attribute_exists({expr.name('conversation_id')})",
            f"{expr.name(STATUS_ATTR)} IN ({statuses})",
        ]
        for name in ("lease_owner", "lease_expires_at", "send_attempt_id"):
            wanted = getattr(expect, name)
            if wanted is not None:
                parts.append(f"{expr.name(name)} = {expr.value(wanted)}")
        return " AND ".join(parts)

    def _raise_exists(self, exc: ClientError | BotoCoreError, key: RecordKey) -> NoReturn:
        item = exc.response.get("Item") if isinstance(exc, ClientError) else None
        existing = self._record(item) if isinstance(item, Mapping) and item else None
        if existing is None:
            # Older endpoints (and some emulators) omit the item: read it, strongly consistent.
            existing = self.get(key)
        if existing is None:
            # Deleted between the failed put and the read: still "not yours", let SQS retry.
            raise StoreUnavailable(f"{key.conversation_id!r} existed but vanished") from exc
        raise RecordExists(existing) from exc

    def _key(self, key: RecordKey) -> dict[str, Any]:
        return {
            "primary_channel": {"S": key.primary_channel},
            "conversation_id": {"S": key.conversation_id},
        }

    def _serialize(self, attributes: Mapping[str, Any]) -> dict[str, Any]:
        return {name: self._serializer.serialize(v) for name, v in attributes.items()}

    def _record(self, item: Mapping[str, Any]) -> ConversationRecord:
        return ConversationRecord(
            {name: from_storage(self._deserializer.deserialize(v)) for name, v in item.items()}
        )
