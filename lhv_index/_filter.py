"""Equality filters on metadata: `{field: value, ...}`, every field must match.

Values compare as JSON values: `1 == 1.0`, but `true != 1` and `"1" != 1`. Metadata is kept
serialized, so a cheap byte test (the field name and the value, as orjson writes them, must
both occur in the stored bytes) rules most items out before any is parsed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from lhv_index.errors import InvalidRequest

__all__ = ["Matcher", "compile_filter", "filter_key", "json_equal"]

Matcher = Callable[[bytes], bool]
"""Does one item's serialized metadata match the filter?"""


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values (bool is not a number; 1 equals 1.0)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)


def filter_key(flt: dict[str, Any]) -> bytes:
    """A canonical form of a filter (cache key).

    Raises:
        InvalidRequest: the filter is not a JSON object.
    """
    if not isinstance(flt, dict):
        raise InvalidRequest(f"filter must be a JSON object, got {type(flt).__name__}")
    try:
        return orjson.dumps(flt, option=orjson.OPT_SORT_KEYS)
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise InvalidRequest(f"filter is not valid JSON: {exc}") from None


def compile_filter(flt: dict[str, Any]) -> Matcher:
    """A matcher for a non-empty filter (validate it with `filter_key` first)."""
    needles: list[bytes] = []
    for name, value in flt.items():
        needles.append(orjson.dumps(name))
        if isinstance(value, str | bool) or value is None:
            needles.append(orjson.dumps(value))
        elif isinstance(value, int) and abs(value) < 10**15:
            # a float equal to it is written with the same digits below 1e16
            needles.append(str(abs(value)).encode())
    items = list(flt.items())

    def match(blob: bytes) -> bool:
        for needle in needles:
            if needle not in blob:
                return False
        meta = orjson.loads(blob)
        for name, value in items:
            if name not in meta or not json_equal(meta[name], value):
                return False
        return True

    return match
