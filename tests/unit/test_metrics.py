"""Metrics exposition and the /healthz and /readyz endpoints, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lhv_index._drift import DriftMonitor
from worker.telemetry.metrics import HealthSource, HealthTracker, Metrics, MetricsServer

__all__: list[str] = []


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _get(url: str, method: str = "GET") -> tuple[int, str, bytes]:
    """(status, content type, body) of one request, from a plain urllib client."""

    def fetch() -> tuple[int, str, bytes]:
        req = urllib.request.Request(url, method=method)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # no *_proxy env
        try:
            with opener.open(req, timeout=5) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as err:
            with err:
                return err.code, err.headers.get("Content-Type", ""), err.read()

    return await asyncio.to_thread(fetch)


async def _json(url: str) -> tuple[int, dict[str, Any]]:
    status, ctype, body = await _get(url)
    assert ctype == "application/json"
    return status, json.loads(body)


async def _samples(server: MetricsServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    status, ctype, body = await _get(server.url + "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
async def tracker() -> HealthTracker:
    return HealthTracker(stall_timeout_s=0.5)


@pytest.fixture
async def server(tracker: HealthTracker) -> AsyncIterator[MetricsServer]:
    async with MetricsServer(Metrics(), tracker, host="127.0.0.1", port=0) as srv:
        yield srv


async def test_port_zero_binds_a_free_port(server: MetricsServer) -> None:
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


async def test_metrics_shows_recorded_values(server: MetricsServer) -> None:
    m = server.metrics
    m.set_partition(3, "serving", 41, 40, 7)
    m.command_applied("add", 5)
    m.command_applied("add", 2)
    m.command_applied("drop")
    m.command_rejected("add", "dim_mismatch")
    m.dlq_record()
    m.rebalance()
    m.observe_poll(12)
    m.observe_apply(3, 12, 0.004, items=300)
    m.observe_search("search", "ok", 0.002, 8)
    m.observe_search("get", "index_not_found", 0.001)
    m.set_index_size("docs", 100, 4)
    m.observe_checkpoint(3, 0.5, 41)
    m.checkpoint_failed(3)
    m.observe_snapshot(0.2, 4096)
    m.observe_restore(3, 1.5, nbytes=8192)

    s = await _samples(server)
    assert s[("lhv_consumer_lag", (("partition", "3"),))] == 7
    assert s[("lhv_applied_offset", (("partition", "3"),))] == 41
    assert s[("lhv_checkpoint_offset", (("partition", "3"),))] == 41
    assert s[("lhv_partition_state", (("partition", "3"), ("state", "serving")))] == 1
    assert s[("lhv_partition_state", (("partition", "3"), ("state", "restoring")))] == 0
    assert s[("lhv_commands_applied_total", (("op", "add"),))] == 2
    assert s[("lhv_commands_applied_total", (("op", "drop"),))] == 1
    assert s[("lhv_items_applied_total", (("op", "add"),))] == 7
    assert s[("lhv_commands_rejected_total", (("code", "dim_mismatch"), ("op", "add")))] == 1
    assert s[("lhv_dlq_records_total", ())] == 1
    assert s[("lhv_rebalances_total", ())] == 1
    assert s[("lhv_poll_records_count", ())] == 1
    assert s[("lhv_apply_batch_records_sum", ())] == 12
    assert s[("lhv_apply_batch_items_sum", ())] == 300
    assert s[("lhv_apply_seconds_count", ())] == 1
    assert s[("lhv_search_seconds_count", (("op", "search"), ("status", "ok")))] == 1
    assert s[("lhv_search_batch_size_sum", (("op", "search"), ("status", "ok")))] == 8
    assert s[("lhv_search_seconds_count", (("op", "get"), ("status", "index_not_found")))] == 1
    assert s[("lhv_index_items", (("index", "docs"), ("state", "live")))] == 100
    assert s[("lhv_index_items", (("index", "docs"), ("state", "deleted")))] == 4
    assert s[("lhv_checkpoint_seconds_count", ())] == 1
    assert s[("lhv_checkpoint_failures_total", ())] == 1
    assert s[("lhv_snapshot_bytes_sum", ())] == 4096
    assert s[("lhv_restore_bytes_sum", ())] == 8192
    assert s[("lhv_restore_seconds_count", ())] == 1


async def test_drift_gauge_follows_the_report(server: MetricsServer) -> None:
    mon = DriftMonitor(window=100)
    m = server.metrics
    m.set_drift("docs", mon.report())
    s = await _samples(server)
    assert not any(name == "lhv_drift_psi" for name, _ in s)

    rng = np.random.default_rng(0)
    mon.observe_distances(rng.random(100))
    mon.observe_distances(rng.random(100) + 5.0)
    m.set_drift("docs", mon.report())
    s = await _samples(server)
    psi = s[("lhv_drift_psi", (("index", "docs"), ("stream", "nn_distance")))]
    assert psi == pytest.approx(mon.report()["nn_distance"]["psi"])
    assert psi >= 0.25
    assert ("lhv_drift_psi", (("index", "docs"), ("stream", "norms"))) not in s


async def test_forgotten_index_and_partition_leave_no_series(server: MetricsServer) -> None:
    m = server.metrics
    m.set_index_size("docs", 10, 1)
    m.set_index_size("other", 5, 0)
    m.set_drift("docs", {"nn_distance": {"psi": 0.3}})
    m.set_partition(0, "restoring", 10, 5, 2)
    m.set_partition(1, "serving", 10, 5, 0)
    m.set_partition_state(0, "paused")  # a state the gauge does not list
    m.forget_index("docs")
    m.forget_partition(0)
    s = await _samples(server)
    labels = [dict(lbl) for _, lbl in s]
    assert not any(lbl.get("index") == "docs" for lbl in labels)
    assert not any(lbl.get("partition") == "0" for lbl in labels)
    assert s[("lhv_index_items", (("index", "other"), ("state", "live")))] == 5
    assert s[("lhv_consumer_lag", (("partition", "1"),))] == 0
    m.forget_index("never-seen")  # no error
    m.forget_partition(42)


async def test_workers_in_one_process_have_separate_registries() -> None:
    a, b = Metrics(), Metrics()
    a.dlq_record()
    async with (
        MetricsServer(a, HealthTracker(), port=0) as sa,
        MetricsServer(b, HealthTracker(), port=0) as sb,
    ):
        assert sa.port != sb.port
        assert (await _samples(sa))[("lhv_dlq_records_total", ())] == 1
        assert (await _samples(sb))[("lhv_dlq_records_total", ())] == 0


async def test_healthz_flips_on_stall_and_back_on_progress(
    server: MetricsServer, tracker: HealthTracker
) -> None:
    tracker.set_state(0, "serving")
    tracker.progress(0, 10)
    tracker.set_lag(0, 0)
    status, body = await _json(server.url + "/healthz")
    assert (status, body["status"]) == (200, "ok")

    tracker.set_lag(0, 5)
    assert (await _json(server.url + "/healthz"))[0] == 200  # not yet past the timeout
    await asyncio.sleep(0.7)
    status, body = await _json(server.url + "/healthz")
    assert status == 503
    assert body["status"] == "stalled"
    assert body["lag"] == 5
    assert set(body["stalled"]) == {"0"}
    assert "partition 0" in body["reason"]

    tracker.progress(0, 11)
    status, body = await _json(server.url + "/healthz")
    assert (status, body["status"]) == (200, "ok")


async def test_readyz_waits_for_restoring_partitions(
    server: MetricsServer, tracker: HealthTracker
) -> None:
    tracker.set_state(0, "serving")
    tracker.set_state(1, "restoring")
    status, body = await _json(server.url + "/readyz")
    assert status == 503
    assert body["status"] == "not_ready"
    assert body["not_ready"] == {"1": "restoring"}
    assert body["refused"] == []

    tracker.set_state(1, "serving")
    status, body = await _json(server.url + "/readyz")
    assert status == 200
    assert body == {"status": "ready", "partitions": {"0": "serving", "1": "serving"}}


async def test_readyz_lists_refused_partitions(
    server: MetricsServer, tracker: HealthTracker
) -> None:
    tracker.set_state(2, "refused")
    tracker.set_state(3, "revoked")  # being given up: neither ready nor blocking
    status, body = await _json(server.url + "/readyz")
    assert status == 503
    assert body["refused"] == [2]
    assert body["not_ready"] == {"2": "refused"}


async def test_readyz_with_no_partitions_is_ready(server: MetricsServer) -> None:
    status, body = await _json(server.url + "/readyz")
    assert (status, body) == (200, {"status": "ready", "partitions": {}})


async def test_unknown_path_and_method(server: MetricsServer) -> None:
    assert (await _get(server.url + "/nope"))[0] == 404
    assert (await _get(server.url + "/metrics", method="POST"))[0] == 405
    status, _, body = await _get(server.url + "/metrics?name[]=x", method="HEAD")
    assert (status, body) == (200, b"")


async def test_malformed_request_does_not_break_the_server(server: MetricsServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"garbage\r\n\r\n")
    await writer.drain()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    assert (await _get(server.url + "/healthz"))[0] == 200


async def test_lifecycle_is_explicit() -> None:
    srv = MetricsServer(Metrics(), HealthTracker(), port=0)
    await srv.start()
    with pytest.raises(RuntimeError):
        await srv.start()
    port = srv.port
    await srv.stop()
    await srv.stop()  # idempotent
    with pytest.raises(RuntimeError):
        await srv.start()
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    never_started = MetricsServer(Metrics(), HealthTracker(), port=0)
    await never_started.stop()


def test_tracker_is_a_health_source() -> None:
    assert isinstance(HealthTracker(), HealthSource)


def test_idle_partition_receiving_a_record_is_not_stalled_at_once() -> None:
    clock = FakeClock()
    t = HealthTracker(stall_timeout_s=10, clock=clock)
    t.progress(0, 5)
    t.set_lag(0, 0)
    clock.now += 3600  # idle for an hour
    t.set_lag(0, 1)
    assert t.stalled() == {}
    clock.now += 10.5
    assert t.stalled() == {0: pytest.approx(10.5)}
    t.set_lag(0, 2)  # more lag is not progress
    assert 0 in t.stalled()
    t.progress(0, 6)
    assert t.stalled() == {}


def test_lag_clearing_ends_the_stall() -> None:
    clock = FakeClock()
    t = HealthTracker(stall_timeout_s=1, clock=clock)
    t.set_lag(0, 3)
    clock.now += 2
    assert 0 in t.stalled()
    assert t.lag_total() == 3
    t.set_lag(0, 0)
    assert t.stalled() == {}


def test_refused_and_revoked_partitions_never_stall() -> None:
    clock = FakeClock()
    t = HealthTracker(stall_timeout_s=1, clock=clock)
    t.set_state(0, "refused")
    t.set_state(1, "revoked")
    t.set_state(2, "restoring")
    for p in (0, 1, 2):
        t.set_lag(p, 9)
    clock.now += 5
    assert set(t.stalled()) == {2}


def test_forget_drops_a_partition() -> None:
    clock = FakeClock()
    t = HealthTracker(stall_timeout_s=1, clock=clock)
    t.set_lag(0, 3)
    t.set_state(0, "serving")
    clock.now += 5
    t.forget(0)
    assert (t.stalled(), t.lag_total(), t.partition_states()) == ({}, 0, {})


def test_states_can_come_from_the_worker() -> None:
    states = {0: "serving", 1: "restoring"}
    t = HealthTracker(states=lambda: states)
    t.set_lag(2, 0)  # known from lag, but without a state
    assert t.partition_states() == {0: "serving", 1: "restoring", 2: "unknown"}


def test_last_progress_moves_only_on_a_changed_offset() -> None:
    clock = FakeClock()
    t = HealthTracker(clock=clock)
    start = t.last_progress_monotonic()
    clock.now += 1
    t.progress(0, 7)
    assert t.last_progress_monotonic() == start + 1
    clock.now += 1
    t.progress(0, 7)
    assert t.last_progress_monotonic() == start + 1


def test_invalid_stall_timeout_is_rejected() -> None:
    with pytest.raises(ValueError):
        HealthTracker(stall_timeout_s=0)
