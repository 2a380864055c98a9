"""PSI, its verdicts, and the per-index drift monitor."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lhv_index._drift import DriftMonitor, histogram, psi, verdict

__all__: list[str] = []


def _normal(mean: float, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, 1.0, n)


def test_identical_distributions_are_stable() -> None:
    value = psi(_normal(0.0, 5000, 1), _normal(0.0, 5000, 2))
    assert value is not None
    assert 0.0 <= value < 0.10
    assert verdict(value) == "stable"


def test_same_sample_has_zero_psi() -> None:
    x = _normal(0.0, 1000, 3)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-12)


def test_hard_shift_is_major() -> None:
    value = psi(_normal(0.0, 5000, 1), _normal(3.0, 5000, 2))
    assert value is not None
    assert verdict(value) == "major"


def test_moderate_shift_is_minor() -> None:
    value = psi(_normal(0.0, 50_000, 1), _normal(0.4, 50_000, 2))
    assert verdict(value) == "minor"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0.0, "stable"),
        (0.0999, "stable"),
        (0.10, "minor"),
        (0.2499, "minor"),
        (0.25, "major"),
        (3.0, "major"),
        (None, "insufficient_data"),
        (float("nan"), "insufficient_data"),
    ],
)
def test_verdict_thresholds(value: float | None, expected: str) -> None:
    assert verdict(value) == expected


def test_empty_inputs_give_none() -> None:
    assert psi([], []) is None
    assert psi([], [1.0, 2.0]) is None
    assert psi([1.0, 2.0], np.array([])) is None


def test_constant_equal_inputs_give_zero() -> None:
    assert psi(np.full(100, 2.5), np.full(40, 2.5)) == 0.0


def test_constant_different_inputs_are_major_and_finite() -> None:
    value = psi(np.full(100, 1.0), np.full(100, 2.0))
    assert value is not None
    assert np.isfinite(value)
    assert verdict(value) == "major"


def test_non_finite_values_are_ignored() -> None:
    x = _normal(0.0, 1000, 4)
    dirty = np.concatenate([x, [np.nan, np.inf, -np.inf]])
    assert psi(dirty, x) == pytest.approx(psi(x, x))
    assert psi([np.nan], x) is None


def test_extreme_range_does_not_overflow() -> None:
    value = psi([-1e308, 1e308], [1e308, 1e308])
    assert value is not None
    assert np.isfinite(value)


@pytest.mark.parametrize(
    ("nb", "nc", "buckets"), [(0, 0, 10), (1, 0, 10), (997, 31, 7), (50, 5000, 1)]
)
def test_bucket_counts_are_conserved(nb: int, nc: int, buckets: int) -> None:
    rng = np.random.default_rng(nb * 31 + nc)
    b = rng.exponential(2.0, nb)
    c = rng.normal(1.0, 3.0, nc)
    edges, b_counts, c_counts = histogram(b, c, buckets)
    assert edges.shape == (buckets + 1,)
    assert b_counts.shape == c_counts.shape == (buckets,)
    assert int(b_counts.sum()) == nb
    assert int(c_counts.sum()) == nc
    assert np.all(np.diff(edges) >= 0)


def test_histogram_buckets_span_the_combined_range() -> None:
    edges, b_counts, c_counts = histogram([0.0, 1.0], [9.0, 10.0], 10)
    assert edges[0] == 0.0
    assert edges[-1] == 10.0
    assert b_counts[0] == 1 and b_counts[1] == 1
    assert c_counts[-1] == 2  # the maximum lands in the last bucket


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        histogram([1.0], [1.0], 0)
    with pytest.raises(ValueError):
        psi([1.0], [1.0], eps=0.0)
    with pytest.raises(ValueError):
        DriftMonitor(window=0)
    with pytest.raises(ValueError):
        DriftMonitor(window=10, min_current=11)


def test_report_is_insufficient_until_both_windows_have_data() -> None:
    mon = DriftMonitor(window=100)
    report = mon.report()
    assert set(report) == {"norms", "nn_distance"}
    for entry in report.values():
        assert entry == {
            "psi": None,
            "verdict": "insufficient_data",
            "baseline_n": 0,
            "current_n": 0,
        }
    mon.observe_distances(_normal(5.0, 100, 1))
    entry = mon.report()["nn_distance"]
    assert (entry["psi"], entry["baseline_n"], entry["current_n"]) == (None, 100, 0)
    mon.observe_distances(_normal(5.0, 49, 2))  # below min_current (half a window)
    assert mon.report()["nn_distance"]["psi"] is None
    mon.observe_distances(_normal(5.0, 1, 3))
    entry = mon.report()["nn_distance"]
    assert entry["psi"] is not None
    assert entry["current_n"] == 50
    assert mon.report()["norms"]["verdict"] == "insufficient_data"


def test_windows_slide() -> None:
    mon = DriftMonitor(window=1000)
    mon.observe_distances(_normal(1.0, 1000, 1))  # the baseline
    mon.observe_distances(_normal(1.0, 1000, 2))
    first = mon.report()["nn_distance"]
    assert first["verdict"] == "stable"
    assert (first["baseline_n"], first["current_n"]) == (1000, 1000)
    for seed in range(20):  # shifted data pushes the old window out, in small steps
        mon.observe_distances(_normal(6.0, 50, 10 + seed))
    shifted = mon.report()["nn_distance"]
    assert shifted["verdict"] == "major"
    assert (shifted["baseline_n"], shifted["current_n"]) == (1000, 1000)
    mon.observe_distances(_normal(1.0, 3000, 99))  # more than a window at once
    assert mon.report()["nn_distance"]["verdict"] == "stable"


def test_current_window_holds_exactly_the_last_observations() -> None:
    window = 64
    data = np.random.default_rng(7).gamma(2.0, 1.0, 1000)
    mon = DriftMonitor(window=window, buckets=8)
    sizes = [1, 5, 63, 64, 65, 2, 130, 7]
    start = 0
    i = 0
    while start < data.size:
        size = sizes[i % len(sizes)]
        mon.observe_distances(data[start : start + size])
        start += size
        i += 1
    expected = psi(data[:window], data[-window:], buckets=8)
    assert mon.report()["nn_distance"]["psi"] == pytest.approx(expected)


def test_float32_rounding_of_unit_norms_is_not_drift() -> None:
    rng = np.random.default_rng(12)
    unit = rng.normal(size=(2000, 64)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    norms = np.linalg.norm(unit.astype(np.float64), axis=1)
    assert norms.max() > norms.min()  # rounding noise is there
    assert psi(norms[:1000], norms[1000:]) == 0.0


def test_norms_come_from_vector_rows() -> None:
    rng = np.random.default_rng(11)
    unit = rng.normal(size=(400, 16)).astype(np.float32)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    mon = DriftMonitor(window=200)
    mon.observe_vectors(unit[:200] * 1.0)
    mon.observe_vectors(unit[200:] * 1.0)
    assert mon.report()["norms"]["psi"] == pytest.approx(0.0, abs=1e-9)
    mon.observe_vectors(unit[:200] * 10.0)
    assert mon.report()["norms"]["verdict"] == "major"
    mon.observe_vectors(unit[0])  # one vector, 1-D
    assert mon.report()["norms"]["current_n"] == 200


def test_norms_given_as_computed_drift_as_the_vectors_they_come_from() -> None:
    """The worker passes the norms its validation computed; the report is the same as
    for the vectors themselves."""
    rng = np.random.default_rng(12)
    rows = rng.normal(size=(400, 16)).astype(np.float32) * np.linspace(1, 3, 400)[:, None]
    by_rows, by_norms = DriftMonitor(window=200), DriftMonitor(window=200)
    for part in (rows[:200], rows[200:]):
        by_rows.observe_vectors(part)
        by_norms.observe_norms(np.linalg.norm(part.astype(np.float64), axis=1))
    got, want = by_norms.report()["norms"], by_rows.report()["norms"]
    assert got["psi"] == pytest.approx(want["psi"])
    assert got["verdict"] == want["verdict"] == "major"  # norms grew threefold


def test_large_components_do_not_overflow_norms() -> None:
    mon = DriftMonitor(window=2, min_current=1)
    mon.observe_vectors(np.full((3, 4), 1e30, dtype=np.float32))
    report = mon.report()["norms"]
    assert (report["baseline_n"], report["current_n"]) == (2, 1)
    assert report["psi"] == 0.0


def test_two_dimensional_distances_use_the_nearest_column() -> None:
    mon = DriftMonitor(window=3, min_current=3)
    d = np.array([[0.1, 0.5], [0.2, 0.6], [0.3, 0.7]])
    mon.observe_distances(d)
    mon.observe_distances(d[:, :1].ravel())
    assert mon.report()["nn_distance"]["psi"] == 0.0


def test_non_finite_observations_are_dropped() -> None:
    mon = DriftMonitor(window=10)
    mon.observe_distances([np.nan, np.inf, 1.0])
    assert mon.report()["nn_distance"]["baseline_n"] == 1


def test_reset_takes_a_new_baseline() -> None:
    mon = DriftMonitor(window=100)
    mon.observe_distances(_normal(0.0, 200, 1))
    mon.reset()
    assert mon.report()["nn_distance"]["baseline_n"] == 0


def test_concurrent_observers_lose_nothing() -> None:
    mon = DriftMonitor(window=1000)

    def feed(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for _ in range(50):
            mon.observe_vectors(rng.normal(size=(10, 8)))
            mon.observe_distances(rng.random(10))

    threads = [threading.Thread(target=feed, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = mon.report()
    for stream in ("norms", "nn_distance"):
        assert (report[stream]["baseline_n"], report[stream]["current_n"]) == (1000, 1000)
        assert report[stream]["verdict"] == "stable"
