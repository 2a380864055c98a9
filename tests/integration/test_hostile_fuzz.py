"""A hostile producer against one running worker, for a bounded time.

Records are drawn with hypothesis: valid commands, commands that are invalid by
construction (random bytes, JSON of the wrong shape, a valid command with one mutation
that the contract rejects, a wrong partition, deep nesting, a compression bomb), hostile
headers, and queries both good and bad. They are produced in rounds, plain and
compressed with each codec Kafka has, until `LHV_FUZZ_SECONDS` (default 90) have passed. Then:

- the worker process never exited;
- every invalid command is in the dead-letter queue, and nothing else is;
- every command that asked for an acknowledgement on a legal reply topic got one, `ok`
  exactly for the valid ones; every query that asked for a reply got exactly one, `ok`
  exactly for the valid ones;
- nothing was written to the commands topic but what the test produced;
- after a graceful stop, a fresh worker restores from S3 and its state equals the oracle
  built from the valid commands alone.

The seed of each round is printed, so a failure can be replayed with
`LHV_FUZZ_SEED=<seed>`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from workerkit import (
    Env,
    WorkerProcess,
    all_indexes,
    assert_state_matches,
    create_topics,
    end_offsets,
    home_partition,
    index_names,
    make_env,
    oracle_from_records,
    read_all,
    running,
    wait_caught_up,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")

FUZZ_SECONDS = float(os.environ.get("LHV_FUZZ_SECONDS", "90"))
ROUND_RECORDS = 120
DIM = 4
PARTITIONS = 3
ID_POOL = [f"id-{i}" for i in range(40)]

# -- what the test produced ------------------------------------------------------------------


@dataclass(slots=True)
class Produced:
    """One record as the test meant it."""

    topic: str  # "commands" or "search"
    key: bytes | None
    value: bytes | None
    valid: bool
    """a command the contract accepts / a query that must be answered `ok`"""
    what: str
    partition: int | None = None
    """forced partition (None: the key's home)"""
    headers: list[tuple[str, bytes]] = field(default_factory=list)
    expects_reply: bool = False
    """it names a legal reply topic and a correlation id: exactly one reply is owed"""
    codec: str | None = None
    """compression of its batch: None, gzip, snappy, lz4 or zstd"""
    cid: bytes = b""
    offset: int = -1
    placed: int = -1


# -- strategies ------------------------------------------------------------------------------


def _b64(values: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


finite = st.floats(min_value=-8.0, max_value=8.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def vectors(draw: st.DrawFn) -> list[float]:
    values = draw(st.lists(finite, min_size=DIM, max_size=DIM))
    values[0] = 1.0 + abs(values[0])  # never the zero vector (cosine refuses it)
    return values


@st.composite
def items(draw: st.DrawFn) -> dict[str, Any]:
    item: dict[str, Any] = {"id": draw(st.sampled_from(ID_POOL))}
    v = draw(vectors())
    if draw(st.booleans()):
        item["vector"] = v
    else:
        item["vector_b64"] = _b64(v)
    meta = draw(st.integers(0, 4))
    if meta == 1:
        item["metadata"] = {"tag": draw(st.sampled_from("abc")), "n": draw(st.integers(0, 9))}
    elif meta == 2:
        item["metadata"] = {}
    elif meta == 3:
        item["metadata"] = None
    if draw(st.booleans()):
        item["version"] = draw(st.integers(0, 4))
    return item


def _valid_command(names: list[str], spaces: dict[str, str]) -> st.SearchStrategy[dict[str, Any]]:
    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        name = draw(st.sampled_from(names))
        kind = draw(st.sampled_from(["add", "add", "add", "delete", "create"]))
        if kind == "add":
            return {
                "op": "add",
                "index": name,
                "items": draw(st.lists(items(), min_size=1, max_size=5)),
            }
        if kind == "delete":
            cmd: dict[str, Any] = {
                "op": "delete",
                "index": name,
                "ids": draw(st.lists(st.sampled_from(ID_POOL), min_size=1, max_size=4)),
            }
            if draw(st.booleans()):
                cmd["version"] = draw(st.integers(0, 4))
            return cmd
        return {"op": "create", "index": name, "dim": DIM, "space": spaces[name]}

    return build()


def _deep(depth: int) -> Any:
    node: Any = 1
    for _ in range(depth):
        node = {"x": node}
    return node


#: one mutation each, every one rejected by the contract (DESIGN 3 and the schemas)
MUTATIONS = [
    "unknown_op",
    "no_op",
    "extra_field",
    "key_differs",
    "wrong_dim",
    "nan_b64",
    "inf_b64",
    "empty_id",
    "long_id",
    "metadata_list",
    "deep_metadata",
    "negative_version",
    "huge_version",
    "string_in_vector",
    "both_vectors",
    "unknown_index",
    "create_other_params",
]


def _mutate(cmd: dict[str, Any], how: str, name: str) -> tuple[bytes | None, dict[str, Any]]:
    """(key, body) of `cmd` (an add to `name`) changed by `how`."""
    key: bytes | None = name.encode()
    body = orjson.loads(orjson.dumps(cmd))
    item = body["items"][0]
    if how == "unknown_op":
        body["op"] = "explode"
    elif how == "no_op":
        del body["op"]
    elif how == "extra_field":
        body["surprise"] = True
    elif how == "key_differs":
        key = (name + "-x").encode()
    elif how == "wrong_dim":
        item.pop("vector_b64", None)
        item["vector"] = [1.0] * (DIM + 1)
    elif how == "nan_b64":
        item.pop("vector", None)
        item["vector_b64"] = _b64([1.0, float("nan"), 0.0, 0.0])
    elif how == "inf_b64":
        item.pop("vector", None)
        item["vector_b64"] = _b64([1.0, float("inf"), 0.0, 0.0])
    elif how == "empty_id":
        item["id"] = ""
    elif how == "long_id":
        item["id"] = "i" * 600
    elif how == "metadata_list":
        item["metadata"] = [1, 2]
    elif how == "deep_metadata":
        item["metadata"] = _deep(300)
    elif how == "negative_version":
        item["version"] = -1
    elif how == "huge_version":
        item["version"] = 2**64
    elif how == "string_in_vector":
        item.pop("vector_b64", None)
        item["vector"] = [1.0, "x", 0.0, 0.0]
    elif how == "both_vectors":
        item["vector"] = [1.0, 0.0, 0.0, 0.0]
        item["vector_b64"] = _b64([1.0, 0.0, 0.0, 0.0])
    elif how == "unknown_index":
        body["index"] = "nobody-" + name
        key = body["index"].encode()
    elif how == "create_other_params":
        body = {"op": "create", "index": name, "dim": DIM + 1}
    return key, body


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6).filter(lambda k: k != "op"), inner, max_size=4)
    ),
    max_leaves=12,
)


