"""Parsing one record value: size, nesting depth, JSON, and the small checks every message shares."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

from lhv_index.errors import InvalidRequest
from worker.wire.limits import MessageLimits

__all__: list[str] = []


# -- decoding -----------------------------------------------------------------------------


@contextmanager
def _request_faults() -> Iterator[None]:
    """Errors that only the request can cause, wherever decoding meets them, as
    `InvalidRequest` (the checks before them should have caught each; this is the net)."""
    try:
        yield
    except RecursionError:
        raise InvalidRequest("message is nested too deeply to decode (max_json_depth)") from None
    except UnicodeError:
        raise InvalidRequest("message holds text that is not valid UTF-8") from None


def _parse(value: bytes | None, limits: MessageLimits) -> dict[str, Any]:
    """The body as a dict, its nesting checked before anything else walks it."""
    if not value:
        raise InvalidRequest("empty message: a command or query is a JSON object")
    if len(value) > limits.max_message_bytes:
        raise InvalidRequest(
            f"message of {len(value)} bytes is over the limit of {limits.max_message_bytes}"
        )
    try:
        body = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        if str(exc).startswith("depth limit exceeded"):
            raise InvalidRequest(
                f"message is nested deeper than the limit of {limits.max_json_depth} levels "
                "(max_json_depth)"
            ) from None
        raise InvalidRequest(f"message is not valid JSON: {_brief(str(exc), 200)}") from None
    if not isinstance(body, dict):
        raise InvalidRequest(f"a message must be a JSON object, not {_json_type(body)}")
    _check_depth(body, limits.max_json_depth)
    return body


def _check_depth(body: dict[str, Any], max_depth: int) -> None:
    """Refuse a body with objects and arrays nested deeper than `max_depth` (the body is
    level 1), naming the field where it happens.

    Iterative, level by level: no recursion, whatever the input. Long flat arrays (vectors,
    ids) are passed over with one C-level scan of their element types.
    """
    level: list[Any] = [body]
    depth = 1
    while level:
        if depth > max_depth:
            where = _deep_path(body, max_depth)
            raise InvalidRequest(
                f"{where} is nested deeper than the limit of {max_depth} levels (max_json_depth)"
            )
        below: list[Any] = []
        for node in level:
            values = node.values() if type(node) is dict else node
            if len(values) > 8:
                kinds = set(map(type, values))
                if dict not in kinds and list not in kinds:
                    continue
            below.extend([v for v in values if type(v) is dict or type(v) is list])
        level = below
        depth += 1


def _deep_path(body: dict[str, Any], max_depth: int) -> str:
    """The path (`items[3].metadata`, at most 4 steps) to a container below `max_depth`;
    only called once `_check_depth` knows there is one."""
    stack: list[tuple[Any, int, str]] = [(body, 1, "")]
    while stack:
        node, depth, path = stack.pop()
        if depth > max_depth:
            return path.lstrip(".") or "message"
        children = node.items() if type(node) is dict else enumerate(node)
        for key, value in children:
            if type(value) is dict or type(value) is list:
                if depth > 4:
                    step = ""
                elif type(key) is int:
                    step = f"[{key}]"
                else:
                    step = f".{_brief(key, 40, quote=False)}"
                stack.append((value, depth + 1, path + step))
    return "message"


def _brief(value: Any, limit: int = 64, *, quote: bool = True) -> str:
    """`repr(value)` (or `str` with quote=False), cut to about `limit` characters: error
    messages name what is wrong without echoing a large request back."""
    text = repr(value) if quote else str(value)
    if len(text) <= limit:
        return text
    # a string's own length, not its repr's (quotes and escapes are not the user's)
    size = len(value) if isinstance(value, str) else len(text)
    return f"{text[:limit]}... ({size} characters)"


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _key_text(key: bytes) -> str:
    """A record key as text.

    Raises:
        InvalidRequest: the key is not UTF-8 (so it names no index).
    """
    try:
        return bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest(
            "the record key is not UTF-8: the key must be the index name"
        ) from None


def _check_key(key: bytes | None, index: str) -> None:
    if key is None:
        raise InvalidRequest("the record has no key: the key must be the index name")
    key_s = _key_text(key)
    if index != key_s:
        raise InvalidRequest(f"index {index!r} differs from the record key {_brief(key_s, 140)}")


def _int(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _check_ids(ids: list[str], limits: MessageLimits, op: str) -> list[str]:
    if len(ids) > limits.max_ids:
        raise InvalidRequest(f"{op}: {len(ids)} ids is over the limit {limits.max_ids}")
    max_id = limits.max_id_bytes
    for pos, id_ in enumerate(ids):
        if len(id_) * 4 > max_id and (size := len(id_.encode("utf-8"))) > max_id:
            raise InvalidRequest(
                f"{op}: ids[{pos}]: id of {size} bytes is over the limit {max_id} (max_id_bytes)",
                item=pos,
            )
    return ids
