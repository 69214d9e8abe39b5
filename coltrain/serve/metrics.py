"""Prometheus metrics of one server (its own registry, so servers never share counters).

Exposed at `/metrics` in the Prometheus text format. Names (all prefixed `coltrain_`):
  requests_total{code}            HTTP inference responses by status code
  request_seconds                 server-side latency of served requests (arrival->result)
  queue_seconds, compute_seconds  per request: time queued; per batch: device time
  batch_images                    images per inference batch (before bucket padding)
  shed_total{reason}              requests refused: deadline, queue_full (admission
                                  control), frontend_backlog (refused unread by the front end)
  deadline_miss_total             served requests that finished after their deadline
  inference_busy_seconds_total{replica}, train_busy_seconds_total   device time by kind
  train_steps_total, train_samples_total, train_chunks_total, train_failures_total
  model_version, train_loss, slo_seconds   gauges
  device_cpu_seconds_total, device_cpus    with a device/host split (`serve.device_cpus`):
                                  on-CPU seconds of the threads on the device cores and
                                  their number (rate / device_cpus = device busy fraction)
  device_thread_seconds_total{replica,activity}   wall seconds of each replica's
                                  scheduler thread by activity
                                  (`THREAD_ACTIVITIES`); the
                                  activities' rates sum to 1 while the thread runs
  batching_wait_seconds{replica}, inference_busy_fraction{replica}   gauges read at each
                                  scrape: the longest a forming batch waits now (with
                                  training on it grows with the load) and the recent
                                  inference busy fraction it follows
"""

from __future__ import annotations

import bisect
import threading
from typing import Callable, Iterable, Sequence

import prometheus_client as prom
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.utils import floatToGoString

# What a replica's scheduler thread spends its wall time on
# (`DeviceScheduler.thread_seconds`, `device_thread_seconds_total{activity}`):
THREAD_ACTIVITIES = (
    "inference",          # the batches' device calls (= inference_busy_seconds_total)
    "inference_results",  # the rest of a batch: inputs, results, metrics, sending them
    "training",           # the training chunks (= train_busy_seconds_total)
    "training_other",     # the rest of a chunk's turn: its metrics
    "receive",            # receiving and admitting requests (one replica: `poll`)
    "decide",             # the loop's decisions and locking
    "wait_batch",         # idle for a fuller batch (training off)
    "wait_idle",          # nothing to do (no request, training off or done)
    "wait_incoming",      # training held while a request is being received
    "wait_holdoff",       # training held after a shed (`hold_training`)
    "wait_input",         # training held until the input thread has a micro-batch
    "wait_slack",         # training held: the chunk does not fit the slack
)

_LAT = (.0005, .001, .002, .003, .005, .0075, .01, .015, .02, .03, .05, .075, .1, .25, .5,
        1.0, 2.5)


class ServeMetrics:
  """The metric objects; `render()` is the /metrics payload."""

  def __init__(self):
    r = self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter("coltrain_requests", "Inference responses by HTTP code",
                                 ["code"], registry=r)
    self.request_seconds = Histogram("coltrain_request_seconds",
                                     "Server-side latency of served requests", _LAT, r)
    self.queue_seconds = Histogram("coltrain_queue_seconds",
                                   "Time a request waited in the queue", _LAT, r)
    self.compute_seconds = Histogram("coltrain_compute_seconds",
                                     "Device time of one inference batch", _LAT, r)
    self.batch_images = Histogram("coltrain_batch_images", "Images per inference batch",
                                  (1, 2, 4, 8, 16, 32, 64, 128, 256), r)
    self.shed = prom.Counter("coltrain_shed", "Requests refused by admission control",
                             ["reason"], registry=r)
    self.deadline_miss = prom.Counter("coltrain_deadline_miss",
                                      "Served requests finished after their deadline",
                                      registry=r)
    self.inference_busy = prom.Counter("coltrain_inference_busy_seconds",
                                       "Device seconds spent on inference", ["replica"],
                                       registry=r)
    self.train_busy = prom.Counter("coltrain_train_busy_seconds",
                                   "Device seconds spent on training chunks", registry=r)
    self.train_steps = prom.Counter("coltrain_train_steps", "Optimizer steps trained",
                                    registry=r)
    self.train_samples = prom.Counter("coltrain_train_samples", "Training samples processed",
                                      registry=r)
    self.train_chunks = prom.Counter("coltrain_train_chunks", "Training chunks run",
                                     registry=r)
    self.train_failures = prom.Counter("coltrain_train_failures",
                                       "Training failures (serving continued)", registry=r)
    self.model_version = prom.Gauge("coltrain_model_version",
                                    "Optimizer step of the weights being served", registry=r)
    self.train_loss = prom.Gauge("coltrain_train_loss", "Last training micro-batch loss",
                                 registry=r)
    self.slo_seconds = prom.Gauge("coltrain_slo_seconds", "The latency objective",
                                  registry=r)
    self.admission_headroom = prom.Gauge(
        "coltrain_admission_headroom_seconds",
        "Overload headroom admission keeps of a deadline of one SLO", registry=r)
    self.admission_late_reserve = prom.Gauge(
        "coltrain_admission_late_reserve_seconds",
        "The late_quantile of how much later than predicted responses were sent",
        registry=r)
    self.batching_wait = prom.Gauge("coltrain_batching_wait_seconds",
                                    "The longest a forming batch waits now", ["replica"],
                                    registry=r)
    self.inference_busy_fraction = prom.Gauge(
        "coltrain_inference_busy_fraction", "Recent fraction of time in inference batches",
        ["replica"], registry=r)
    self._responses: dict[int, prom.Counter] = {}

  def count_response(self, code: int, n: int = 1) -> None:
    """Counts `n` inference responses with HTTP status `code` (`requests_total`); the
    labelled child is looked up once per code, not per request."""
    c = self._responses.get(code)
    if c is None:
      c = self._responses[code] = self.requests.labels(code=str(code))
    c.inc(n)

  def track_device_cpu(self, seconds: Callable[[], float], cpus: int) -> None:
    """Exposes `coltrain_device_cpu_seconds_total` (read from `seconds()` at each
    scrape, e.g. `coltrain.cpus.DeviceCpuClock.seconds`) and `coltrain_device_cpus`."""
    self.registry.register(_DeviceCpuCollector(seconds, cpus))

  def track_thread_seconds(self, replica: int, seconds: Sequence[float],
                           activities: Sequence[str]) -> None:
    """Exposes `coltrain_device_thread_seconds_total{replica,activity}`: `seconds[i]`
    (read at each scrape; the scheduler thread adds to it) for `activities[i]`."""
    self.registry.register(_ThreadSecondsCollector(replica, seconds, activities))

  def track_batching(self, replica: int, wait_s: Callable[[], float],
                      busy: Callable[[], float]) -> None:
    """Exposes `coltrain_batching_wait_seconds{replica}` and
    `coltrain_inference_busy_fraction{replica}`, read from `wait_s()` and `busy()` at
    each scrape (`DeviceScheduler.batching_wait`, `.inference_busy`)."""
    self.batching_wait.labels(replica=str(replica)).set_function(wait_s)
    self.inference_busy_fraction.labels(replica=str(replica)).set_function(busy)

  def track_admission(self, headroom_s: Callable[[], float],
                      late_reserve_s: Callable[[], float]) -> None:
    """Exposes `coltrain_admission_headroom_seconds` (what admission now keeps of a
    deadline of one SLO under overload: `Router.headroom_s`) and
    `coltrain_admission_late_reserve_seconds` (`Router.late_reserve_s`), read at each
    scrape."""
    self.admission_headroom.set_function(headroom_s)
    self.admission_late_reserve.set_function(late_reserve_s)

  def render(self) -> bytes:
    return prom.generate_latest(self.registry)