def _encode(body: Any) -> bytes:
    try:
        return orjson.dumps(body)
    except TypeError:  # past orjson's nesting or integer range: the standard encoder
        return json.dumps(body).encode()


class Fuzz:
    """Draws records for one round."""

    def __init__(self, env: Env, names: list[str], spaces: dict[str, str], reply: str) -> None:
        self.env = env
        self.names = names
        self.spaces = spaces
        self.reply = reply

    def headers(self, draw: st.DrawFn, rec: Produced) -> None:
        """Hostile or friendly headers; sets `expects_reply` when a reply is owed."""
        cid = uuid.uuid4().hex.encode()
        rec.cid = cid
        r = draw(st.integers(0, 99)) / 100
        if r < 0.45:
            rec.headers = [("kafka_replyTopic", self.reply.encode()), ("kafka_correlationId", cid)]
            rec.expects_reply = True
        elif r < 0.52:  # a reply topic the pattern forbids: the worker must not write there
            rec.headers = [
                ("kafka_replyTopic", self.env.topics.commands.encode()),
                ("kafka_correlationId", cid),
            ]
        elif r < 0.57:  # a reply partition the reply topic does not have
            rec.headers = [
                ("kafka_replyTopic", self.reply.encode()),
                ("kafka_correlationId", cid),
                ("kafka_replyPartition", struct.pack(">i", 7)),
            ]
        elif r < 0.62:  # unreadable reply headers: the request is malformed, rejected whole
            rec.headers = [
                ("kafka_replyTopic", b"\xff" + draw(st.binary(min_size=11, max_size=11))),
                ("kafka_replyPartition", b"\xff\xff"),
            ]
            rec.valid = False
        elif r < 0.66:  # many small headers
            rec.headers = [(f"h{i}", b"v") for i in range(60)]

    def command(self, draw: st.DrawFn) -> Produced:
        kind = draw(
            st.sampled_from(["valid"] * 6 + ["mutated"] * 3 + ["bytes", "json", "wrong_partition"])
        )
        name = draw(st.sampled_from(self.names))
        if kind == "valid":
            cmd = draw(_valid_command(self.names, self.spaces))
            rec = Produced("commands", cmd["index"].encode(), orjson.dumps(cmd), True, "valid")
        elif kind == "mutated":
            how = draw(st.sampled_from(MUTATIONS))
            base = {
                "op": "add",
                "index": name,
                "items": draw(st.lists(items(), min_size=1, max_size=3)),
            }
            if how == "create_other_params" or self.spaces[name] != "cosine" or draw(st.booleans()):
                key, body = _mutate(base, how, name)
            else:  # the zero vector under cosine
                how = "zero_vector_cosine"
                base["items"][0].pop("vector_b64", None)
                base["items"][0]["vector"] = [0.0] * DIM
                key, body = name.encode(), base
            rec = Produced("commands", key, _encode(body), False, how)
        elif kind == "bytes":
            value = draw(st.binary(min_size=0, max_size=64))
            rec = Produced("commands", name.encode(), value or None, False, "bytes")
        elif kind == "json":
            body = draw(json_values)
            rec = Produced("commands", name.encode(), _encode(body), False, "json")
        else:
            cmd = draw(_valid_command(self.names, self.spaces))
            home = home_partition(cmd["index"].encode(), PARTITIONS)
            rec = Produced(
                "commands",
                cmd["index"].encode(),
                orjson.dumps(cmd),
                False,
                "wrong_partition",
                partition=(home + 1) % PARTITIONS,
            )
        self.headers(draw, rec)
        rec.codec = draw(st.sampled_from([None, None, None, None, "gzip", "snappy", "lz4", "zstd"]))
        return rec

    def query(self, draw: st.DrawFn) -> Produced:
        name = draw(st.sampled_from(self.names))
        kind = draw(st.sampled_from(["search", "search", "get", "stats", "bad", "bad", "bytes"]))
        valid = kind in ("search", "get", "stats")
        if kind == "search":
            body: Any = {"index": name, "vector": draw(vectors()), "k": draw(st.integers(1, 5))}
            if draw(st.booleans()):
                body["filter"] = {"tag": draw(st.sampled_from("abc"))}
        elif kind == "get":
            body = {
                "op": "get",
                "index": name,
                "ids": draw(st.lists(st.sampled_from(ID_POOL), min_size=1, max_size=3)),
            }
        elif kind == "stats":
            body = {"op": "stats", "index": name}
        elif kind == "bad":
            how = draw(
                st.sampled_from(["dim", "k0", "deep_filter", "unknown_index", "extra", "nan"])
            )
            body = {"index": name, "vector": [1.0] * DIM, "k": 3}
            if how == "dim":
                body["vector"] = [1.0] * (DIM + 2)
            elif how == "k0":
                body["k"] = 0
            elif how == "deep_filter":
                body["filter"] = _deep(300)
            elif how == "unknown_index":
                body["index"] = "nobody-" + name
            elif how == "extra":
                body["surprise"] = 1
            else:
                body.pop("vector")
                body["vector_b64"] = _b64([1.0, float("nan"), 0.0, 0.0])
        else:
            body = None
        value = _encode(body) if body is not None else draw(st.binary(max_size=48))
        key = (body["index"] if isinstance(body, dict) else name).encode()
        rec = Produced("search", key, value, valid, f"query:{kind}")
        cid = uuid.uuid4().hex.encode()
        rec.cid = cid
        rec.headers = [("kafka_replyTopic", self.reply.encode()), ("kafka_correlationId", cid)]
        rec.expects_reply = True
        return rec


