"""Composer that needs no AI: each template variable is read from the Context Object by a
configured dotted path (or is a literal), so the embedded default runs without network."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any

from channel_processor.domain import Draft
from channel_processor.errors import ComposeFailed, ConfigurationError
from channel_processor.ports import ComposeRequest

LITERAL_PREFIX = "="

# The mapping the CLI uses when the local configuration gives none (a four-variable template:
# first name, company representative, company name, project name).
DEFAULT_MAPPING: Mapping[str, str] = {
    "1": "frontend_payload.recipient_data.recipient_first_name",
    "2": "company_data_payload.company_rep.company_rep_1",
    "3": "company_data_payload.company_name",
    "4": "company_data_payload.project_name",
}


class OfflineComposer:
    """``Composer`` by mapping: variable name -> dotted path in the Context Object, or ``=text``."""

    def __init__(self, mapping: Mapping[str, str]) -> None:
        bad = [str(name) for name, spec in mapping.items() if not isinstance(spec, str) or not spec]
        if bad:
            raise ConfigurationError(
                "offline composer mapping needs a non-empty path or '=literal' for: "
                + ", ".join(bad)
            )
        self._mapping = dict(mapping)

    def compose(self, request: ComposeRequest) -> Draft:
        template = request.template
        unmapped = [name for name in template.variables if name not in self._mapping]
        if unmapped:
            raise ComposeFailed(
                f"offline composer has no mapping for template {template.sid} variable(s): "
                + ", ".join(unmapped),
                code="offline_mapping_incomplete",
            )
        # A path that leads nowhere gives "": the pipeline's check rejects empty values with the
        # variable's name, which tells the operator which mapping entry is wrong.
        variables = {
            name: _resolve(request.context, self._mapping[name]) for name in template.variables
        }
        return Draft(
            variables=variables,
            rendered=template.render(variables),
            thread_id=None,
            response_id=None,
            model="offline",
        )


def _resolve(context: Mapping[str, Any], spec: str) -> str:
    if spec.startswith(LITERAL_PREFIX):
        return spec[len(LITERAL_PREFIX) :]
    node: Any = context
    for part in spec.split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, Sequence) and not isinstance(node, str) and part.isdigit():
            index = int(part)
            node = node[index] if index < len(node) else None
        else:
            return ""
        if node is None:
            return ""
    return _scalar_text(node)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Decimal):
        # DynamoDB hands numbers back as Decimal: 3 rather than "3.0" or "3E+0".
        return format(value.normalize(), "f") if value == value.to_integral() else str(value)
    if isinstance(value, str | int | float):
        return str(value)
    # An object or a list is no sentence fragment; "" makes the pipeline name the variable.
    return ""
