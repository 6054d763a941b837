"""The local CLI on the embedded default: what a new user sees."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from channel_processor.entrypoints.cli import EXIT_FAILED, EXIT_OK, main
from tests.support import ROOT, body, context_object

EXAMPLE = str(ROOT / "examples" / "context.json")


@pytest.fixture(autouse=True)
def local_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "local.db"
    monkeypatch.setenv("CP_SQLITE_PATH", str(path))
    return path


def run(*argv: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), stdout=out, stderr=err, stdin=io.StringIO(stdin))
    return code, out.getvalue(), err.getvalue()


def test_process_twice_prints_sent_then_duplicate() -> None:
    code, out, _ = run("process", EXAMPLE)
    assert code == EXIT_OK and out.startswith("sent ")
    assert "total: sent 1, duplicate 0" in out
    code, out, _ = run("process", EXAMPLE)
    assert code == EXIT_OK and out.startswith("duplicate ")


def test_json_output_has_exactly_the_documented_keys() -> None:
    code, out, _ = run("process", "--json", EXAMPLE)
    assert code == EXIT_OK
    [line] = out.splitlines()
    result = json.loads(line)
    assert set(result) == {"conversation_id", "status", "outcome", "message_sid", "errors"}
    assert result["outcome"] == "sent" and result["message_sid"].startswith("SM")
    assert result["status"] == "initial_message_sent"


def test_invalid_inputs_are_rejected_with_reasons_and_a_failing_exit_status() -> None:
    invalid = sorted(str(p) for p in (ROOT / "examples" / "invalid").iterdir())
    code, out, _ = run("process", "--json", *invalid)
    results = [json.loads(line) for line in out.splitlines()]
    assert code == EXIT_FAILED
    assert [r["outcome"] for r in results] == ["rejected"] * len(invalid)
    assert all(r["errors"] for r in results)
    assert all(r["message_sid"] is None for r in results)


def test_json_lines_on_stdin_are_each_processed() -> None:
    lines = "\n".join(
        body(context_object(request_id=f"00000000-0000-4000-8000-00000000000{n}")) for n in range(3)
    )
    code, out, _ = run("process", "-", stdin=lines + "\n\n")
    assert code == EXIT_OK
    assert "total: sent 3, duplicate 0, failed 0, rejected 0, retry 0" in out


def test_show_prints_the_record_with_its_history() -> None:
    _, out, _ = run("process", "--json", EXAMPLE)
    result = json.loads(out)
    code, shown, _ = run("show", result["conversation_id"])
    assert code == EXIT_OK
    assert "initial_message_sent" in shown and result["message_sid"] in shown
    assert "history (1 message(s))" in shown and "Hi Amara" in shown
    code, raw, _ = run("show", "--json", result["conversation_id"])
    assert json.loads(raw)["messages"][0]["message_id"] == result["message_sid"]


def test_show_of_an_unknown_conversation_fails_clearly() -> None:
    code, _, err = run("show", "nope")
    assert code == EXIT_FAILED and "no record" in err


def test_bad_configuration_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CP_HEARTBEAT_INTERVAL_SECONDS", "soon")
    code, _, err = run("process", EXAMPLE)
    assert code == 2 and "CP_HEARTBEAT_INTERVAL_SECONDS" in err


def test_installed_command_runs_the_example(local_store: Path) -> None:
    command = Path(sys.executable).parent / "channel-processor"
    done = subprocess.run(
        [str(command), "process", EXAMPLE], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("sent ")


class ClosedPipe(io.StringIO):
    """A stdout whose reader has gone away (``... | head``)."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_output_piped_into_a_reader_that_stops_early_ends_quietly() -> None:
    run("process", EXAMPLE)
    err = io.StringIO()
    code = main(["show", "--json", "nope-or-not"], stdout=ClosedPipe(), stderr=err)
    assert code == EXIT_FAILED  # unknown id: stderr only, stdout untouched
    _, out, _ = run("process", "--json", EXAMPLE)
    conversation = json.loads(out)["conversation_id"]
    code = main(["show", conversation], stdout=ClosedPipe(), stderr=err)
    assert code == EXIT_OK and "Traceback" not in err.getvalue()
