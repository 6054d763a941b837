"""The SAM template's promises, checked offline: cfn-lint finds nothing, and the properties issue 4
asks for (partial batch failures, visibility vs timeout, redrive, the Step 8 alarm, least privilege)."""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from cfnlint.api import lint_file
from cfnlint.decode import decode

from channel_processor import config, domain, observability
from channel_processor.config import Settings

TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "infra" / "template.yaml"
DATA_SERVICES = ("dynamodb", "sqs", "secretsmanager")
SECRETS_RESOURCE = (
    "arn:${AWS::Partition}:secretsmanager:${AWS::Region}:${AWS::AccountId}:secret:${SecretsPrefix}*"
)


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    # cfn-lint's decoder understands the short tags (!Ref, !Sub, ...) that yaml.safe_load rejects.
    parsed, problems = decode(str(TEMPLATE_PATH))
    assert not problems, [str(p) for p in problems]
    assert parsed is not None
    return dict(parsed)


# -- helpers ----------------------------------------------------------------------------------------


def resources(template: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    return {name: r for name, r in template["Resources"].items() if r["Type"] == kind}


def props(template: Mapping[str, Any], name: str) -> dict[str, Any]:
    return dict(template["Resources"][name]["Properties"])


def defaults(template: Mapping[str, Any]) -> dict[str, Any]:
    return {name: p.get("Default") for name, p in template["Parameters"].items()}


def resolve(node: Any, template: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """Evaluate the intrinsics the sizing uses (Ref to a parameter, FindInMap) for given values."""
    if isinstance(node, Mapping) and set(node) == {"Ref"}:
        return params[node["Ref"]]
    if isinstance(node, Mapping) and set(node) == {"Fn::FindInMap"}:
        mapping, top, second = (resolve(part, template, params) for part in node["Fn::FindInMap"])
        return template["Mappings"][mapping][str(top)][second]
    if isinstance(node, Mapping):
        raise AssertionError(f"the test cannot evaluate {dict(node)}")
    return node


def render_sub(text: str, template: Mapping[str, Any], **overrides: str) -> str:
    """``Fn::Sub`` with parameter defaults, pseudo parameters and resource names made up."""
    values = {name: str(value) for name, value in defaults(template).items()}
    values |= {
        "AWS::Region": "eu-west-1",
        "AWS::AccountId": "123456789012",
        "AWS::Partition": "aws",
    }
    values |= overrides

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        return values.get(name, name.split(".")[0].lower())

    return re.sub(r"\$\{([^}!]+)\}", one, text)


def statements(template: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every IAM statement of the template's roles and managed policies, with its owner's name."""
    for name, role in resources(template, "AWS::IAM::Role").items():
        for policy in role["Properties"].get("Policies", []):
            for statement in policy["PolicyDocument"]["Statement"]:
                yield name, statement
    for name, policy in resources(template, "AWS::IAM::ManagedPolicy").items():
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]:
            yield name, statement


def as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def resource_text(resource: Any) -> str:
    """A readable, comparable form of one policy resource: ``Name.Arn`` or the Sub template."""
    if isinstance(resource, str):
        return resource
    if "Fn::GetAtt" in resource:
        target = resource["Fn::GetAtt"]
        return ".".join(target) if isinstance(target, list) else str(target)
    if "Fn::Sub" in resource:
        return str(resource["Fn::Sub"])
    raise AssertionError(f"unexpected resource form {dict(resource)}")


def grants(template: Mapping[str, Any], owner: str) -> dict[str, set[str]]:
    granted: dict[str, set[str]] = {}
    for name, statement in statements(template):
        if name != owner:
            continue
        assert statement["Effect"] == "Allow"
        for resource in as_list(statement["Resource"]):
            granted.setdefault(resource_text(resource), set()).update(as_list(statement["Action"]))
    return granted


def matches_filter_pattern(pattern: str, line: str) -> bool:
    """CloudWatch Logs JSON filter semantics for ``{ $.a.b = "v" && $.c != "w" }`` patterns.

    Deliberately small: anything else (wildcards, numbers, ||, IS NULL) raises, so a template change
    to a pattern this cannot judge fails the test instead of passing it by accident.
    """
    body = pattern.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise ValueError(f"not a JSON filter pattern: {pattern!r}")
    try:
        event = json.loads(line)
    except ValueError:
        return False  # JSON patterns only ever match JSON log events
    if not isinstance(event, dict):
        return False
    for clause in body[1:-1].split("&&"):
        found = re.fullmatch(r'\s*\$\.([A-Za-z0-9_.]+)\s*(=|!=)\s*"([^"*]*)"\s*', clause)
        if found is None:
            raise ValueError(f"unsupported clause {clause!r}")
        path, operator, expected = found.groups()
        value: Any = event
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        equal = isinstance(value, str) and value == expected
        if equal != (operator == "="):
            return False
    return True


# -- validation -------------------------------------------------------------------------------------


def test_template_passes_cfn_lint_with_no_errors_or_warnings() -> None:
    # Given the template as committed; when cfn-lint runs its default rules (errors + warnings)
    findings = lint_file(TEMPLATE_PATH)

    # Then it finds nothing at all
    assert [f"{f.rule.id} line {f.linenumber}: {f.message}" for f in findings] == []


def test_function_handlers_resolve_to_callables_in_the_package(template: dict[str, Any]) -> None:
    for name in ("ProcessorFunction", "ReconcilerFunction"):
        module_name, _, attribute = props(template, name)["Handler"].rpartition(".")
        module = importlib.import_module(module_name)
        assert callable(getattr(module, attribute, None)), f"{name}: {module_name}.{attribute}"


def test_function_environment_builds_valid_lambda_settings(template: dict[str, Any]) -> None:
    # Given the processor's environment as CloudFormation would set it with the parameter defaults
    params = defaults(template)
    variables = dict(template["Globals"]["Function"]["Environment"]["Variables"])
    variables |= props(template, "ProcessorFunction")["Environment"]["Variables"]
    environ = {}
    for key, value in variables.items():
        ref = value.get("Ref") if isinstance(value, Mapping) else None
        environ[key] = str(params[ref]) if ref in params else str(ref or value)

    # When the settings object reads it
    settings = Settings.from_env(environ)

    # Then every CP_ name is one config.py knows, and the values are the AWS back ends and the sizes
    known = {v for k, v in vars(config).items() if k.startswith("ENV_")}
    assert {k for k in environ if k.startswith("CP_")} <= known
    backends = (
        settings.store,
        settings.composer,
        settings.sender,
        settings.secrets,
        settings.metrics,
    )
    assert backends == ("dynamodb", "openai", "twilio", "secretsmanager", "emf")
    assert settings.max_receive_count == params["MaxReceiveCount"]
    assert settings.batch_concurrency == params["BatchSize"]
    assert settings.lease_seconds == params["FunctionTimeoutSeconds"]
    assert settings.metrics_namespace == params["MetricsNamespace"]


# -- queue, event source, sizing -------------------------------------------------------------------


def test_processor_event_source_reports_batch_item_failures_with_parameterised_sizing(
    template: dict[str, Any],
) -> None:
    event = props(template, "ProcessorFunction")["Events"]["WhatsAppQueue"]
    assert event["Type"] == "SQS"
    source = event["Properties"]
    assert source["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert source["Queue"] == {"Fn::GetAtt": ["WhatsAppQueue", "Arn"]}
    assert source["BatchSize"] == {"Ref": "BatchSize"}
    assert source["MaximumBatchingWindowInSeconds"] == {"Ref": "MaximumBatchingWindowInSeconds"}
    assert source["ScalingConfig"] == {"MaximumConcurrency": {"Ref": "MaximumConcurrency"}}


def test_queue_visibility_is_six_times_the_function_timeout_for_every_allowed_timeout(
    template: dict[str, Any],
) -> None:
    # Given every timeout the template accepts
    timeout_parameter = template["Parameters"]["FunctionTimeoutSeconds"]
    assert props(template, "ProcessorFunction")["Timeout"] == {"Ref": "FunctionTimeoutSeconds"}
    allowed = [int(v) for v in timeout_parameter["AllowedValues"]]
    assert int(timeout_parameter["Default"]) in allowed

    for timeout in allowed:
        # When the queue's visibility timeout is evaluated for it
        visibility = resolve(
            props(template, "WhatsAppQueue")["VisibilityTimeout"],
            template,
            {"FunctionTimeoutSeconds": timeout},
        )
        # Then it is at least six times the function timeout (AWS's rule for SQS event sources)
        assert int(visibility) >= 6 * timeout, (timeout, visibility)
        assert int(visibility) <= 43_200  # SQS's maximum


def test_heartbeat_interval_is_shorter_than_the_extension_for_every_accepted_pair(
    template: dict[str, Any],
) -> None:
    interval = template["Parameters"]["HeartbeatIntervalSeconds"]
    extension = template["Parameters"]["HeartbeatExtensionSeconds"]
    assert int(interval["MaxValue"]) < int(extension["MinValue"])


def test_repair_queue_stays_hidden_for_a_whole_reconciler_run(template: dict[str, Any]) -> None:
    assert props(template, "RepairQueue")["VisibilityTimeout"] == {
        "Ref": "ReconcilerTimeoutSeconds"
    }
    assert props(template, "ReconcilerFunction")["Timeout"] == {"Ref": "ReconcilerTimeoutSeconds"}


def test_whatsapp_queue_redrives_to_its_dlq_after_the_receive_count_the_processor_is_told(
    template: dict[str, Any],
) -> None:
    redrive = props(template, "WhatsAppQueue")["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["WhatsAppDLQ", "Arn"]}
    assert redrive["maxReceiveCount"] == {"Ref": "MaxReceiveCount"}
    # the processor marks the record failed on the last receive, so it must know the same number
    assert template["Globals"]["Function"]["Environment"]["Variables"][
        config.ENV_MAX_RECEIVE_COUNT
    ] == {"Ref": "MaxReceiveCount"}
    # a DLQ message keeps its original enqueue time, so the DLQ must keep messages longer
    assert (
        props(template, "WhatsAppDLQ")["MessageRetentionPeriod"]
        > props(template, "WhatsAppQueue")["MessageRetentionPeriod"]
    )


def test_repair_queue_has_its_own_dlq_and_maximum_retention(template: dict[str, Any]) -> None:
    repair = props(template, "RepairQueue")
    assert repair["RedrivePolicy"]["deadLetterTargetArn"] == {"Fn::GetAtt": ["RepairDLQ", "Arn"]}
    assert repair["RedrivePolicy"]["maxReceiveCount"] == {"Ref": "RepairMaxReceiveCount"}
    assert repair["MessageRetentionPeriod"] == 1_209_600


def test_queues_survive_a_rename_or_a_stack_delete(template: dict[str, Any]) -> None:
    for name in ("WhatsAppQueue", "WhatsAppDLQ", "RepairQueue", "RepairDLQ", "ConversationsTable"):
        resource = template["Resources"][name]
        assert (resource["DeletionPolicy"], resource["UpdateReplacePolicy"]) == ("Retain", "Retain")


# -- table --------------------------------------------------------------------------------------


def test_table_has_the_spec_keys_on_demand_billing_pitr_and_deletion_protection(
    template: dict[str, Any],
) -> None:
    table = props(template, "ConversationsTable")
    assert table["KeySchema"] == [
        {"AttributeName": "primary_channel", "KeyType": "HASH"},
        {"AttributeName": "conversation_id", "KeyType": "RANGE"},
    ]
    assert table["BillingMode"] == "PAY_PER_REQUEST"
    assert table["PointInTimeRecoverySpecification"] == {"PointInTimeRecoveryEnabled": True}
    assert table["DeletionProtectionEnabled"] is True


def test_open_status_index_is_the_one_the_reconciler_queries(template: dict[str, Any]) -> None:
    table = props(template, "ConversationsTable")
    indexes = {i["IndexName"]: i for i in table["GlobalSecondaryIndexes"]}
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}

    index = indexes[domain.OPEN_INDEX_NAME]
    assert index["KeySchema"] == [
        {"AttributeName": domain.OPEN_STATUS_ATTR, "KeyType": "HASH"},
        {"AttributeName": "updated_at", "KeyType": "RANGE"},
    ]
    assert index["Projection"] == {"ProjectionType": "ALL"}
    assert types[domain.OPEN_STATUS_ATTR] == types["updated_at"] == "S"


def test_lookup_indexes_are_keys_only_and_sorted_by_the_immutable_created_at(
    template: dict[str, Any],
) -> None:
    table = props(template, "ConversationsTable")
    indexes = {i["IndexName"]: i for i in table["GlobalSecondaryIndexes"]}
    types = {a["AttributeName"]: a["AttributeType"] for a in table["AttributeDefinitions"]}
    for attribute in ("gsi_company_whatsapp_number", "gsi_recipient_tel"):
        index = indexes[f"{attribute}-created_at-index"]
        assert index["KeySchema"] == [
            {"AttributeName": attribute, "KeyType": "HASH"},
            {"AttributeName": "created_at", "KeyType": "RANGE"},
        ]
        assert index["Projection"] == {"ProjectionType": "KEYS_ONLY"}
        assert types[attribute] == "S"
    # every defined attribute is a key somewhere (CloudFormation rejects unused definitions)
    used = {k["AttributeName"] for k in table["KeySchema"]} | {
        k["AttributeName"] for i in table["GlobalSecondaryIndexes"] for k in i["KeySchema"]
    }
    assert set(types) == used


# -- IAM --------------------------------------------------------------------------------------------


def test_no_data_action_is_granted_on_a_wildcard_resource(template: dict[str, Any]) -> None:
    checked = 0
    for owner, statement in statements(template):
        actions = as_list(statement["Action"])
        assert all(a != "*" and not a.endswith(":*") for a in actions), (owner, actions)
        if not any(a.split(":")[0] in DATA_SERVICES for a in actions):
            continue
        for resource in as_list(statement["Resource"]):
            text = resource_text(resource)
            checked += 1
            assert text != "*", (owner, statement.get("Sid"))
            # the only wildcard allowed is the secret-name prefix (Secrets Manager adds a suffix)
            assert "*" not in text or text == SECRETS_RESOURCE, (owner, text)
    assert checked > 10


def test_secret_prefix_can_be_neither_empty_nor_a_wildcard(template: dict[str, Any]) -> None:
    parameter = template["Parameters"]["SecretsPrefix"]
    pattern = re.compile(parameter["AllowedPattern"])
    assert pattern.fullmatch(parameter["Default"])
    assert pattern.fullmatch("acme/whatsapp-")
    for bad in ("", "*", "acme/*"):
        assert pattern.fullmatch(bad) is None, bad


def test_functions_run_with_the_explicit_roles_so_sam_adds_no_managed_policies(
    template: dict[str, Any],
) -> None:
    # SAM attaches AWSLambdaSQSQueueExecutionRole (Resource "*") only to roles it generates.
    for name, role in (
        ("ProcessorFunction", "ProcessorRole"),
        ("ReconcilerFunction", "ReconcilerRole"),
    ):
        function = props(template, name)
        assert function["Role"] == {"Fn::GetAtt": [role, "Arn"]}
        assert "Policies" not in function
        assert "ManagedPolicyArns" not in props(template, role)
    assert "Policies" not in template["Globals"]["Function"]


def test_processor_role_grants_exactly_what_the_pipeline_uses(template: dict[str, Any]) -> None:
    assert grants(template, "ProcessorRole") == {
        "ProcessorLogGroup.Arn": {"logs:CreateLogStream", "logs:PutLogEvents"},
        "WhatsAppQueue.Arn": {
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:GetQueueAttributes",
            "sqs:ChangeMessageVisibility",
        },
        "WhatsAppDLQ.Arn": {"sqs:SendMessage"},
        "RepairQueue.Arn": {"sqs:SendMessage"},
        "ConversationsTable.Arn": {"dynamodb:GetItem", "dynamodb:PutItem", "dynamodb:UpdateItem"},
        SECRETS_RESOURCE: {"secretsmanager:GetSecretValue"},
    }


def test_reconciler_role_grants_exactly_what_the_reconciler_uses(template: dict[str, Any]) -> None:
    assert grants(template, "ReconcilerRole") == {
        "ReconcilerLogGroup.Arn": {"logs:CreateLogStream", "logs:PutLogEvents"},
        "RepairQueue.Arn": {
            "sqs:ReceiveMessage",
            "sqs:DeleteMessage",
            "sqs:ChangeMessageVisibility",
            "sqs:GetQueueAttributes",
        },
        "ConversationsTable.Arn": {"dynamodb:GetItem", "dynamodb:UpdateItem"},
        "${ConversationsTable.Arn}/index/" + domain.OPEN_INDEX_NAME: {"dynamodb:Query"},
        SECRETS_RESOURCE: {"secretsmanager:GetSecretValue"},
    }


def test_only_the_operator_policy_may_start_a_dlq_redrive(template: dict[str, Any]) -> None:
    holders = {
        owner
        for owner, statement in statements(template)
        if "sqs:StartMessageMoveTask" in as_list(statement["Action"])
    }
    assert holders == {"OperatorPolicy"}
    assert {"WhatsAppDLQ.Arn", "RepairDLQ.Arn"} <= {
        text
        for text, actions in grants(template, "OperatorPolicy").items()
        if "sqs:StartMessageMoveTask" in actions
    }


# -- logs, metric filter, alarms, dashboard ------------------------------------------------------


def test_both_functions_log_to_their_own_group_with_retention(template: dict[str, Any]) -> None:
    for function, group in (
        ("ProcessorFunction", "ProcessorLogGroup"),
        ("ReconcilerFunction", "ReconcilerLogGroup"),
    ):
        assert props(template, function)["LoggingConfig"] == {
            "LogFormat": "Text",  # the app's own JSON lines stay top-level for the metric filter
            "LogGroup": {"Ref": group},
        }
        assert props(template, group)["RetentionInDays"] == {"Ref": "LogRetentionDays"}


def test_step8_critical_line_matches_the_metric_filter(template: dict[str, Any]) -> None:
    # Given the processor's metric filter and the CRITICAL line the seed's Step 8 asks for
    metric_filter = props(template, "FinalUpdateFailedMetricFilter")
    assert metric_filter["LogGroupName"] == {"Ref": "ProcessorLogGroup"}
    pattern = metric_filter["FilterPattern"]
    line = json.dumps(
        {
            "level": "CRITICAL",
            "message": "Twilio message WAS sent but the final conversation update failed",
            "event": "final_db_update_failed",
            "conversation_id": "c-1#p-1#2f1c#447700900123",
            "recipient": "+44*******123",
            "message_sid": "SM0123456789abcdef0123456789abcdef",
            "repair_id": "9f0c",
        }
    )

    # Then that line matches, and lines that merely mention the marker do not
    assert matches_filter_pattern(pattern, line)
    assert not matches_filter_pattern(pattern, json.dumps({"event": "sent", "level": "INFO"}))
    assert not matches_filter_pattern(pattern, "CRITICAL final_db_update_failed (plain text)")
    assert not matches_filter_pattern(
        pattern, json.dumps({"details": {"event": "final_db_update_failed"}})
    )


def test_line_emitted_by_the_project_logger_matches_the_metric_filter(
    template: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the project's logger (the one the pipeline's Step 8 uses) writing the marker as extra
    observability.logger.critical(
        "final update failed", extra={"event": observability.STEP8_EVENT, "repair_id": "r-1"}
    )

    # When its output line is judged by the template's pattern
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    pattern = props(template, "FinalUpdateFailedMetricFilter")["FilterPattern"]

    # Then the marker is a top-level key of one JSON line, so the filter counts it
    assert len(lines) == 1
    assert json.loads(lines[0])["level"] == "CRITICAL"
    assert matches_filter_pattern(pattern, lines[0])


def test_the_pipelines_own_step8_line_matches_the_metric_filter(
    template: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a message sent whose final update fails at every try (the real pipeline on fakes)
    from channel_processor.domain import Status
    from channel_processor.errors import StoreUnavailable
    from tests.support import World, context_object

    world = World()

    def final_update_down(op: str, key: Any) -> None:
        record = world.store.peek(key) if key else None
        if op == "update" and record is not None and record.status is Status.SENDING:
            raise StoreUnavailable("ProvisionedThroughputExceededException")

    world.store.script = final_update_down
    world.process(context_object())

    # When every line it wrote is judged by the template's pattern
    pattern = props(template, "FinalUpdateFailedMetricFilter")["FilterPattern"]
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    matching = [ln for ln in lines if matches_filter_pattern(pattern, ln)]

    # Then exactly the one CRITICAL Step 8 line is counted by the alarm's metric
    assert len(matching) == 1
    line = json.loads(matching[0])
    assert line["level"] == "CRITICAL" and line["message_sid"].startswith("SM")


def test_metric_filter_feeds_an_alarm_that_notifies_the_topic(template: dict[str, Any]) -> None:
    (transformation,) = props(template, "FinalUpdateFailedMetricFilter")["MetricTransformations"]
    alarm = props(template, "FinalUpdateFailedAlarm")
    assert (alarm["Namespace"], alarm["MetricName"]) == (
        transformation["MetricNamespace"],
        transformation["MetricName"],
    )
    assert (alarm["Statistic"], alarm["Threshold"], alarm["ComparisonOperator"]) == (
        "Sum",
        0,
        "GreaterThanThreshold",
    )
    assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]


def test_alarms_watch_dlq_depth_oldest_message_and_needs_reconciliation(
    template: dict[str, Any],
) -> None:
    alarms = {
        name: r["Properties"] for name, r in resources(template, "AWS::CloudWatch::Alarm").items()
    }
    for alarm in alarms.values():
        assert alarm["AlarmActions"] == [{"Ref": "AlarmTopic"}]
        assert alarm["TreatMissingData"] == "notBreaching"

    def watches(name: str, metric: str, queue: str) -> None:
        alarm = alarms[name]
        assert (alarm["Namespace"], alarm["MetricName"]) == ("AWS/SQS", metric)
        assert alarm["Dimensions"] == [
            {"Name": "QueueName", "Value": {"Fn::GetAtt": [queue, "QueueName"]}}
        ]

    watches("DLQDepthAlarm", "ApproximateNumberOfMessagesVisible", "WhatsAppDLQ")
    assert alarms["DLQDepthAlarm"]["Threshold"] == 0
    watches("RepairDLQDepthAlarm", "ApproximateNumberOfMessagesVisible", "RepairDLQ")
    watches("OldestMessageAgeAlarm", "ApproximateAgeOfOldestMessage", "WhatsAppQueue")
    assert alarms["OldestMessageAgeAlarm"]["Threshold"] == {"Ref": "OldestMessageAgeAlarmSeconds"}
    watches("RepairBacklogAgeAlarm", "ApproximateAgeOfOldestMessage", "RepairQueue")

    (query,) = alarms["NeedsReconciliationAlarm"]["Metrics"]
    assert render_sub(query["Expression"]["Fn::Sub"], template) == (
        'SELECT MAX(needs_reconciliation_open) FROM "WhatsAppChannelProcessor"'
    )
    assert alarms["NeedsReconciliationAlarm"]["Threshold"] == 0


def test_alarm_email_subscription_exists_only_when_an_address_is_given(
    template: dict[str, Any],
) -> None:
    subscription = template["Resources"]["AlarmEmailSubscription"]
    assert subscription["Condition"] == "HasAlarmEmail"
    assert template["Conditions"]["HasAlarmEmail"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmEmail"}, ""]}]
    }
    assert template["Parameters"]["AlarmEmail"]["Default"] == ""


def test_dashboard_is_valid_json_and_shows_outcomes_latency_queues_and_reconciler(
    template: dict[str, Any],
) -> None:
    # Given the dashboard body rendered with the parameter defaults
    body = json.loads(
        render_sub(props(template, "Dashboard")["DashboardBody"]["Fn::Sub"], template)
    )

    # Then every operator question has a metric on it (names searched in the metric definitions only)
    plotted = json.dumps([w["properties"].get("metrics", []) for w in body["widgets"]])
    for metric in (
        "sent",
        "duplicate_suppressed",
        "retried",
        "failed_permanent",
        "final_update_failed",
        "dlq_forwarded",
        "step_latency_ms",
        "reconciled",
        "needs_reconciliation",
        "final_db_update_failed_marker",
        "ApproximateNumberOfMessagesVisible",
        "ApproximateAgeOfOldestMessage",
    ):
        assert re.search(rf"(?<![A-Za-z_]){metric}(?![A-Za-z_])", plotted), metric
    for queue in ("whatsappqueue", "whatsappdlq", "repairqueue", "repairdlq"):
        assert f'"{queue}"' in plotted, queue
    # the Step 8 lines themselves, for the operator who must repair them
    (log_widget,) = [w for w in body["widgets"] if w["type"] == "log"]
    assert 'filter event = "final_db_update_failed"' in log_widget["properties"]["query"]
