"""Distribution drift of an index's inputs, measured by the Population Stability Index.

PSI compares two samples of a scalar: both are bucketed into `buckets` equal-width
buckets over the combined min/max of the two samples, bucket proportions are clamped to
`eps` (so an empty bucket does not divide by zero or take the log of zero), and

    PSI = sum((current_i - baseline_i) * ln(current_i / baseline_i))

Verdicts follow the usual reading: `stable` below 0.10, `minor` from 0.10 to 0.25,
`major` from 0.25.

`DriftMonitor` watches two streams of one index: the norms of incoming vectors and the
nearest-neighbour distance of each query. The first `window` observations of a stream
are its baseline; later ones fill a sliding current window of the last `window`. A PSI
is reported once the baseline is full and the current window holds at least
`min_current` observations (half a window by default): PSI of two samples of one
distribution is about `(buckets - 1) * (1/n_baseline + 1/n_current)` from sampling noise
alone, so smaller samples would report drift that is not there.

Non-finite values are ignored everywhere (they carry no position on the scale).
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "MAJOR",
    "MINOR",
    "RTOL",
    "DriftMonitor",
    "histogram",
    "psi",
    "verdict",
]

log = logging.getLogger(__name__)

#: PSI at or above which drift is `minor`
MINOR = 0.10
#: PSI at or above which drift is `major`
MAJOR = 0.25

#: a range no wider than this times the largest magnitude counts as one value
RTOL = 1e-6

INSUFFICIENT = "insufficient_data"

_Floats = npt.NDArray[np.float64]
_Counts = npt.NDArray[np.int64]


def _finite(values: npt.ArrayLike) -> _Floats:
    arr = np.asarray(values, dtype=np.float64).ravel()
    return arr[np.isfinite(arr)]


def _bucket_counts(values: _Floats, lo: float, width: float, buckets: int) -> _Counts:
    if values.size == 0:
        return np.zeros(buckets, dtype=np.int64)
    if width <= 0.0:
        idx = np.zeros(values.size, dtype=np.int64)
    else:
        idx = np.floor((values - lo) * (buckets / width)).astype(np.int64)
        np.clip(idx, 0, buckets - 1, out=idx)
    return np.bincount(idx, minlength=buckets).astype(np.int64)


def histogram(
    baseline: npt.ArrayLike, current: npt.ArrayLike, buckets: int = 10, *, rtol: float = RTOL
) -> tuple[_Floats, _Counts, _Counts]:
    """Bucket both samples over their combined range: `(edges, baseline_counts, current_counts)`.

    `edges` has `buckets + 1` entries; the last bucket includes the maximum. Each count
    array sums to the number of finite values in its sample. When the combined range is
    no wider than `rtol` times the largest magnitude, the samples count as constant and
    every value falls into the first bucket: the norms of unit vectors differ only by
    float32 rounding, and bucketing that noise would report drift that is not there.
    """
    if buckets < 1:
        raise ValueError(f"buckets must be >= 1, got {buckets}")
    b = _finite(baseline)
    c = _finite(current)
    both = np.concatenate((b, c))
    if both.size == 0:
        lo = hi = 0.0
    else:
        lo = float(both.min())
        hi = float(both.max())
    t = np.arange(buckets + 1, dtype=np.float64) / buckets
    edges = lo * (1.0 - t) + hi * t
    width = hi - lo
    if width <= rtol * max(abs(lo), abs(hi)):
        width = 0.0
    elif not math.isfinite(width):  # e.g. -1e308 and 1e308: halve the scale, not overflow
        lo, width = lo / 2.0, hi / 2.0 - lo / 2.0
        b, c = b / 2.0, c / 2.0
    return edges, _bucket_counts(b, lo, width, buckets), _bucket_counts(c, lo, width, buckets)


def psi(
    baseline: npt.ArrayLike,
    current: npt.ArrayLike,
    *,
    buckets: int = 10,
    eps: float = 1e-4,
    rtol: float = RTOL,
) -> float | None:
    """Population Stability Index of `current` against `baseline`.

    Returns None when either sample has no finite value (PSI is undefined), and 0.0 when
    both samples hold one same constant (within `rtol`, see `histogram`). Never negative.
    """
    if not 0.0 < eps < 1.0:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    _, b_counts, c_counts = histogram(baseline, current, buckets, rtol=rtol)
    nb = int(b_counts.sum())
    nc = int(c_counts.sum())
    if nb == 0 or nc == 0:
        return None
    pb = np.maximum(b_counts / nb, eps)
    pc = np.maximum(c_counts / nc, eps)
    return max(0.0, float(np.sum((pc - pb) * np.log(pc / pb))))


def verdict(value: float | None) -> str:
    """`stable` (< 0.10), `minor` (0.10 to 0.25), `major` (>= 0.25), or `insufficient_data`."""
    if value is None or math.isnan(value):
        return INSUFFICIENT
    if value >= MAJOR:
        return "major"
    if value >= MINOR:
        return "minor"
    return "stable"


class _Stream:
    """A fixed baseline and a ring buffer of the latest observations of one scalar."""

    __slots__ = ("baseline", "baseline_n", "ring", "ring_n", "ring_pos", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.baseline = np.empty(window, dtype=np.float64)
        self.baseline_n = 0
        self.ring = np.empty(window, dtype=np.float64)
        self.ring_n = 0
        self.ring_pos = 0

    def add(self, values: _Floats) -> None:
        if self.baseline_n < self.window:
            take = min(self.window - self.baseline_n, values.size)
            self.baseline[self.baseline_n : self.baseline_n + take] = values[:take]
            self.baseline_n += take
            values = values[take:]
        m = values.size
        if m == 0:
            return
        if m >= self.window:
            self.ring[:] = values[-self.window :]
            self.ring_pos = 0
            self.ring_n = self.window
            return
        idx = (self.ring_pos + np.arange(m)) % self.window
        self.ring[idx] = values
        self.ring_pos = (self.ring_pos + m) % self.window
        self.ring_n = min(self.window, self.ring_n + m)


class DriftMonitor:
    """Drift of one index: norms of incoming vectors and nearest-neighbour distances.

    Thread-safe: `observe_*` may be called from apply and search threads concurrently
    with `report()`. Memory is two float64 arrays of `window` per stream.
    """

    STREAMS = ("norms", "nn_distance")

    def __init__(
        self, window: int = 1000, buckets: int = 10, *, min_current: int | None = None
    ) -> None:
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        if min_current is None:
            min_current = max(1, window // 2)
        if not 1 <= min_current <= window:
            raise ValueError(f"min_current must be in [1, {window}], got {min_current}")
        self.window = window
        self.buckets = buckets
        self.min_current = min_current
        self._lock = threading.Lock()
        self._streams = {name: _Stream(window) for name in self.STREAMS}

    def observe_vectors(self, vectors: npt.ArrayLike) -> None:
        """Record the L2 norm of each row of `vectors` (shape `(n, dim)` or `(dim,)`)."""
        arr = np.asarray(vectors)
        if arr.size == 0:
            return
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        elif arr.ndim != 2:
            raise ValueError(f"vectors must be 1-D or 2-D, got shape {arr.shape}")
        # float64 accumulation: a float32 sum of squares overflows for large components
        self.observe_norms(np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64)))

    def observe_norms(self, norms: npt.ArrayLike) -> None:
        """Record L2 norms computed already (one per vector, 1-D)."""
        self._observe("norms", norms)

    def observe_distances(self, distances: npt.ArrayLike) -> None:
        """Record each query's nearest-neighbour distance.

        `distances` is 1-D (one per query), or 2-D `(queries, k)` sorted by distance, of
        which the first column is used.
        """
        arr = np.asarray(distances, dtype=np.float64)
        if arr.ndim == 2:
            arr = arr[:, 0] if arr.shape[1] else arr[:, :0]
        self._observe("nn_distance", arr)

    def _observe(self, stream: str, values: npt.ArrayLike) -> None:
        finite = _finite(values)
        if finite.size == 0:
            return
        with self._lock:
            self._streams[stream].add(finite)

    def report(self) -> dict[str, dict[str, Any]]:
        """`{stream: {"psi", "verdict", "baseline_n", "current_n"}}` for both streams."""
        with self._lock:
            snapshot = {
                name: (s.baseline.copy(), s.baseline_n, s.ring[: s.ring_n].copy(), s.ring_n)
                for name, s in self._streams.items()
            }
        out: dict[str, dict[str, Any]] = {}
        for name, (baseline, baseline_n, current, current_n) in snapshot.items():
            value: float | None = None
            if baseline_n == self.window and current_n >= self.min_current:
                value = psi(baseline, current, buckets=self.buckets)
            out[name] = {
                "psi": value,
                "verdict": verdict(value),
                "baseline_n": baseline_n,
                "current_n": current_n,
            }
        return out

    def reset(self) -> None:
        """Forget everything: the next `window` observations become a new baseline."""
        with self._lock:
            self._streams = {name: _Stream(self.window) for name in self.STREAMS}
