"""The answers of a sharded index's members merged into one: the code both the Python
client and a home worker's gather use, so the two can never answer differently.

Every function here is pure (no I/O, no clock) and works on decoded reply bodies or on
hit rows `(id, distance, metadata)` (`lhv_index.Hit` is such a tuple).

- search: the members' hits are merged by `(distance, id)` and cut to `k`, so ties are
  broken by id whatever order the members answered in, and the answer is the exact top-k
  of the union (each member returned its own top-k).
- get: the members' items are put back in the order the ids were asked (an id asked
  twice comes twice, as an unsharded `get` answers).
- stats: `count` and `deleted` are summed; `shards` lists each member's own figures.

A member that did not answer (down, or too slow for the deadline) is *missing*:
`missing_error` is the `deadline_exceeded` that names them, or, when the requester
allowed it, the merged answer carries `partial: true` and `missing_shards`. An answer is
never silently short.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

from lhv_index.errors import DeadlineExceeded, LhvError, error_for_code
from worker.wire.shards import shard_key
from worker.wire.vectors import encode_vector_b64, vector_field

__all__ = [
    "HitRow",
    "MemberReply",
    "SearchMerge",
    "ShardsMissing",
    "hit_rows",
    "merge_get_items",
    "merge_get_reply",
    "merge_hits",
    "merge_search_reply",
    "merge_stats_reply",
    "missing_error",
    "partial_fields",
    "reply_error",
]

HitRow: TypeAlias = tuple[str, float, Any]
"""(id, distance, metadata or None): the shape of `lhv_index.Hit`"""

_Row = TypeVar("_Row", bound=tuple[str, float, Any])

MemberReply: TypeAlias = tuple[int, Mapping[str, Any]]
"""(shard, the member's decoded `status: ok` reply body)"""

#: the per-member figures a sharded `stats` lists under `shards`
_SHARD_STATS = ("partition", "count", "deleted", "applied_offset", "checkpoint_offset")


def _rank(row: tuple[str, float, Any]) -> tuple[float, str]:
    return (row[1], row[0])


def merge_hits(parts: Iterable[Iterable[_Row]], k: int) -> list[_Row]:
    """The `k` nearest of every member's hits, nearest first, ties by id (ascending)."""
    return heapq.nsmallest(k, (row for part in parts for row in part), key=_rank)


def hit_rows(body: Mapping[str, Any]) -> list[list[HitRow]]:
    """The hits of a search reply body, one list per query vector (`hits`: one list;
    `results` of a multi-vector search: one per entry)."""
    results = body.get("results")
    if results is None:
        return [[(h["id"], float(h["distance"]), h.get("metadata")) for h in body["hits"]]]
    out: list[list[HitRow]] = []
    for r in results:
        meta = r.get("metadata")
        ids, dists = r["ids"], r["distances"]
        out.append(
            [
                (ids[i], float(dists[i]), meta[i] if meta is not None else None)
                for i in range(len(ids))
            ]
        )
    return out


def _hit_vectors(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """id -> stored vector of the hits of a search reply body asked with include_vectors,
    one dict per query vector (as `hit_rows`)."""
    results = body.get("results")
    if results is None:
        return [{h["id"]: h.get("vector") for h in body["hits"]}]
    out = []
    for r in results:
        vectors = r.get("vectors") or [None] * len(r["ids"])
        out.append(dict(zip(r["ids"], vectors, strict=False)))
    return out


def partial_fields(missing: Sequence[int]) -> dict[str, Any]:
    """What a merged reply adds about members that did not answer (nothing when all did)."""
    if not missing:
        return {}
    return {"partial": True, "missing_shards": sorted(missing)}


class ShardsMissing(DeadlineExceeded):
    """Members of a sharded index did not answer by the deadline (wire code
    `deadline_exceeded`; the message names them, `missing_shards` lists them)."""

    def __init__(self, message: str, *, missing_shards: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.missing_shards = sorted(missing_shards)


def missing_error(name: str, missing: Sequence[int], shards: int) -> ShardsMissing:
    """The error of a gather whose members `missing` did not answer by the deadline."""
    return ShardsMissing(
        f"shards {sorted(missing)} of {shards} of index {name!r} did not answer by the "
        "deadline (ask with allow_partial for the answer of the others)",
        missing_shards=missing,
    )


def reply_error(body: Mapping[str, Any]) -> LhvError | None:
    """The `LhvError` of a `status: error` reply body; None for `status: ok`."""
    if body.get("status") != "error":
        return None
    err = body.get("error") or {}
    exc = error_for_code(str(err.get("code", "internal")), str(err.get("message", "")))
    item = err.get("item")
    if isinstance(item, int):
        exc.item = item
    return exc


def _applied(name: str, shards: int, answers: Sequence[MemberReply]) -> dict[str, int]:
    return {
        shard_key(name, s, shards): int(body["applied_offset"])
        for s, body in sorted(answers, key=lambda a: a[0])
        if isinstance(body.get("applied_offset"), int)
    }


class SearchMerge:
    """The merge of a sharded search's member replies, one member at a time: after each
    `add`, only the `k` nearest hits of each query vector are kept (with their metadata
    and vectors), so whoever gathers holds one member's reply beside the answer so far,
    never every member's at once.

    Arguments:
        k: hits per query vector.
        queries: query vectors asked (a member that answered more rows adds rows).
        include_vectors: keep the vector each member sent with its hits.
    """

    def __init__(self, *, k: int, queries: int = 1, include_vectors: bool = False) -> None:
        self._k = k
        self._include_vectors = include_vectors
        self._rows: list[list[HitRow]] = [[] for _ in range(queries)]
        self._vectors: list[dict[str, Any]] = [{} for _ in range(queries)]
        self._applied: dict[int, int] = {}

    def add(self, shard: int, body: Mapping[str, Any]) -> None:
        """Fold in member `shard`'s `status: ok` reply body."""
        rows = hit_rows(body)
        for _ in range(len(rows) - len(self._rows)):
            self._rows.append([])
            self._vectors.append({})
        for i, part in enumerate(rows):
            self._rows[i] = merge_hits((self._rows[i], part), self._k)
        if self._include_vectors:
            # an id lives on one member: the members' vectors never overlap
            for i, found in enumerate(_hit_vectors(body)[: len(self._rows)]):
                kept = {r[0] for r in self._rows[i]}
                stored = {id_: v for id_, v in self._vectors[i].items() if id_ in kept}
                stored.update((id_, v) for id_, v in found.items() if id_ in kept)
                self._vectors[i] = stored
        if isinstance(body.get("applied_offset"), int):
            self._applied[shard] = int(body["applied_offset"])

    def reply(
        self,
        name: str,
        shards: int,
        *,
        multi: bool,
        include_metadata: bool,
        missing: Sequence[int] = (),
        vector_encoding: str = "json",
    ) -> dict[str, Any]:
        """The reply body of what was added (see `merge_search_reply`)."""
        merged, stored = self._rows, self._vectors
        include_vectors = self._include_vectors
        if vector_encoding == "b64":
            stored = [
                {id_: None if vec is None else encode_vector_b64(vec) for id_, vec in row.items()}
                for row in stored
            ]
        out: dict[str, Any] = {"status": "ok", "op": "search", "index": name}
        if multi:
            results = []
            for i, rows in enumerate(merged):
                entry: dict[str, Any] = {
                    "ids": [r[0] for r in rows],
                    "distances": [r[1] for r in rows],
                }
                if include_metadata:
                    entry["metadata"] = [r[2] for r in rows]
                if include_vectors:
                    entry[vector_field("vectors", vector_encoding)] = [
                        stored[i].get(r[0]) for r in rows
                    ]
                results.append(entry)
            out["results"] = results
        else:
            rows = merged[0] if merged else []
            hits: list[dict[str, Any]] = [{"id": r[0], "distance": r[1]} for r in rows]
            if include_metadata:
                for hit, r in zip(hits, rows, strict=True):
                    hit["metadata"] = r[2]
            if include_vectors:
                for hit in hits:
                    hit[vector_field("vector", vector_encoding)] = stored[0].get(hit["id"])
            out["hits"] = hits
        applied = {shard_key(name, s, shards): o for s, o in sorted(self._applied.items())}
        out["applied_offset"] = min(applied.values(), default=-1)
        out["applied_offsets"] = applied
        out.update(partial_fields(missing))
        return out


def merge_search_reply(
    name: str,
    shards: int,
    answers: Sequence[MemberReply],
    *,
    k: int,
    multi: bool,
    include_metadata: bool,
    include_vectors: bool = False,
    missing: Sequence[int] = (),
    queries: int = 1,
    vector_encoding: str = "json",
) -> dict[str, Any]:
    """The body (without `correlation_id`, `took_ms`, `request_id`) of the one reply to a
    search of `queries` vectors of sharded `name`, from its members' `status: ok` replies
    (a multi-vector search gets one `results` entry per vector, empty when no member
    answered). With `include_vectors`, each hit keeps the vector its member sent (as JSON
    floats), sent as base64 of little-endian float32 when `vector_encoding` is "b64".

    `applied_offsets` names each member's applied offset; `applied_offset` is the lowest
    of them (-1 when no member answered). The same as adding each answer to a
    `SearchMerge`."""
    merge = SearchMerge(k=k, queries=queries, include_vectors=include_vectors)
    for shard, body in answers:
        merge.add(shard, body)
    return merge.reply(
        name,
        shards,
        multi=multi,
        include_metadata=include_metadata,
        missing=missing,
        vector_encoding=vector_encoding,
    )


def merge_get_items(
    ids: Sequence[str], parts: Iterable[Iterable[Mapping[str, Any]]]
) -> list[Mapping[str, Any]]:
    """The members' `items` back in the order of `ids` (an id asked twice comes twice;
    ids no member has live are left out)."""
    by_id: dict[str, Mapping[str, Any]] = {}
    for items in parts:
        for item in items:
            by_id[item["id"]] = item
    return [by_id[i] for i in ids if i in by_id]


def merge_get_reply(
    name: str,
    shards: int,
    ids: Sequence[str],
    answers: Sequence[MemberReply],
    *,
    missing: Sequence[int] = (),
) -> dict[str, Any]:
    """The body of the one reply to a get of sharded `name` (see `merge_search_reply`)."""
    applied = _applied(name, shards, answers)
    out: dict[str, Any] = {
        "status": "ok",
        "op": "get",
        "index": name,
        "items": merge_get_items(ids, (body.get("items") or () for _, body in answers)),
        "applied_offset": min(applied.values(), default=-1),
        "applied_offsets": applied,
    }
    out.update(partial_fields(missing))
    return out


def merge_stats_reply(
    name: str, shards: int, answers: Sequence[MemberReply], *, missing: Sequence[int] = ()
) -> dict[str, Any]:
    """The body of the one reply to stats of sharded `name`: `count` and `deleted` summed,
    the index's parameters (from any member), and `shards`: each member's `shard`,
    `partition`, `count`, `deleted`, `applied_offset`, `checkpoint_offset`.

    `applied_offset` and `checkpoint_offset` at the top are the lowest of the members'
    (-1 when no member answered), `applied_offsets` each member's, as a search's."""
    ordered = sorted(answers, key=lambda a: a[0])
    out: dict[str, Any] = {"status": "ok", "op": "stats", "index": name}
    if ordered:
        first = ordered[0][1]
        for key in ("dim", "space", "engine", "params"):
            if key in first:
                out[key] = first[key]
    out["count"] = sum(int(body.get("count", 0)) for _, body in ordered)
    out["deleted"] = sum(int(body.get("deleted", 0)) for _, body in ordered)
    out["num_shards"] = shards
    breakdown = []
    for s, body in ordered:
        row: dict[str, Any] = {"shard": s}
        row.update({key: body[key] for key in _SHARD_STATS if key in body})
        breakdown.append(row)
    out["shards"] = breakdown
    applied = _applied(name, shards, answers)
    out["applied_offset"] = min(applied.values(), default=-1)
    out["applied_offsets"] = applied
    checkpoints = [
        b["checkpoint_offset"] for _, b in ordered if type(b.get("checkpoint_offset")) is int
    ]
    out["checkpoint_offset"] = min(checkpoints, default=-1)
    out.update(partial_fields(missing))
    return out
