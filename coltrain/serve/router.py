"""Admission control and least-expected-completion-time routing over the replicas.

`Router.submit` gives each request a deadline (its own `deadline_ms`, else the SLO,
counted from its arrival), asks every replica when the request would complete there
(`DeviceScheduler.expected_completion`: current work, queued work and the new batch, all
from online timings, including a training chunk in progress) and queues it on the
replica that finishes it first. Predictions add the measured response delay (how long
recent results waited for the front end to send them, which the device-side prediction
cannot see and which grows when the front end is overloaded). If even that replica
would miss the deadline (minus the safety margin, and while recent responses miss
the SLO minus a reserve for how late they were against their predictions:
`admission_target`), or every queue is at its cap, the request is shed:
`Shed` carries the reason and a Retry-After hint, and the HTTP layer answers 503
instead of letting the queue grow; and no replica starts a training chunk for a while
(`_hold_training`: training must not take cycles while inference is refused). A
request that would start at once on an idle replica is not shed (there is no backlog to
avoid, and serving it keeps the online timings fresh) unless it already spent half its
budget before it was submitted (a front-end backlog).
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Optional, Sequence

import numpy as np

from coltrain.serve.metrics import ServeMetrics
from coltrain.serve.scheduler import DeviceScheduler, Pending, clock
from coltrain.serve.timing import DecayedFraction, OnlineTimer, RecentQuantile


RESPONSE_TAU_S = 0.5   # an unrefreshed response-delay estimate fades with this constant
HOLDOFF_FULL_FRACTION = 0.05  # a recent shed fraction that gives the whole hold-off
SHED_TAU_S = 0.5        # time constant of the recent arrival and shed counts
HEADROOM_FROM_FRACTION = 0.05  # recent shed fractions from which admission keeps headroom
HEADROOM_FULL_FRACTION = 0.25  # ... and at which it keeps all of `overload_headroom`
RESERVE_FROM_MISSED = 0.002  # recent fractions of served requests past the SLO from which
RESERVE_FULL_MISSED = 0.01   # admission keeps the late reserve, and at which all of it


def _fade(since: float, now: Optional[float]) -> float:
  """The weight left to an estimate last refreshed at `since`, at `now` (default: the
  clock): it fades with time constant RESPONSE_TAU_S."""
  now = clock() if now is None else now
  return math.exp(-max(now - since, 0.0) / RESPONSE_TAU_S)


class Shed(Exception):
  """The request was refused by admission control (HTTP 503 + Retry-After)."""

  def __init__(self, reason: str, retry_after_s: float, message: str):
    super().__init__(message)
    self.reason = reason
    self.retry_after_s = retry_after_s


class Router:
  """Routes admitted requests to the replica with the least expected completion time."""

  def __init__(self, schedulers: Sequence[DeviceScheduler], metrics: ServeMetrics,
               slo_s: float, margin_s: float, shed_holdoff_s: float = 0.25,
               overload_headroom: float = 0.0, late_quantile: float = 0.0):
    if not schedulers:
      raise ValueError("a router needs at least one replica")
    self.schedulers = list(schedulers)
    self.metrics = metrics
    self.slo_s = slo_s
    self.margin_s = margin_s
    self.shed_holdoff_s = shed_holdoff_s
    self.overload_headroom = overload_headroom
    # how much later than predicted responses were sent: its `late_quantile` quantile
    self._late = RecentQuantile(late_quantile) if late_quantile > 0 else None
    # the recent responses past the SLO (counted with `_late`, by `completed` only)
    self._missed = DecayedFraction(SHED_TAU_S, clock())
    self._lock = threading.Lock()
    # requests the front end is receiving (not yet submitted); set by the server
    self.incoming_source: Callable[[], int] = lambda: 0
    self._response = OnlineTimer(alpha=0.05)
    self._response_t = clock()   # when the response delay was last measured
    self._shed = DecayedFraction(SHED_TAU_S, clock())   # the recent requests shed
    for s in self.schedulers:
      s.incoming = self.incoming
      s.response_delay = self.response_delay_s
      s.on_drop = self.dropped

  def incoming(self) -> int:
    """Requests the front end is receiving; schedulers do not start a training chunk
    while one is on its way."""
    return self.incoming_source()

  def _best(self, n: int, now: float):
    """(replica, predicted completion) of the replica finishing n images first, or
    (None, inf) if every queue is full."""
    best, best_t = None, math.inf
    for s in self.schedulers:
      if s.queue_full():
        continue
      t = s.expected_completion(n, now)
      if t < best_t:
        best, best_t = s, t
    return best, best_t

  def _check(self, best, best_t: float, now: float, arrival: float, deadline: float,
             budget: float) -> float:
    """Raises `Shed` unless the request is admitted; returns when its response is
    predicted to be sent (the replica's completion + the response delay)."""
    if best is None:
      self.metrics.shed.labels(reason="queue_full").inc()
      self._shed.count(now, True)
      self._hold_training(now)
      raise Shed("queue_full", 1.0, "every replica's queue is full; retry later")
    # An idle replica starts the request at once: never shed it (its timing estimate
    # may be stale), unless the request already spent half its budget before it got
    # here (a front-end backlog): then the prediction is trusted.
    fresh = now - arrival < 0.5 * budget
    best_t += self.response_delay_s(now)
    target = self.admission_target(deadline, budget, now)
    if best_t > target and not (fresh and best.idle(now)):
      self.metrics.shed.labels(reason="deadline").inc()
      self._shed.count(now, True)
      self._hold_training(now)    # inference is being refused: no training for a while
      late = best_t - target
      raise Shed("deadline", max(late, best_t - now),
                 f"overloaded: predicted completion in {1e3 * (best_t - arrival):.1f} ms "
                 f"misses the {1e3 * (target - arrival):.1f} ms admitted for the "
                 f"{1e3 * budget:.1f} ms deadline; retry later")
    return best_t

  def admission_target(self, deadline: float, budget: float,
                       now: Optional[float] = None) -> float:
    """The latest predicted completion admitted for a request due at `deadline` with a
    `budget` (seconds): the deadline minus the safety margin and minus a headroom
    (`headroom_s`). When admission fills the queue up to its target (overload), every
    admitted request finishes near it, and what the prediction cannot see then (a
    saturated host: socket buffers before the front end reads, its event loop, the
    client's own reading) carries the tail past the SLO; the headroom keeps that slack
    for the requests already admitted."""
    return deadline - self.margin_s - self.headroom_s(budget, now)

  def headroom_s(self, budget: float, now: Optional[float] = None) -> float:
    """The headroom `admission_target` keeps now for a `budget` (seconds), two parts:

    * `late_reserve_s` (how late recent responses were against their predictions), in
      proportion to how many recent responses missed the SLO (`recent_missed_fraction`):
      none under RESERVE_FROM_MISSED (0.2 %), all of it from RESERVE_FULL_MISSED (1 %),
      linear between. It is kept while it is needed: driven by the shed fraction
      instead, it can sustain itself (a burst's sheds bring the reserve, whose sheds
      keep it; in `run_034073a/` A shed 12.6 % at rho = 0.7 with its p99 at 0.7 of the
      SLO, where earlier runs' A shed at most 1.4 % at rho <= 0.7); driven by the
      misses it lets go once the admitted are on time. Off by default: its full runs
      were mixed (results/colocate/README.md).
    * `overload_headroom` x budget (0.3 by default), in proportion to the recent shed
      fraction: none under HEADROOM_FROM_FRACTION (5 %), all of it from
      HEADROOM_FULL_FRACTION (25 %), linear between."""
    headroom = 0.0
    if self._late is not None:
      missed = (self.recent_missed_fraction() - RESERVE_FROM_MISSED) / (
          RESERVE_FULL_MISSED - RESERVE_FROM_MISSED)
      if missed > 0.0:
        headroom += min(missed, 1.0) * self.late_reserve_s(now)
    if self.overload_headroom > 0.0:
      shed = (self.recent_shed_fraction() - HEADROOM_FROM_FRACTION) / (
          HEADROOM_FULL_FRACTION - HEADROOM_FROM_FRACTION)
      if shed > 0.0:
        headroom += min(shed, 1.0) * self.overload_headroom * budget
    return headroom

  def recent_missed_fraction(self) -> float:
    """The fraction of recent responses (time constant SHED_TAU_S, as of the last one)
    written more than the SLO after their arrival; 0 with `late_quantile` off."""
    return self._missed.fraction()

  def late_reserve_s(self, now: Optional[float] = None) -> float:
    """The `late_quantile` quantile of how much later than admission predicted the
    last 2,048 responses were sent (seconds, >= 0; 0 when off or before 64 were
    seen; recomputed when read, at most once per 64 responses). While recent
    responses miss the SLO, admission keeps it in reserve (`headroom_s`): a request
    predicted to complete by deadline - margin - reserve then misses its deadline with
    probability about 1 - late_quantile, whatever the prediction did not see (the
    front end's event loop, the host's other processes, a batch that ran long). Like
    the response delay it fades with time constant `RESPONSE_TAU_S` while nothing is
    served."""
    if self._late is None:
      return 0.0
    return max(self._late.value(), 0.0) * _fade(self._missed.t, now)

  def shed_unread(self) -> None:
    """The front end refused a request before reading it (its own backlog): counted
    as a shed, and training holds off as after any shed."""
    self.metrics.shed.labels(reason="frontend_backlog").inc()
    with self._lock:
      now = clock()
      self._shed.count(now, True)
      self._hold_training(now)

  def dropped(self, count: int, now: float) -> None:
    """A replica dropped `count` admitted requests at dispatch (`drop_late`): they
    count as shed in the recent shed fraction (instead of admitted), and training
    holds off as after any shed."""
    with self._lock:
      self._shed.turned_hits(now, count)
      self._hold_training(now)

  def recent_shed_fraction(self) -> float:
    """The fraction of recent requests that were shed (time constant SHED_TAU_S)."""
    return self._shed.fraction()

  def _hold_training(self, now: float) -> None:
    """After a shed at `now`: no replica starts a training chunk for `shed_holdoff_s` x
    min(1, recent shed fraction / HOLDOFF_FULL_FRACTION). A stray shed (a stall, a
    burst) among many served requests pauses training only briefly; sustained
    shedding (overload: 5 % or more refused) pauses it for the whole hold-off.
    Called with the lock held, after the shed is counted (`_shed`)."""
    frac = self.recent_shed_fraction()
    until = now + self.shed_holdoff_s * min(1.0, frac / HOLDOFF_FULL_FRACTION)
    for s in self.schedulers:
      s.hold_training(until)

  def response_delay_s(self, now: Optional[float] = None) -> float:
    """How long results wait for the front end to send them (seconds; EWMA mean + 2
    deviations): admission adds it to every device-side prediction. An estimate that
    is not being refreshed (nothing admitted) fades with time constant
    `RESPONSE_TAU_S`, so one overload cannot keep refusing requests after it ended."""
    return self._response.predict("delay", 0.0) * _fade(self._response_t, now)

  def completed(self, delay_s: float, at: Optional[float] = None,
                late: float = math.nan, latency: float = math.nan) -> None:
    """A response was sent `delay_s` after the scheduler finished its request (the
    response path: hand-over to the front end, its event loop, encoding), `late`
    seconds after admission predicted (negative: earlier; nan: not predicted) and
    `latency` seconds after its arrival (nan: unknown): learns them."""
    self._response.update("delay", max(0.0, delay_s))
    at = self._response_t = clock() if at is None else at
    if self._late is not None and math.isfinite(late):
      self._late.add(late)
      self._missed.count(at, latency > self.slo_s)

  def submit(self, images: np.ndarray, *, arrival: Optional[float] = None,
             deadline_ms: Optional[float] = None,
             on_done: Optional[Callable[[Pending], None]] = None) -> Pending:
    """Admits and queues `images` (n, H, W, C) float32, or raises `Shed`. `on_done` is
    called from the scheduler thread once the request's result or error is set."""
    now = clock()
    arrival = now if arrival is None else arrival
    budget = self.slo_s if deadline_ms is None else deadline_ms / 1e3
    deadline = arrival + budget
    n = int(images.shape[0])
    with self._lock:
      best, best_t = self._best(n, now)
      predicted = self._check(best, best_t, now, arrival, deadline, budget)
      self._shed.count(now, False)
      p = Pending(images=images, arrival=arrival, deadline=deadline, on_done=on_done,
                  predicted=predicted)
      best.submit(p)
    return p

  def publish(self, weights) -> None:
    """Serves `weights` on every replica from its next batch on."""
    for s in self.schedulers:
      s.set_weights(weights)
    self.metrics.model_version.set(weights.version)
