"""The real stack: Kafka produce/consume, S3 blob store semantics, faults, the CLI."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from stackfixtures import StackHandle

from worker.dev.stack import COMMANDS_TOPIC, DLQ_TOPIC, SEARCH_TOPIC, LocalStack, read_env_file
from worker.storage.blobstore import (
    BlobNotFound,
    BlobStore,
    BlobStoreError,
    MemoryBlobStore,
    PreconditionFailed,
    S3BlobStore,
    S3Config,
    StoreUnavailable,
    get_verified,
    put_unless_same,
)

MIB = 1024 * 1024


# --------------------------------------------------------------------------------------
# Kafka


async def test_produce_then_consume_round_trips_records(
    bootstrap_servers: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic(2)
    async with AIOKafkaProducer(bootstrap_servers=bootstrap_servers, acks="all") as producer:
        sent = []
        for i in range(20):
            md = await producer.send_and_wait(
                topic, key=f"k{i % 3}".encode(), value=f"v{i}".encode()
            )
            sent.append((md.partition, md.offset))
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap_servers,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    got: dict[bytes, bytes] = {}
    async with consumer:
        async with asyncio.timeout(30):
            while len(got) < 20:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for r in records:
                        assert r.value is not None
                        got[r.value] = r.key or b""
    assert set(got) == {f"v{i}".encode() for i in range(20)}
    assert all(got[f"v{i}".encode()] == f"k{i % 3}".encode() for i in range(20))
    # one key always lands on one partition
    assert len({p for p, _ in sent}) <= 2


async def test_default_topics_exist_with_equal_partition_counts(stack: StackHandle) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=stack.bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([COMMANDS_TOPIC, SEARCH_TOPIC, DLQ_TOPIC])
    finally:
        await admin.close()
    counts = {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}
    assert set(counts) == {COMMANDS_TOPIC, SEARCH_TOPIC, DLQ_TOPIC}
    assert counts[COMMANDS_TOPIC] == counts[SEARCH_TOPIC]


def test_new_topic_refuses_an_existing_name(stack: StackHandle) -> None:
    from worker.dev.stack import StackError, create_topics

    with pytest.raises(StackError, match="could not create topics"):
        create_topics(stack.bootstrap_servers, {COMMANDS_TOPIC: 4}, exist_ok=False)


# --------------------------------------------------------------------------------------
# blob stores: the same semantics in memory and on the real S3


@pytest.fixture(params=["s3", "memory"])
def store(request: pytest.FixtureRequest) -> BlobStore:
    if request.param == "memory":
        return MemoryBlobStore(prefix="p/")  # needs no start()
    store: BlobStore = request.getfixturevalue("blobstore")
    return store


async def test_put_get_head_list_delete(store: BlobStore) -> None:
    etag = await store.put("a/one", b"hello")
    await store.put("a/two", io.BytesIO(b"world"))
    await store.put("b/three", bytearray(b"!"))
    assert await store.get("a/one") == (b"hello", etag)
    info = await store.head("a/two")
    assert (info.key, info.size) == ("a/two", 5)
    assert await store.list("a/") == ["a/one", "a/two"]
    assert await store.list() == ["a/one", "a/two", "b/three"]
    await store.delete("a/one")
    await store.delete("a/one")  # deleting an absent key is fine
    assert await store.list("a/") == ["a/two"]


async def test_get_to_file_replaces_the_file_with_the_object(store: BlobStore) -> None:
    data = os.urandom(3 * MIB + 5)  # several chunks of the body
    etag = await store.put("blob", data)
    with tempfile.TemporaryFile() as f:
        f.write(b"left over from an earlier read that is longer")
        info = await store.get_to_file("blob", f)
        assert (info.etag, info.size, f.tell()) == (etag, len(data), len(data))
        f.seek(0)
        assert f.read() == data
        with pytest.raises(BlobNotFound):
            await store.get_to_file("absent", f)


async def test_put_unless_same_leaves_equal_bytes_alone_and_replaces_others(
    store: BlobStore,
) -> None:
    assert await put_unless_same(store, "once", b"export") is True
    assert await put_unless_same(store, "once", b"export") is False
    assert (await store.get("once"))[0] == b"export"
    assert await put_unless_same(store, "once", b"other") is True  # e.g. a stale object
    assert (await store.get("once"))[0] == b"other"


async def test_get_verified_checks_the_bytes_against_the_etag(store: BlobStore) -> None:
    etag = await store.put("checked", b"x" * 1000)
    assert await get_verified(store, "checked") == (b"x" * 1000, etag)
    with pytest.raises(BlobNotFound):
        await get_verified(store, "absent")


async def test_get_verified_reads_a_short_body_again() -> None:
    class ShortOnce(MemoryBlobStore):
        """Serves the first read of each key cut short, as a server mid-overwrite did."""

        cut: set[str] = set()

        async def get(self, key: str) -> tuple[bytes, str]:
            data, etag = await super().get(key)
            if key not in self.cut:
                self.cut.add(key)
                return data[:3], etag
            return data, etag

    store = ShortOnce()
    etag = await store.put("k", b"0123456789")
    assert await get_verified(store, "k", backoff_s=0) == (b"0123456789", etag)

    class AlwaysShort(MemoryBlobStore):
        async def get(self, key: str) -> tuple[bytes, str]:
            data, etag = await super().get(key)
            return data[:3], etag

    broken = AlwaysShort()
    await broken.put("k", b"0123456789")
    with pytest.raises(StoreUnavailable):
        await get_verified(broken, "k", attempts=2, backoff_s=0)


async def test_missing_key_raises_blob_not_found(store: BlobStore) -> None:
    with pytest.raises(BlobNotFound):
        await store.get("nope")
    with pytest.raises(BlobNotFound):
        await store.head("nope")


async def test_if_match_with_a_stale_etag_fails_and_the_current_one_wins(
    store: BlobStore,
) -> None:
    first = await store.put("manifest.json", b"v1")
    second = await store.put_if_match("manifest.json", b"v2", first)
    assert second != first
    with pytest.raises(PreconditionFailed):
        await store.put_if_match("manifest.json", b"v3-stale", first)
    assert await store.get("manifest.json") == (b"v2", second)


async def test_create_only_fails_when_the_key_exists(store: BlobStore) -> None:
    etag = await store.put_if_match("fresh.json", b"mine", None)
    with pytest.raises(PreconditionFailed):
        await store.put_if_match("fresh.json", b"theirs", None)
    assert await store.get("fresh.json") == (b"mine", etag)


async def test_if_match_on_an_absent_key_fails(store: BlobStore) -> None:
    with pytest.raises(PreconditionFailed):
        await store.put_if_match("absent.json", b"x", '"0123456789abcdef0123456789abcdef"')


async def test_concurrent_conditional_writes_have_exactly_one_winner(store: BlobStore) -> None:
    base = await store.put("race.json", b"base")

    async def attempt(i: int) -> bool:
        try:
            await store.put_if_match("race.json", f"w{i}".encode(), base)
        except PreconditionFailed:
            return False
        return True

    results = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert sum(results) == 1
    winner = results.index(True)
    assert (await store.get("race.json"))[0] == f"w{winner}".encode()

    async def create(i: int) -> bool:
        try:
            await store.put_if_match("race-new.json", f"c{i}".encode(), None)
        except PreconditionFailed:
            return False
        return True

    assert sum(await asyncio.gather(*(create(i) for i in range(12)))) == 1


async def test_large_file_object_is_uploaded_in_parts(blobstore: S3BlobStore) -> None:
    data = os.urandom(21 * MIB)  # > multipart threshold: three 8 MiB parts
    etag = await blobstore.put("big.bin", io.BytesIO(data))
    assert etag.endswith('-3"')
    got, got_etag = await blobstore.get("big.bin")
    assert got == data
    assert got_etag == etag


async def test_keys_outside_the_prefix_are_invisible(
    s3_config: S3Config, blobstore: S3BlobStore
) -> None:
    await blobstore.put("mine", b"1")
    other = replace(s3_config, prefix=s3_config.key_prefix + f"other-{uuid.uuid4().hex[:6]}/")
    async with S3BlobStore(other) as store:
        assert await store.list() == []
        with pytest.raises(BlobNotFound):
            await store.get("mine")


async def test_unreachable_endpoint_is_store_unavailable_within_bounds() -> None:
    from worker.dev.stack import _free_ports

    (port,) = _free_ports(1)
    cfg = S3Config(
        endpoint_url=f"http://127.0.0.1:{port}",
        access_key_id="x",
        secret_access_key="y",
        timeout_s=2.0,
        max_attempts=2,
        backoff_s=0.05,
    )
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        async with S3BlobStore(cfg):
            pass
    assert info.value.retriable
    assert time.monotonic() - started < 10


async def test_wrong_credentials_are_a_non_retriable_error(s3_config: S3Config) -> None:
    cfg = replace(s3_config, secret_access_key="not-the-secret", max_attempts=1)
    with pytest.raises(BlobStoreError) as info:
        async with S3BlobStore(cfg):
            pass
    assert not info.value.retriable
    assert "not-the-secret" not in repr(cfg)


# --------------------------------------------------------------------------------------
# faults, on a private stack so the session's stack is unaffected


@pytest.mark.fault
async def test_killed_broker_gives_a_clear_error_then_recovers(
    make_local_stack: Callable[..., LocalStack],
) -> None:
    local = await asyncio.to_thread(make_local_stack, partitions=1)
    servers = local.bootstrap_servers
    async with AIOKafkaProducer(
        bootstrap_servers=servers, request_timeout_ms=5000, acks="all"
    ) as producer:
        await producer.send_and_wait(COMMANDS_TOPIC, key=b"i", value=b"before")
        await asyncio.to_thread(local.kill_kafka)
        assert not local.kafka_alive()
        started = time.monotonic()
        with pytest.raises((KafkaError, TimeoutError)):
            async with asyncio.timeout(30):
                await producer.send_and_wait(COMMANDS_TOPIC, key=b"i", value=b"during")
        assert time.monotonic() - started < 30

    await asyncio.to_thread(local.restart_kafka)
    async with AIOKafkaProducer(bootstrap_servers=servers, acks="all") as producer:
        await producer.send_and_wait(COMMANDS_TOPIC, key=b"i", value=b"after")
    consumer = AIOKafkaConsumer(
        COMMANDS_TOPIC,
        bootstrap_servers=servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    values: list[bytes] = []
    async with consumer:
        async with asyncio.timeout(30):
            while b"after" not in values:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    values.extend(r.value or b"" for r in records)
    assert values[0] == b"before"  # acknowledged before the kill: kept
    assert b"after" in values


@pytest.mark.fault
async def test_s3_stop_and_start_keeps_the_data(
    make_local_stack: Callable[..., LocalStack],
) -> None:
    local = await asyncio.to_thread(make_local_stack, partitions=1)
    cfg = S3Config.from_env(local.env(), timeout_s=2.0, max_attempts=2, backoff_s=0.05)
    async with S3BlobStore(cfg) as store:
        etag = await store.put("kept.json", b"still here")
        await asyncio.to_thread(local.stop_s3)
        with pytest.raises(StoreUnavailable):
            await store.get("kept.json")
        await asyncio.to_thread(local.start_s3)
        assert await store.get("kept.json") == (b"still here", etag)
        with pytest.raises(PreconditionFailed):
            await store.put_if_match("kept.json", b"x", None)


# --------------------------------------------------------------------------------------
# the CLI: `lhv stack up` detaches; `down` stops exactly what it started


@pytest.mark.fault
def test_cli_stack_up_status_down(tmp_path: Path) -> None:
    from stackfixtures import stack_prerequisites_missing

    why = stack_prerequisites_missing()
    if why:
        pytest.skip(why)
    env_file = tmp_path / "env"
    cli = [sys.executable, "-m", "worker.cli", "stack"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LHV_", "AWS_"))}
    up = subprocess.run(
        [*cli, "up", "--env-file", str(env_file), "--partitions", "2"],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )  # fmt: skip
    assert up.returncode == 0, up.stdout + up.stderr
    values = read_env_file(env_file)
    try:
        assert "ready in" in up.stdout
        pids = [int(values["LHV_STACK_KAFKA_PID"]), int(values["LHV_STACK_S3_PID"])]
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        status = subprocess.run(
            [*cli, "status", "--env-file", str(env_file)],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stdout + status.stderr
    finally:
        down = subprocess.run(
            [*cli, "down", "--env-file", str(env_file)],
            capture_output=True, text=True, timeout=120, env=env, check=False,
        )  # fmt: skip
    assert down.returncode == 0, down.stdout + down.stderr
    from worker.dev.stack import _proc_running

    assert not any(_proc_running(pid) for pid in pids)
    assert not env_file.exists()
    assert not Path(values["LHV_STACK_DIR"]).exists()


def _send_headers_then_close(request: Any) -> None:
    """What a writer killed between a request's headers and its body leaves on the wire:
    the headers (with their Content-Length), then a closed connection. Without botocore's
    `Expect: 100-continue`, which some clients and proxies drop: the server then starts
    on the body at once (SeaweedFS keeps an empty object unless `Content-MD5` says what
    the body must be)."""
    url = urllib.parse.urlsplit(request.url)
    target = url.path + (f"?{url.query}" if url.query else "")
    lines = [f"{request.method} {target} HTTP/1.1", f"Host: {url.netloc}"]
    for name, value in request.headers.items():
        if name.lower() not in ("host", "expect"):
            lines.append(f"{name}: {value.decode() if isinstance(value, bytes) else value}")
    with socket.create_connection((url.hostname, url.port), timeout=5) as conn:
        conn.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        time.sleep(0.2)


async def test_a_put_cut_off_after_its_headers_leaves_no_object(blobstore: S3BlobStore) -> None:
    sent: list[Any] = []
    blobstore._live_client().meta.events.register(
        "before-send.s3.PutObject", lambda request, **_: sent.append(request)
    )
    body = b'{"offset": 7, "key": "m", "value": "{}"}'
    await blobstore.put("markers/m.json", body)
    await blobstore.delete("markers/m.json")
    # the same signed request again, cut off before its body, as by a kill -9
    await asyncio.to_thread(_send_headers_then_close, sent[-1])
    await asyncio.sleep(1.0)
    with pytest.raises(BlobNotFound):
        await blobstore.get("markers/m.json")
    assert sent[-1].headers["Content-MD5"]  # what makes the server drop it
