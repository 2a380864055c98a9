"""apply_records: grouping between barriers, LWW dedup, rejection without side effects."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
import orjson

from lhv_index import Limits
from worker.service.apply import apply_records
from worker.service.partition import Partition
from worker.wire.limits import MessageLimits
from worker.wire.topics import home_partition

Rec = namedtuple("Rec", "offset key value headers")

NAME = "docs"
P = 4
HOME = home_partition(NAME.encode(), P)


def _records(bodies: list[dict | bytes], *, key: str = NAME, headers=()) -> list[Rec]:
    out = []
    for i, body in enumerate(bodies):
        value = body if isinstance(body, bytes) else orjson.dumps({"index": key, **body})
        out.append(Rec(i, key.encode(), value, list(headers)))
    return out


def _apply(part: Partition, recs: list[Rec]):
    return apply_records(
        part, recs, num_partitions=P, limits=MessageLimits(), index_limits=Limits()
    )


def _add(*items: tuple[str, list[float]], **extra) -> dict:
    return {"op": "add", "items": [{"id": i, "vector": v, **extra} for i, v in items]}


def test_writes_between_barriers_apply_and_later_duplicates_win() -> None:
    part = Partition(number=HOME)
    outs = _apply(
        part,
        _records(
            [
                {"op": "create", "dim": 2, "space": "l2"},
                _add(("a", [1, 0]), ("b", [0, 1])),
                _add(("a", [5, 5])),
                {"op": "delete", "ids": ["b"]},
            ]
        ),
    )
    assert [o.error for o in outs] == [None] * 4
    state = part.indexes[NAME].logical_state()
    assert sorted(state["live"]) == ["a"]
    assert np.frombuffer(state["live"]["a"][0], dtype=np.float32).tolist() == [5, 5]
    assert part.applied_offset == 3
    assert NAME in part.dirty


def test_drop_then_create_in_one_poll_starts_empty() -> None:
    part = Partition(number=HOME)
    _apply(
        part,
        _records(
            [
                {"op": "create", "dim": 2},
                _add(("a", [1, 0])),
                {"op": "drop"},
                {"op": "create", "dim": 2},
                _add(("b", [0, 1])),
            ]
        ),
    )
    assert sorted(part.indexes[NAME].logical_state()["live"]) == ["b"]


def test_a_bad_record_is_rejected_whole_and_its_neighbours_apply() -> None:
    part = Partition(number=HOME)
    outs = _apply(
        part,
        _records(
            [
                {"op": "create", "dim": 2, "space": "cosine"},
                _add(("a", [1, 0])),
                _add(
                    ("b", [1, 0]), ("c", [0, 0])
                ),  # zero vector under cosine: whole record rejected
                b"{broken",
                _add(("d", [0, 1])),
            ]
        ),
    )
    codes = [o.error.code if o.error else None for o in outs]
    assert codes == [None, None, "invalid_request", "invalid_request", None]
    assert outs[2].error.item == 1
    assert sorted(part.indexes[NAME].logical_state()["live"]) == ["a", "d"]
    assert part.applied_offset == 4


def test_acked_records_report_which_items_won() -> None:
    part = Partition(number=HOME)
    headers = [("kafka_replyTopic", b"lhv.replies.t"), ("kafka_correlationId", b"c1")]
    outs = _apply(
        part,
        _records(
            [
                {"op": "create", "dim": 2, "space": "l2"},
                _add(("a", [1, 0]), ("b", [0, 1]), version=3),
                _add(("a", [2, 0]), version=1),  # older client version: skipped
            ],
            headers=headers,
        ),
    )
    assert (outs[1].applied, outs[1].skipped) == (2, 0)
    assert (outs[2].applied, outs[2].skipped) == (0, 1)


def test_records_for_an_index_homed_elsewhere_are_wrong_partition() -> None:
    part = Partition(number=(HOME + 1) % P)
    outs = _apply(part, _records([{"op": "create", "dim": 2, "request_id": "r-1"}]))
    assert outs[0].error is not None and outs[0].error.code == "wrong_partition"
    assert (outs[0].op, outs[0].index, outs[0].request_id) == ("create", NAME, "r-1")
    assert not part.indexes


def test_a_refused_record_is_acked_naming_its_op_and_index_when_they_can_be_read() -> None:
    part = Partition(number=HOME)
    outs = _apply(
        part,
        _records(
            [
                {"op": "merge", "dest": NAME},  # into itself
                {"op": "add", "items": [{"id": "a"}]},  # no vector
                {"op": "nope"},
                b"not json",
                orjson.dumps({"op": "add", "index": "x" * 5000}),
            ]
        ),
    )
    named = [(o.op, o.index, o.error.code if o.error else None) for o in outs]
    assert named == [
        ("merge", NAME, "invalid_request"),
        ("add", NAME, "invalid_request"),
        ("", NAME, "invalid_request"),
        ("", "", "invalid_request"),
        ("add", "", "invalid_request"),
    ]


def test_a_record_key_that_is_not_utf8_is_an_invalid_request_on_any_partition() -> None:
    value = orjson.dumps({"op": "create", "index": NAME, "dim": 2})
    for number in range(P):
        part = Partition(number=number)
        outs = _apply(part, [Rec(0, b"docs\xff", value, [])])
        assert outs[0].error is not None and outs[0].error.code == "invalid_request"
        assert "not UTF-8" in outs[0].error.message
        assert not part.indexes


def test_unknown_index_and_bad_create_are_rejected() -> None:
    part = Partition(number=HOME)
    outs = _apply(
        part,
        _records(
            [
                _add(("a", [1, 0])),
                {"op": "create", "dim": 2},
                {"op": "create", "dim": 3},
                {"op": "drop"},
                {"op": "drop"},
            ]
        ),
    )
    codes = [o.error.code if o.error else None for o in outs]
    assert codes == ["index_not_found", None, "index_exists", None, "index_not_found"]


def test_requests_over_the_bounds_are_invalid_request_and_the_partition_goes_on() -> None:
    part = Partition(number=HOME)
    deep: object = 1
    for _ in range(300):
        deep = {"a": deep}
    outs = _apply(
        part,
        _records(
            [
                {"op": "create", "dim": 2, "max_elements_hint": 2**32},
                {"op": "create", "dim": 2, "max_elements_hint": 5_000_000},
                {"op": "create", "dim": 2, "M": 4096},
                {"op": "create", "dim": 2, "space": "l2"},
                # orjson cannot write this metadata back: refused at decode, not `internal`
                b'{"op":"add","index":"docs","items":[{"id":"a","vector":[1,0],"metadata":'
                + b'{"a":' * 300
                + b"1"
                + b"}" * 300
                + b"}]}",
                _add(("b", [0, 1])),
            ]
        ),
    )
    codes = [o.error.code if o.error else None for o in outs]
    assert codes == ["invalid_request"] * 3 + [None, "invalid_request", None]
    assert "max_elements_hint 5000000 is over the limit of 1000000" in outs[1].error.message
    assert "items[0].metadata" in outs[4].error.message
    assert "32" in outs[4].error.message
    assert sorted(part.indexes[NAME].logical_state()["live"]) == ["b"]


def test_an_existing_index_created_over_todays_hint_limit_is_recreated_as_a_no_op() -> None:
    part = Partition(number=HOME)
    create = {"op": "create", "dim": 2, "max_elements_hint": 2_000}
    generous = apply_records(
        part,
        _records([create]),
        num_partitions=P,
        limits=MessageLimits(),
        index_limits=Limits(max_elements_hint=10_000),
    )
    assert generous[0].applied == 1
    again = apply_records(
        part,
        _records([create]),
        num_partitions=P,
        limits=MessageLimits(),
        index_limits=Limits(max_elements_hint=1_000),
    )
    assert again[0].error is None and again[0].skipped == 1


def test_the_applied_offset_never_runs_ahead_of_the_writes_in_the_index() -> None:
    """A query with `min_offset` checks the applied offset while a batch applies in a
    thread: the offset must not name a record whose write is not in its index yet."""
    part = Partition(number=HOME)
    _apply(part, _records([{"op": "create", "dim": 2, "space": "l2"}]))
    seen: list[int] = []

    def on_norms(_name: str, _norms: object) -> None:
        seen.append(part.applied_offset)  # called right after each group reaches the index

    recs = [Rec(i + 1, r.key, r.value, r.headers) for i, r in enumerate(
        _records([_add(("a", [1, 0])), _add(("b", [0, 1])), _add(("c", [1, 1]))])
    )]  # fmt: skip
    apply_records(
        part,
        recs,
        num_partitions=P,
        limits=MessageLimits(),
        index_limits=Limits(),
        on_norms=on_norms,
    )
    assert seen and all(offset < recs[0].offset for offset in seen)
    assert part.applied_offset == recs[-1].offset


def test_a_create_past_the_indexes_a_partition_may_hold_is_refused() -> None:
    """Every index holds memory however empty (hnswlib's locks): a partition holds at
    most `max_indexes`; a create past it is invalid_request and creates nothing, while
    re-creating an existing one stays a no-op and a drop makes room."""
    part = Partition(0)
    names = [n for n in (f"ix{i}" for i in range(200)) if home_partition(n.encode(), P) == 0][:3]

    offsets = iter(range(100))

    def record(name: str, **body: object) -> Rec:
        value = orjson.dumps({"index": name, **body})
        return Rec(next(offsets), name.encode(), value, [])

    def create(name: str) -> Rec:
        return record(name, op="create", dim=2)

    def apply(recs: list[Rec]) -> list:
        return apply_records(
            part,
            recs,
            num_partitions=P,
            limits=MessageLimits(),
            index_limits=Limits(),
            max_indexes=2,
        )

    first, second, third, again = apply([create(n) for n in (*names, names[0])])
    assert (first.applied, second.applied, again.skipped) == (1, 1, 1)
    assert third.error is not None and third.error.code == "invalid_request"
    assert "LHV_MAX_INDEXES_PER_PARTITION" in third.error.message
    assert set(part.indexes) == set(names[:2])
    dropped, created = apply([record(names[0], op="drop"), create(names[2])])
    assert dropped.applied == 1 and created.applied == 1
    assert set(part.indexes) == {names[1], names[2]}


def test_the_indexes_a_partition_may_hold_come_from_the_environment() -> None:
    from worker.service.config import WorkerConfig

    assert WorkerConfig.from_env({}).max_indexes_per_partition == 1000
    config = WorkerConfig.from_env({"LHV_MAX_INDEXES_PER_PARTITION": "7"})
    assert config.max_indexes_per_partition == 7