class Histogram:
  """A Prometheus histogram (`NAME_bucket{le}`, `NAME_count`, `NAME_sum`) whose
  `observe_many` takes a whole batch's values under one lock: the serving hot path
  observes every request's queue time, and `prometheus_client.Histogram.observe` costs
  about 2.5 us a value (a Python loop over the bounds, a lock per bucket and one for the
  sum); here a value is one `bisect` and one list increment. Bounds are upper bounds,
  inclusive (`le`), as in Prometheus; a value above the last one counts only in +Inf."""

  def __init__(self, name: str, documentation: str, bounds: Sequence[float],
               registry: prom.CollectorRegistry):
    bounds = [float(b) for b in bounds]
    if not bounds or any(b >= c for b, c in zip(bounds, bounds[1:])):
      raise ValueError(f"histogram bounds must be increasing, got {bounds}")
    self.name, self.documentation, self.bounds = name, documentation, tuple(bounds)
    self._counts = [0] * (len(bounds) + 1)   # the last one: above every bound
    self._sum = 0.0
    self._lock = threading.Lock()
    registry.register(self)

  def observe(self, value: float) -> None:
    self.observe_many((value,))

  def observe_many(self, values: Iterable[float]) -> None:
    """Counts every value of `values` (seconds, images, ...)."""
    bounds, counts, find = self.bounds, self._counts, bisect.bisect_left
    with self._lock:
      total = self._sum
      for v in values:
        counts[find(bounds, v)] += 1
        total += v
      self._sum = total

  def collect(self):
    with self._lock:
      counts, total = list(self._counts), self._sum
    cumulative, buckets = 0, []
    for bound, c in zip(self.bounds + (float("inf"),), counts):
      cumulative += c
      buckets.append((floatToGoString(bound), cumulative))
    yield HistogramMetricFamily(self.name, self.documentation, buckets=buckets,
                                sum_value=total)


class _DeviceCpuCollector:
  def __init__(self, seconds: Callable[[], float], cpus: int):
    self._seconds, self._cpus = seconds, cpus

  def collect(self):
    yield CounterMetricFamily("coltrain_device_cpu_seconds",
                              "On-CPU seconds of the threads on the device cores",
                              value=self._seconds())
    yield GaugeMetricFamily("coltrain_device_cpus", "Cores reserved for the device",
                            value=self._cpus)


class _ThreadSecondsCollector:
  def __init__(self, replica: int, seconds: Sequence[float], activities: Sequence[str]):
    self._replica, self._seconds, self._activities = str(replica), seconds, activities

  def collect(self):
    m = CounterMetricFamily("coltrain_device_thread_seconds",
                            "Wall seconds of the scheduler thread by activity",
                            labels=["replica", "activity"])
    for name, value in zip(self._activities, list(self._seconds)):
      m.add_metric([self._replica, name], value)
    yield m


def parse_metrics(text: str) -> dict[str, float]:
  """Prometheus text -> {'name{labels}': value} (samples only; for clients and tests)."""
  out = {}
  for line in text.splitlines():
    if not line or line.startswith("#"):
      continue
    name, _, value = line.rpartition(" ")
    try:
      out[name] = float(value)
    except ValueError:
      continue
  return out
