"""Consul's templated policies (builtin/service, builtin/node, builtin/dns): named rule templates that tokens and
roles reference with variables, instead of a policy of their own.

Pure: it renders rules text from a template and variables; it never reads the store.
"""

from __future__ import annotations

import re
from typing import Any

from shipyard.errors import BadRequest

_NAME_SCHEMA = ('{\n  "type": "object",\n  "properties": {\n    "name": { "type": "string", "$ref": "#/definitions/'
                'min-length-one" }\n  },\n  "required": ["name"]\n}')
# name -> (description, schema or "", template with {{.Name}} for the variable)
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "builtin/service": (
        "Gives the token or role permissions to register a service and discover services in the Consul catalog.",
        _NAME_SCHEMA,
        'service "{{.Name}}" {\n  policy = "write"\n}\nservice "{{.Name}}-sidecar-proxy" {\n  policy = "write"\n}\n'
        'service_prefix "" {\n  policy = "read"\n}\nnode_prefix "" {\n  policy = "read"\n}',
    ),
    "builtin/node": (
        "Gives the token or role permissions for a register an agent/node into the catalog.",
        _NAME_SCHEMA,
        'node "{{.Name}}" {\n  policy = "write"\n}\nservice_prefix "" {\n  policy = "read"\n}',
    ),
    "builtin/dns": (
        "Gives the token or role permissions for the Consul DNS to query services in the network.",
        "",
        'node_prefix "" {\n  policy = "read"\n}\nservice_prefix "" {\n  policy = "read"\n}\n'
        'query_prefix "" {\n  policy = "read"\n}',
    ),
}
_VALID_NAME = re.compile(r"^[a-z0-9]([a-z0-9\-_]*[a-z0-9])?$")


def template_json(name: str) -> dict[str, Any]:
    description, schema, template = TEMPLATES[name]
    return {"TemplateName": name, "Schema": schema, "Template": template, "Description": description}


def variables_of(name: str, variables: Any) -> dict[str, str]:
    """The template's variables as Consul keeps them ({"name": ...}), checked; BadRequest otherwise."""
    if name not in TEMPLATES:
        raise BadRequest(f"templated policy {name!r} does not exist")
    if not TEMPLATES[name][1]:
        return {}
    value = {str(k).lower(): v for k, v in variables.items()}.get("name") if isinstance(variables, dict) else None
    if not isinstance(value, str) or not _VALID_NAME.match(value):
        raise BadRequest(f"templated policy {name!r} needs a valid name variable, got {value!r}")
    return {"name": value}


def render(name: str, variables: dict[str, str]) -> str:
    return TEMPLATES[name][2].replace("{{.Name}}", variables.get("name", ""))
