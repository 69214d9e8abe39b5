"""Online estimates of how long a piece of device work takes.

`OnlineTimer` keeps, per key (a batch-size bucket, "chunk"), an exponentially weighted
mean and mean absolute deviation of measured durations; `predict(key)` is the
conservative estimate mean + `k_dev` x deviation used for deadline and slack decisions. A sample is clipped
to mean + `cap_devs` x max(deviation, 10% of mean) before it is averaged in.
Thread-safe for one writer and many readers (each update replaces a tuple). `version`
counts the changes, so readers can cache what they derive from the estimates.
`RecentQuantile` keeps a quantile of the last values of a stream (admission's
prediction errors); `DecayedFraction` the recent share of events that were hits (shed
requests, responses past the SLO).

`clock()` is the serving code's time base (seconds, CLOCK_MONOTONIC on Linux: the same
in the device and the front-end processes of one host).
"""

from __future__ import annotations

import math
import time
from typing import Hashable, Optional, Sequence

import numpy as np

clock = time.perf_counter


class OnlineTimer:
  """EWMA duration estimates (seconds) per key."""

  def __init__(self, alpha: float = 0.1, k_dev: float = 2.0, cap_devs: float = 4.0):
    if not 0 < alpha <= 1:
      raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    self.alpha = alpha
    self.k_dev = k_dev
    self.cap_devs = cap_devs
    self._stats: dict[Hashable, tuple[float, float, int]] = {}
    self._floor: dict[Hashable, float] = {}
    self.version = 0   # incremented by every change of an estimate

  def update(self, key: Hashable, seconds: float) -> None:
    """Records one measured duration of `key`."""
    if seconds < 0:
      raise ValueError(f"a duration must be >= 0, got {seconds}")
    self._floor[key] = min(seconds, self._floor.get(key, seconds))
    self.version += 1
    old = self._stats.get(key)
    if old is None:
      self._stats[key] = (seconds, seconds / 4, 1)  # unknown spread: assume 25%
      return
    mean, dev, n = old
    # Winsorize: one outlier (a preempted thread, a page fault) moves the estimate by at
    # most alpha x (cap - mean), so a stall cannot freeze decisions that would need new
    # samples to recover; a lasting slowdown still raises the estimate geometrically.
    seconds = min(seconds, mean + self.cap_devs * max(dev, 0.1 * mean))
    a = self.alpha
    self._stats[key] = ((1 - a) * mean + a * seconds,
                        (1 - a) * dev + a * abs(seconds - mean), n + 1)

  def relax(self, key: Hashable, fraction: float) -> None:
    """Moves `key`'s estimate `fraction` of the way back toward the fastest duration
    seen (mean) and toward zero (deviation). For work that is not run while its
    estimate is too high: without new samples a stale estimate would never come down,
    so the caller relaxes it while waiting and eventually probes again."""
    s = self._stats.get(key)
    if s is None:
      return
    mean, dev, n = s
    floor = self._floor[key]
    self.version += 1
    self._stats[key] = (mean - fraction * (mean - floor), dev * (1 - fraction), n)

  def relax_all(self, fraction: float) -> None:
    """`relax` for every key."""
    for key in list(self._stats):
      self.relax(key, fraction)

  def mean(self, key: Hashable) -> Optional[float]:
    s = self._stats.get(key)
    return None if s is None else s[0]

  def count(self, key: Hashable) -> int:
    s = self._stats.get(key)
    return 0 if s is None else s[2]

  def predict_many(self, keys: Sequence[Hashable]) -> list[Optional[float]]:
    """`predict(key)` of every key (None if never seen), in one call."""
    stats, k_dev = self._stats, self.k_dev
    return [None if (s := stats.get(key)) is None else s[0] + k_dev * s[1] for key in keys]

  def predict(self, key: Hashable, default: Optional[float] = None) -> Optional[float]:
    """Conservative estimate (mean + k_dev x deviation), or `default` if never seen."""
    s = self._stats.get(key)
    if s is None:
      return default
    return s[0] + self.k_dev * s[1]


class RecentQuantile:
  """The `q`-quantile of the last `window` values added (e.g. seconds).

  `add` only stores the value (the writer's cost is one array store). `value()` is the
  quantile (one `np.quantile` over the window, ~30 us at 2,048 values), recomputed on
  a read after at least `every` values were added since the last computation, else
  cached; `default` until `min_count` values were seen. So a stream nobody reads costs
  no quantiles. One writer; readers in any thread (a read racing a write sees the
  window with or without the newest value)."""

  def __init__(self, q: float, window: int = 2048, every: int = 64, min_count: int = 64,
               default: float = 0.0):
    if not 0 < q < 1:
      raise ValueError(f"a quantile must be in (0, 1), got {q}")
    if window < 1 or every < 1 or not 1 <= min_count <= window:
      raise ValueError(f"need window >= 1, every >= 1 and 1 <= min_count <= window, got "
                       f"{window}, {every}, {min_count}")
    self.q, self.window, self.every, self.min_count = q, window, every, min_count
    self._values = np.zeros(window)
    self.count = 0
    self._value = float(default)
    self._at = 0            # `count` when `_value` was computed

  def add(self, x: float) -> None:
    self._values[self.count % self.window] = x
    self.count += 1

  def value(self) -> float:
    count = self.count
    if count >= self.min_count and (count - self._at >= self.every
                                    or self._at < self.min_count):
      self._value = float(np.quantile(self._values[:min(count, self.window)], self.q))
      self._at = count
    return self._value


class DecayedFraction:
  """The recent fraction of events that were hits: counts of both, exponentially
  decayed with time constant `tau_s` (seconds). `t` is when the last event was
  counted. One writer (or callers holding a lock); readers in any thread."""

  __slots__ = ("tau_s", "t", "_events", "_hits")

  def __init__(self, tau_s: float, t: float):
    self.tau_s, self.t = tau_s, t
    self._events = 0.0
    self._hits = 0.0

  def _decay(self, now: float) -> None:
    """Weighs both counts down to `now` (never up: an earlier `now` leaves them)."""
    f = math.exp(-max(now - self.t, 0.0) / self.tau_s)
    self._events *= f
    self._hits *= f

  def count(self, now: float, hit: bool) -> None:
    self._decay(now)
    self._events += 1.0
    self._hits += hit
    self.t = now

  def turned_hits(self, now: float, n: int) -> None:
    """`n` events already counted as misses turned out to be hits (e.g. requests
    admitted, then dropped): adds n hits but no events (hits stay <= events)."""
    self._decay(now)
    self._hits = min(self._hits + n, self._events)
    self.t = max(self.t, now)

  def fraction(self) -> float:
    """Hits / events as of the last event (0 before any)."""
    return self._hits / self._events if self._events else 0.0
