"""Limits on one wire message (`MessageLimits`) and the op names of the contract."""

from __future__ import annotations

from dataclasses import dataclass, fields

from lhv_index.errors import InvalidRequest

__all__ = [
    "COMMAND_OPS",
    "QUERY_OPS",
    "REPLY_TOO_LARGE",
    "MessageLimits",
    "reply_too_large",
    "too_many_together",
]


COMMAND_OPS = (
    "create",
    "drop",
    "add",
    "delete",
    "merge",
    "import",
    "merge_in",
    "merge_done",
    "alias",
    "unalias",
)
QUERY_OPS = ("search", "get", "stats", "describe")

#: what the refusal of a reply too large for one reply record says (`invalid_request`)
REPLY_TOO_LARGE = "bytes for one reply record"
#: the refusals of a search for its size as a whole, not for any one of its query vectors
_TOO_MANY_TOGETHER = ("(max_hits)", "(max_queries)", REPLY_TOO_LARGE)


def reply_too_large(what: str, size: int, limit: int, *, ask: str) -> InvalidRequest:
    """The refusal of a request whose reply would be over one reply record: `what` (e.g.
    "the items are") `size` bytes, over `limit`, and what to `ask` for less of."""
    return InvalidRequest(
        f"{what} {size} bytes, over the limit of {limit} {REPLY_TOO_LARGE}: ask for less ({ask})"
    )


def too_many_together(message: str) -> bool:
    """Whether an `invalid_request` message refuses a search for asking too much at once
    (hits, query vectors, reply bytes): the same searches sent in smaller groups can be
    answered. The client splits its coalesced searches on it."""
    return any(mark in message for mark in _TOO_MANY_TOGETHER)


_INT64_MAX = 2**63 - 1
#: orjson refuses to write values nested deeper than this (and to read past 1024)
_ORJSON_MAX_DEPTH = 254
#: the largest `max_shards`: shard numbers have at most four digits (`wire.shards`)
_MAX_SHARD_DIGITS_BOUND = 10_000


@dataclass(frozen=True, slots=True, kw_only=True)
class MessageLimits:
    """Limits on one wire message, checked before anything is applied."""

    max_message_bytes: int = 8 * 1024 * 1024
    """size of the record value"""
    max_items: int = 10_000
    """items of one `add`"""
    max_dim: int = 4096
    """length of one vector, and `dim` of `create`"""
    max_metadata_bytes: int = 65_536
    """one item's metadata, as compact JSON"""
    max_id_bytes: int = 512
    """one id, UTF-8"""
    max_k: int = 10_000
    """`k` of a search"""
    max_queries: int = 1_024
    """vectors of one multi-vector search (`vectors` / `vectors_b64`)"""
    max_hits: int = 100_000
    """hits of one search: `k` times its query vectors. One hit costs the worker over 100
    bytes while it is answered (its id and distance as objects, then its JSON), and a
    search's hits are computed before its reply can be found too large to send, so
    without this bound one small request of 1024 vectors and k 10000 holds over 1 GB"""
    max_ids: int = 10_000
    """ids of one `delete` or `get`"""
    max_get_vectors: int = 1_000
    """ids of one `get` that asks for vectors (`include_vectors`, the default): bounds
    the vectors one reply materializes (at most this many times `max_dim` floats)"""
    max_json_depth: int = 32
    """nesting of a message body: objects and arrays inside each other, the body itself
    counting as 1 (an `add` item's `metadata` may then be 29 levels deep counting itself,
    a search `filter` 31)"""
    max_filter_keys: int = 64
    """fields of one search `filter`"""
    max_filter_bytes: int = 16_384
    """one search `filter`, as compact JSON"""
    max_headers: int = 64
    """headers of one record"""
    max_header_bytes: int = 65_536
    """keys and values of one record's headers, together"""
    max_correlation_id_bytes: int = 1024
    """`kafka_correlationId`: it comes back in every reply and ack, twice"""
    max_shards: int = 1024
    """`shards` of one `create` (at most 10000: a member's name `NAME#s` has at most four
    digits)"""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if type(value) is not int or value < 1:
                raise ValueError(f"MessageLimits.{f.name} must be an integer of at least 1")
        if self.max_shards > _MAX_SHARD_DIGITS_BOUND:
            raise ValueError(
                f"MessageLimits.max_shards must be at most {_MAX_SHARD_DIGITS_BOUND} "
                "(a member index's name NAME#s has at most four digits)"
            )
        if self.max_json_depth > _ORJSON_MAX_DEPTH:
            raise ValueError(
                f"MessageLimits.max_json_depth must be at most {_ORJSON_MAX_DEPTH} "
                "(orjson's own limit when it writes JSON)"
            )


_DEFAULT_LIMITS = MessageLimits()