def draw_round(fuzz: Fuzz, round_seed: int, n: int) -> list[Produced]:
    """`n` records drawn by hypothesis (generation only: each example is one record)."""
    out: list[Produced] = []

    @seed(round_seed)
    @settings(
        max_examples=n,
        phases=[Phase.generate],
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(st.data())
    def collect(data: st.DataObject) -> None:
        if data.draw(st.integers(0, 3)):
            out.append(fuzz.command(data.draw))
        else:
            out.append(fuzz.query(data.draw))

    collect()
    return out


def _bomb(name: str, codec: str) -> Produced:
    """An add whose value inflates from a few KB on the wire to 20 MiB: over the size limit."""
    pad = "a" * (20 * 1024 * 1024)
    body = orjson.dumps(
        {
            "op": "add",
            "index": name,
            "items": [{"id": "bomb", "vector": [1.0] * DIM, "metadata": {"p": pad}}],
        }
    )
    return Produced("commands", name.encode(), body, False, f"{codec} bomb", codec=codec)


def _create(name: str, space: str, reply: str, what: str) -> Produced:
    """An acknowledged create (identical params: a no-op after the first)."""
    cid = f"{what}-{name}-{uuid.uuid4().hex[:6]}".encode()
    return Produced(
        "commands",
        name.encode(),
        orjson.dumps({"op": "create", "index": name, "dim": DIM, "space": space}),
        True,
        what,
        headers=[("kafka_replyTopic", reply.encode()), ("kafka_correlationId", cid)],
        expects_reply=True,
        cid=cid,
    )


# -- producing -------------------------------------------------------------------------------


async def _produce(env: Env, records: list[Produced]) -> None:
    """Produce `records` (each with its codec) and note where each landed."""
    producers: dict[str | None, AIOKafkaProducer] = {}
    try:
        futures = []
        for rec in records:
            producer = producers.get(rec.codec)
            if producer is None:
                producer = producers[rec.codec] = AIOKafkaProducer(
                    bootstrap_servers=env.bootstrap,
                    acks="all",
                    compression_type=rec.codec,
                    max_request_size=64 << 20,
                )
                await producer.start()
            topic = env.topics.commands if rec.topic == "commands" else env.topics.search
            if rec.partition is not None:
                partition = rec.partition
            else:
                partition = home_partition(rec.key, PARTITIONS) if rec.key is not None else 0
            futures.append(
                await producer.send(
                    topic, key=rec.key, value=rec.value, partition=partition, headers=rec.headers
                )
            )
        for rec, meta in zip(records, await asyncio.gather(*futures), strict=True):
            rec.offset = meta.offset
            rec.placed = meta.partition
    finally:
        for producer in producers.values():
            await producer.stop()


# -- the test --------------------------------------------------------------------------------


async def test_a_hostile_producer_never_stops_the_worker_and_loses_nothing(
    bootstrap_servers: str, s3_config, tmp_path: Path
) -> None:
    env = await make_env(bootstrap_servers, s3_config, partitions=PARTITIONS)
    reply = f"lhv.replies.fuzz-{env.group}"
    await create_topics(env.bootstrap, [reply], 1)
    names = index_names(4, PARTITIONS)
    spaces = {n: ("cosine", "l2", "ip")[i % 3] for i, n in enumerate(names)}
    fuzz = Fuzz(env, names, spaces, reply)
    creates = [_create(n, spaces[n], reply, "create") for n in names]
    produced: list[Produced] = []
    proc = WorkerProcess(env.child_env(), tmp_path / "worker.log")
    try:
        await _produce(env, creates)
        produced += creates
        await _wait_replies(env, reply, {c.cid for c in creates}, proc)
        base_seed = int(os.environ.get("LHV_FUZZ_SEED", random.randrange(2**32)))
        print(f"fuzz seed {base_seed}")
        started = time.monotonic()
        rounds = 0
        while time.monotonic() - started < FUZZ_SECONDS:
            batch = draw_round(fuzz, base_seed + rounds, ROUND_RECORDS)
            if rounds in (1, 2):
                batch.append(_bomb(names[0], "gzip" if rounds == 1 else "zstd"))
            await _produce(env, batch)
            produced += batch
            rounds += 1
            assert proc.proc.poll() is None, (
                f"the worker exited (code {proc.proc.returncode}) in round {rounds} "
                f"(seed {base_seed + rounds - 1}):\n{proc.log_text()[-4000:]}"
            )
            await asyncio.sleep(0.2)
        # One acknowledged no-op per partition: when all are acked, everything before is done.
        fences = [_create(n, spaces[n], reply, "fence") for n in names]
        await _produce(env, fences)
        produced += fences
        owed = {r.cid: r for r in produced if r.expects_reply}
        replies = await _wait_replies(env, reply, {f.cid for f in fences}, proc)
        assert proc.proc.poll() is None, f"the worker exited:\n{proc.log_text()[-4000:]}"
    finally:
        code = proc.terminate()
    assert code == 0, f"the worker did not stop cleanly ({code}):\n{proc.log_text()[-4000:]}"
    log = proc.log_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000 :][:6000]

    # Acks and replies: exactly one per owed request, `ok` exactly for the valid ones.
    replies = await _all_replies(env, reply)
    for cid, rec in owed.items():
        got = replies.get(cid, [])
        assert got, f"no reply for a {rec.what} {rec.topic} record at {rec.placed}/{rec.offset}"
        statuses = {g.get("status") for g in got}
        if rec.topic == "search":
            assert len(got) == 1, f"{len(got)} replies for one {rec.what} query"
        want = "ok" if rec.valid else "error"
        assert statuses == {want}, (
            f"{rec.what} {rec.topic} record at {rec.placed}/{rec.offset}: got {got[0]}"
        )
    unowed = set(replies) - set(owed)
    assert not unowed, f"replies nobody asked for on {reply}: {sorted(unowed)[:5]}"

    # The dead-letter queue holds exactly the invalid commands.
    commands = [r for r in produced if r.topic == "commands"]
    dlq = await read_all(env.bootstrap, env.topics.dlq)
    dead = {
        (int(dict(r.headers)["lhv_source_partition"]), int(dict(r.headers)["lhv_source_offset"]))
        for r in dlq
    }
    invalid = {(r.placed, r.offset) for r in commands if not r.valid}
    valid = {(r.placed, r.offset): r for r in commands if r.valid}
    errors = {
        (int(dict(r.headers)["lhv_source_partition"]), int(dict(r.headers)["lhv_source_offset"])): (
            dict(r.headers)["lhv_error_message"].decode()
        )
        for r in dlq
    }
    wrongly = sorted(dead & set(valid))
    assert not wrongly, [(valid[k].what, valid[k].value[:200], errors[k]) for k in wrongly][:5]
    missing = invalid - dead
    assert not missing, [
        next(r.what for r in commands if (r.placed, r.offset) == k) for k in sorted(missing)
    ][:10]

    # Nothing but the test's own records went to the commands topic.
    ends = await end_offsets(env.bootstrap, env.topics.commands)
    assert sum(ends.values()) == len(commands)

    # A fresh worker restores from S3 (and replays): the state equals the valid records'.
    oracle = oracle_from_records(
        SimpleNamespace(value=r.value, offset=r.offset)
        for r in sorted(commands, key=lambda r: (r.placed, r.offset))
        if r.valid
    )
    async with running(env.config()) as w:
        await wait_caught_up([w], env.bootstrap, env.topics.commands)
        assert_state_matches(all_indexes([w]), oracle)


async def _all_replies(env: Env, topic: str) -> dict[bytes, list[dict[str, Any]]]:
    out: dict[bytes, list[dict[str, Any]]] = {}
    for rec in await read_all(env.bootstrap, topic, timeout_s=60):
        cid = dict(rec.headers).get("kafka_correlationId", rec.key or b"")
        out.setdefault(bytes(cid), []).append(orjson.loads(rec.value))
    return out


async def _wait_replies(
    env: Env, topic: str, cids: set[bytes], proc: WorkerProcess, timeout_s: float = 180.0
) -> dict[bytes, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout_s
    while True:
        replies = await _all_replies(env, topic)
        if cids <= set(replies):
            return replies
        assert proc.proc.poll() is None, f"the worker exited:\n{proc.log_text()[-4000:]}"
        assert time.monotonic() < deadline, "the worker did not acknowledge the fences"
        await asyncio.sleep(1.0)
