"""The published JSON Schemas (`schemas/`), loaded and compiled once for decoding."""

from __future__ import annotations

import copy
import importlib.util
import json
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import fastjsonschema

from lhv_index.errors import InvalidRequest
from worker.wire._body import _brief
from worker.wire.limits import COMMAND_OPS, QUERY_OPS

__all__ = ["SCHEMA_NAMES", "load_schema"]


#: every published schema file, `<name>.schema.json`
SCHEMA_NAMES = (*COMMAND_OPS, *QUERY_OPS, "command", "query", "reply", "ack", "dlq_headers")

#: `schemas/` of the source checkout this module sits in (worker/wire/schemas.py)
_CHECKOUT_SCHEMAS = Path(__file__).resolve().parents[2] / "schemas"

# -- schemas ------------------------------------------------------------------------------


def _schema_dir() -> Any:
    """Where the schema files are: the installed package `lhv_schemas`, else `schemas/`
    of the source checkout this module sits in.

    `lhv_schemas` is a namespace package (data only). Under an editable install its path
    also holds the installer's path hook, which `importlib.resources.files` cannot read on
    Python 3.11, so the real directories on its path are tried next.
    """
    try:
        installed = resources.files("lhv_schemas")
        if installed.joinpath("add.schema.json").is_file():
            return installed
    except (ImportError, OSError, TypeError, ValueError):
        pass
    try:
        spec = importlib.util.find_spec("lhv_schemas")
    except (ImportError, ValueError):
        spec = None
    for entry in (spec.submodule_search_locations or []) if spec is not None else []:
        if (Path(entry) / "add.schema.json").is_file():
            return Path(entry)
    return _CHECKOUT_SCHEMAS


def load_schema(name: str) -> dict[str, Any]:
    """One published schema, e.g. `load_schema("add")`."""
    text = _schema_dir().joinpath(f"{name}.schema.json").read_text(encoding="utf-8")
    return dict(json.loads(text))


def _runtime(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with the per-element vector checks left to `decode_*` (module doc)."""
    out = copy.deepcopy(schema)

    def relax(node: Any) -> None:
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and "vector_b64" in props:
                props["vector"] = {"type": "array", "minItems": 1}
                props["vector_b64"] = {"type": "string"}
                if "vectors" in props:
                    props["vectors"] = {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "array", "minItems": 1},
                    }
                    props["vectors_b64"] = {
                        "type": "array",
                        "minItems": 1,
                        "items": {"type": "string"},
                    }
                if node.get("oneOf") in _EXACTLY_ONE_VECTOR:
                    del node["oneOf"]
            for value in node.values():
                relax(value)
        elif isinstance(node, list):
            for value in node:
                relax(value)

    relax(out)
    return out


_EXACTLY_ONE_VECTOR = (
    [{"required": ["vector"]}, {"required": ["vector_b64"]}],
    [{"required": [name]} for name in ("vector", "vector_b64", "vectors", "vectors_b64")],
)

_VALIDATORS: dict[str, Callable[[Any], Any]] = {
    op: fastjsonschema.compile(_runtime(load_schema(op)), use_default=False)
    for op in (*COMMAND_OPS, *QUERY_OPS)
}
"""runtime validators by op; `use_default=False`: decoding never injects schema defaults"""


def _null_means_absent(schema: dict[str, Any]) -> frozenset[str]:
    """The optional top-level fields the schema lets be null: null there means absent."""
    required = set(schema.get("required", ()))
    out = set()
    for name, prop in schema["properties"].items():
        types = prop.get("type", ())
        if name not in required and ("null" in types or None in prop.get("enum", ())):
            out.add(name)
    return frozenset(out)


_NULLABLE: dict[str, frozenset[str]] = {
    op: _null_means_absent(load_schema(op)) for op in (*COMMAND_OPS, *QUERY_OPS)
}
"""by op, the optional fields whose null `_check` removes before validating"""


def _check(op: str, body: dict[str, Any]) -> None:
    """Validate `body` against the schema of `op`, after removing the optional fields
    that are null (null there means absent, so the decoders see only their defaults).

    Raises:
        InvalidRequest: naming the field the schema refused.
    """
    for name in _NULLABLE[op].intersection(body):
        if body[name] is None:
            del body[name]
    try:
        _VALIDATORS[op](body)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise _schema_error(op, exc) from None


def _schema_error(op: str, exc: fastjsonschema.JsonSchemaValueException) -> InvalidRequest:
    """`data.items[3].id must be ...` -> `add: items[3].id must be ...` with item=3."""
    name = str(exc.name or "data")
    label = name[5:] if name.startswith("data.") else "message"
    path = exc.path if isinstance(exc.path, list) else []
    item = None
    if len(path) >= 3 and path[1] in ("items", "ids") and str(path[2]).isdigit():
        item = int(path[2])
    if exc.rule == "additionalProperties" and isinstance(exc.value, dict):
        allowed = (exc.definition or {}).get("properties", {})
        unknown = _brief(
            ", ".join(_brief(k) for k in sorted(exc.value) if k not in allowed), 200, quote=False
        )
        return InvalidRequest(f"{op}: unknown field(s) {unknown} in {label}", item=item)
    message = str(exc.message)
    if message.startswith(name):
        message = label + message[len(name) :]
    return InvalidRequest(f"{op}: {message}", item=item)
