"""``FakeComposer``: a ``Composer`` whose answers a test scripts, recording every request."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

from channel_processor.domain import Draft
from channel_processor.ports import ComposeRequest

# The script returns the variables (or a whole Draft), or raises a ``channel_processor.errors``.
ComposerScript = Callable[[ComposeRequest, int], "Mapping[str, str] | Draft"]


def fill_template(request: ComposeRequest, call_number: int) -> dict[str, str]:
    """Default answer: a plausible non-empty value for each of the template's variables."""
    return {name: f"value {name}" for name in request.template.variables}


class FakeComposer:
    """Like the OpenAI composer: a thread id is made on the first call and reused when given."""

    def __init__(self, script: ComposerScript = fill_template) -> None:
        self.script = script
        self.requests: list[ComposeRequest] = []
        self._lock = threading.Lock()

    @property
    def calls(self) -> int:
        with self._lock:
            return len(self.requests)

    def compose(self, request: ComposeRequest) -> Draft:
        with self._lock:
            self.requests.append(request)
            call_number = len(self.requests)
        answer = self.script(request, call_number)
        if isinstance(answer, Draft):
            return answer
        variables = {str(k): v for k, v in answer.items()}
        return Draft(
            variables=variables,
            rendered=request.template.render(variables),
            thread_id=request.thread_id or f"conv_fake{call_number:04d}",
            response_id=f"resp_fake{call_number:04d}",
            model=request.model or "fake-model",
            prompt_tokens=10,
            completion_tokens=5,
            total_tokens=15,
        )
