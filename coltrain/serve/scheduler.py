"""One scheduler thread per device: inference first, training in the idle cycles.

`DeviceScheduler` is the only thread that runs work on its device. Its loop:

1. **Inference first.** While requests are queued it forms a batch (FIFO, whole
   requests, at most `max_batch` images) and runs it (padded to its bucket,
   `serve.batch_buckets`) on the current weights. A batch that is not full waits for
   more requests only if they arrive faster than one per `max_queue_delay` (measured
   rate), the oldest request has waited less than the batching wait (`batching_wait`:
   `max_queue_delay`, with training active longer as the load rises) and the earliest
   deadline still leaves room for the predicted batch time. With training off the
   device idles meanwhile; with training active it runs training chunks meanwhile, each
   only if a chunk may run at all (see 2: no recent shed, the input ready), it starts
   before the oldest request has waited the batching wait, ends at most
   `chunk_overrun` chunk times after that, and leaves room for the batch before the
   earliest deadline, else the batch runs at once (the device never idles for a batch
   to fill). With `drop_late` (`serve.drop_late`, on by default), a request of the
   batch whose response would be sent after its deadline even though the batch runs
   now (the batch's predicted time plus the router's measured response delay) is not
   computed: it is answered 503 with Retry-After at once, like a request shed at
   admission (at least one request of each batch always runs: `_take_batch`).
   Admission predicts when a request completes; the prediction misses when a batch
   runs long or the host stalls, and under overload, with the queue at its admission
   target, such a miss would make the request late and delay the ones behind it.
2. **Training in the slack.** With nothing queued, no request being received that
   would run at once (at a rate where its batch would form during chunks anyway,
   training goes on) and no request refused by admission control in the last
   `shed_holdoff`, it runs one
   training chunk (see `ChunkTrainer`) only if the chunk's predicted time fits
   the slack: a request that arrives just after the chunk starts waits for it, so the
   chunk plus the predicted time of the batch that will have formed meanwhile (from the
   measured arrival rate) plus the safety margin must fit in the SLO (and in
   `max_chunk`, if set). Chunk and batch times are measured online (`OnlineTimer`).
3. Otherwise it sleeps until a request arrives. With one replica behind the HTTP
   front end this thread also receives the requests (`poll`: the front end's data link,
   see `coltrain.serve.bridge`): it admits what arrived before every decision, and
   its waits are waits on that link.

Where the thread's time goes is counted in `thread_seconds` (wall seconds per
`THREAD_ACTIVITIES` entry, exposed as `coltrain_device_thread_seconds_total`): on a
CPU-emulated device this thread is the device, so the split shows how much of the
device serving takes beyond its batches and why it waited instead of training.

`expected_completion(n, now)` predicts when `n` more images would be done here (current
work, the batching wait if this scheduler would wait, queued work + their batch), for
admission control and least-expected-completion-time routing (`Router`). Weights are
swapped by reference (`set_weights`), never blocking.
"""

from __future__ import annotations

import collections
import math
import threading
from typing import Callable, Optional

import numpy as np

from coltrain.serve.metrics import THREAD_ACTIVITIES, ServeMetrics
from coltrain.serve.model import Predictor, Weights
from coltrain.serve.timing import OnlineTimer, clock
from coltrain.serve.trainer import ChunkTrainer

RATE_TAU_S = 1.0   # time constant of the arrival-rate estimate
RELAX_PER_BATCH = 0.002   # how far each batch relaxes the buckets it did not sample

# indices into `DeviceScheduler.thread_seconds` (resolved once, not per loop pass)
(_INFERENCE, _INFERENCE_RESULTS, _TRAINING, _TRAINING_OTHER, _RECEIVE, _DECIDE,
 _WAIT_BATCH, _WAIT_IDLE, _WAIT_INCOMING, _WAIT_HOLDOFF, _WAIT_INPUT,
 _WAIT_SLACK) = (THREAD_ACTIVITIES.index(a) for a in (
     "inference", "inference_results", "training", "training_other", "receive", "decide",
     "wait_batch", "wait_idle", "wait_incoming", "wait_holdoff", "wait_input",
     "wait_slack"))


_DONE_LOCK = threading.Lock()   # makes `Pending.done`'s event once


class Pending:
  """A request admitted to a replica: `images` (n, H, W, C) float32, `arrival` and
  `deadline` (`clock()` seconds). Once `result` or `error` is set the scheduler calls
  `finish()`: `done` is set and `on_done(pending)` (if any; e.g. sending the result to
  the front end) is called from the scheduler thread. (`done`, a `threading.Event`, is
  made on first use: most requests are answered through `on_done` alone.) `predicted`
  is when admission expected its response to be sent (`clock()` seconds; nan if not
  predicted): the front end reports how much later it was (`Router.completed`). A
  request dropped at dispatch (`DeviceScheduler` with `drop_late`) has `error` (why)
  and `retry_after_s` set: it is answered 503 with Retry-After, like a shed; any
  other `error` is a failure (500)."""

  __slots__ = ("images", "n", "arrival", "deadline", "predicted", "on_done",
               "finished_at", "result", "error", "retry_after_s", "_event")

  def __init__(self, images: np.ndarray, arrival: float, deadline: float,
               on_done: Optional[Callable[["Pending"], None]] = None,
               predicted: float = math.nan):
    self.images = images
    self.n = int(images.shape[0])
    self.arrival = arrival
    self.deadline = deadline
    self.predicted = predicted
    self.on_done = on_done
    self.finished_at: Optional[float] = None   # clock() when `finish()` ran
    self.result: Optional[dict] = None
    self.error: Optional[str] = None
    self.retry_after_s: Optional[float] = None   # set with `error`: dropped (503)
    self._event: Optional[threading.Event] = None

  @property
  def done(self) -> threading.Event:
    """Set once the request is finished."""
    event = self._event
    if event is None:
      with _DONE_LOCK:   # two first callers make one event
        if self._event is None:
          self._event = threading.Event()
        event = self._event
      # Read after the event is published; `finish` writes `finished_at` before it
      # reads `_event`: whichever runs second sees the other's write, so the event is
      # always set once the request is finished (without a lock in `finish`).
      if self.finished_at is not None:
        event.set()
    return event

  def finish(self) -> None:
    self.finished_at = clock()
    event = self._event
    if event is not None:
      event.set()
    if self.on_done is not None:
      self.on_done(self)


class DeviceScheduler:
  """The owner of one device (see module docstring)."""

  def __init__(self, index: int, predictor: Predictor, weights: Weights, *, slo_s: float,
               max_queue_delay_s: float, margin_s: float, max_queue: int,
               metrics: ServeMetrics, trainer: Optional[ChunkTrainer] = None,
               max_chunk_s: float = 0.0, chunk_overrun: float = 1.0,
               train_queue_delay_cap: float = 0.0, drop_late: bool = False):
    self.index = index
    self.predictor = predictor
    self.max_batch = predictor.max_batch
    self.weights = weights.to_device(predictor.device)
    self.slo_s = slo_s
    self.max_queue_delay_s = max_queue_delay_s
    self.margin_s = margin_s
    self.max_queue = max_queue
    self.metrics = metrics
    self.trainer = trainer
    self.max_chunk_s = max_chunk_s
    self.chunk_overrun = chunk_overrun
    self.train_queue_delay_cap = train_queue_delay_cap
    self.drop_late = drop_late
    self.timer = OnlineTimer()
    self._bucket_cache: Optional[tuple[int, dict[int, float]]] = None
    self._bucket_of = (0,) + tuple(predictor.bucket_for(n)     # n images -> bucket
                                   for n in range(1, self.max_batch + 1))
    self._relax_turn = 0
    self._relax_per_turn = 1.0 - (1.0 - RELAX_PER_BATCH) ** len(predictor.buckets)
    self._queue: collections.deque[Pending] = collections.deque()
    self._queued_images = 0
    # `_lock` guards the queue; `_cv` (over the same lock) is what the loop waits on.
    # The hot paths (admission asks `expected_completion` and `submit` per request)
    # take the plain lock: `Condition.__enter__` is a Python-level call.
    self._lock = threading.Lock()
    self._cv = threading.Condition(self._lock)
    self._busy_until = 0.0
    self._rate, self._rate_t = 0.0, clock()
    self._busy, self._busy_t = 0.0, clock()
    self._stopped = False
    self._thread: Optional[threading.Thread] = None
    self._on_thread_start: Optional[Callable[[], None]] = None
    self.train_skips = 0     # idle moments when the chunk did not fit the slack
    self._hold_training_until = 0.0
    self.incoming = lambda: 0  # requests being received/parsed (set by the server)
    # How long a finished request's response takes to be sent (seconds; set by the
    # router: its measured response delay), and who hears of requests dropped at
    # dispatch (`on_drop(count, now)`, called without this scheduler's lock held).
    self.response_delay: Callable[[], float] = lambda: 0.0
    self.on_drop: Callable[[int, float], None] = lambda count, now: None
    # Set when this thread receives its own requests (one replica: the front end's
    # data link): `poll(timeout)` waits up to `timeout` s for requests and admits them
    # from this thread; `wake_poll()` ends such a wait from another thread.
    self.poll: Optional[Callable[[Optional[float]], None]] = None
    self.wake_poll: Callable[[], None] = lambda: None
    # Called after this thread finished a group of requests (a batch, a failed batch,
    # the queue at shutdown): `on_done` callbacks may buffer what they send until then
    # (the front-end bridge writes a batch's results with one system call).
    self.results_done: Callable[[], None] = lambda: None
    self._ident: Optional[int] = None
    # wall seconds of the scheduler thread per THREAD_ACTIVITIES entry (only this thread
    # writes; a reader sees each float whole); `_mark`: the end of the last one counted
    self.thread_seconds = [0.0] * len(THREAD_ACTIVITIES)
    self._mark = 0.0
    self._busy_metric = metrics.inference_busy.labels(replica=str(index))

  # -- set-up ----------------------------------------------------------------------------
  def warmup(self, runs: int = 7) -> dict[int, float]:
    """Runs every bucket (and a training chunk) `runs` times and seeds the timers with
    the fastest run (start-up is noisy: compiles, other processes starting; the online
    estimates take over from the first real batches); returns seconds per bucket."""
    out = {}
    shape = self.predictor.image_shape
    for b in self.predictor.buckets:
      x = np.zeros((b,) + shape, np.float32)
      ts = []
      for _ in range(runs):
        t0 = clock()
        self.predictor(self.weights, x)
        ts.append(clock() - t0)
      out[b] = float(np.min(ts))
      self.timer.update(b, out[b])
    if self.trainer is not None and self.trainer.active:
      self.timer.update("chunk", float(np.min(self.trainer.warmup(runs))))
    return out

  def start(self, on_thread_start: Optional[Callable[[], None]] = None) -> None:
    """Starts the scheduler thread; it first calls `on_thread_start` (e.g. pinning
    itself to the device's CPUs)."""
    self._on_thread_start = on_thread_start
    self._thread = threading.Thread(target=self._loop, name=f"scheduler-{self.index}",
                                    daemon=True)
    self._thread.start()

  def stop(self, timeout: float = 10.0) -> None:
    with self._cv:
      self._stopped = True
      for p in self._queue:
        p.error = "server shutting down"
        p.finish()
      self._queue.clear()
      self._cv.notify_all()
    self.results_done()
    self.wake_poll()
    if self._thread is not None:
      self._thread.join(timeout)

  @property
  def alive(self) -> bool:
    return self._thread is not None and self._thread.is_alive()

  def wake(self) -> None:
    """Makes the loop re-check its state now (e.g. training was switched on)."""
    with self._cv:
      self._cv.notify_all()
    self.wake_poll()

  def set_weights(self, weights: Weights) -> None:
    """Serves `weights` from the next batch on (never waits for the current one).
    Published weights are never mutated (the trainer publishes fresh copies), so
    weights already on this device are served as they are."""
    if not weights.on_device(self.predictor.device):
      weights = weights.to_device(self.predictor.device)
    self.weights = weights

  # -- predictions -----------------------------------------------------------------------
  def bucket_time(self, b: int) -> float:
    """Predicted device time of bucket b: its own estimate, capped by any smaller
    bucket's estimate scaled linearly (a bigger batch never costs more per image), so
    a rarely used bucket's stale estimate cannot outweigh fresh ones."""
    return self._bucket_times()[b]

  def _bucket_times(self) -> dict[int, float]:
    """`bucket_time` of every bucket, recomputed only when the timer changed (admission
    asks for every request; the estimates change once per batch)."""
    version = self.timer.version
    cached = self._bucket_cache
    if cached is not None and cached[0] == version:
      return cached[1]
    table, per_image = {}, math.inf   # the least per-image estimate of buckets <= b
    buckets = self.predictor.buckets
    for b, own in zip(buckets, self.timer.predict_many(buckets)):
      if own is not None:
        per_image = min(per_image, own / b)
      table[b] = 0.0 if per_image == math.inf else per_image * b
    self._bucket_cache = (version, table)
    return table

  def batch_time(self, n: int) -> float:
    """Predicted device time of a batch of n images (n > max_batch: several batches)."""
    if n <= 0:
      return 0.0
    table = self._bucket_times()
    full, rem = divmod(n, self.max_batch)
    t = full * table[self.max_batch]
    if rem:
      t += table[self._bucket_of[rem]]
    return t

  def arrival_rate(self, now: float) -> float:
    """Images/s arriving here (exponentially decaying estimate)."""
    return self._rate * math.exp(-(now - self._rate_t) / RATE_TAU_S)

  def inference_busy(self, now: float) -> float:
    """The recent fraction of time this device spent in inference batches (their
    device calls; exponentially decaying estimate, time constant RATE_TAU_S)."""
    return self._busy * math.exp(-(now - self._busy_t) / RATE_TAU_S)

  def batching_wait(self, now: float) -> float:
    """The longest a batch that is not full forms, counted from its oldest request's
    arrival (seconds). With training off (the device idles meanwhile) and with
    `train_queue_delay_cap` 0 it is `max_queue_delay`. With training active the device
    trains meanwhile, and the wait grows with the load: `max_queue_delay` / (1 - U),
    U the recent inference busy fraction (`inference_busy`), at most
    `train_queue_delay_cap` x the SLO (never less than `max_queue_delay`). Each batch
    interrupts training at a cost that does not depend on its size (the serving work
    of a batch, the next chunk's slower start), and the higher the load, the larger the
    share of the slack those interruptions take; a longer wait makes batches fewer and
    larger. At low load, where they cost little, requests keep the short wait."""
    d = self.max_queue_delay_s
    cap = self.train_queue_delay_cap * self.slo_s
    if cap > d and self._training_active():
      idle = 1.0 - self.inference_busy(now)
      d = cap if idle * cap <= d else d / idle
    return d

  def expected_completion(self, n: int, now: float) -> float:
    """When n more images submitted now would be done (predicted): when their batch
    starts (`_batch_start`) plus the queued images' and these n's batch time."""
    with self._lock:
      queued = self._queued_images
      start = self._batch_start(queued + n, now)
    return start + self.batch_time(queued + n)

  def _batch_start(self, images: int, now: float) -> float:
    """The latest time a batch of `images` (the queued ones included) starts: when the
    device is free (current work, a training chunk included), or, if the batch would
    not be full and this scheduler waits for a fuller one (`_waits_for_batches`), when
    the oldest queued request (else a request arriving now) has waited
    `batching_wait`, whichever is later. With training active it waits only while a
    training chunk can run meanwhile (`_chunk_while_batch_forms`): the last chunk starts
    before that point and ends at most `chunk_overrun` chunk times after it; if none
    can (paused, input not ready, the device busy until then, or a chunk starting now
    would end later), the batch starts when the device is free. Called with the lock
    held."""
    start = max(now, self._busy_until)
    by = self._fill_deadline(images, now)
    if by is None:
      return start
    if self._training_active():
      c = self._chunk_time_if_trainable(now)
      if c is None or not self._chunk_may_start(start, c, by):
        return start
      return by + self.chunk_overrun * c   # when the last chunk ends at the latest
    return max(start, by)

  def idle(self, now: float) -> bool:
    """Nothing queued and no work predicted in progress: a request starts at once, or
    after at most the batching wait. (Admission never sheds such a request: there is
    no backlog to avoid, and serving it keeps the timing estimates fresh.)"""
    with self._lock:
      return not self._queue and self._busy_until <= now

  def hold_training(self, until: float) -> None:
    """No training chunk starts before `until` (clock()): admission control calls this
    when it refuses a request, so that training never takes cycles while inference is
    being shed (which would keep the overload going)."""
    self._hold_training_until = max(self._hold_training_until, until)

  def queue_full(self) -> bool:
    return len(self._queue) >= self.max_queue

  def chunk_fits(self, now: float) -> bool:
    """Whether a training chunk fits the slack (assuming nothing is queued)."""
    c = self.timer.predict("chunk")
    if c is None:
      return True
    if self.max_chunk_s and c > self.max_chunk_s:
      return False
    expect = 1 + int(self.arrival_rate(now) * (c + self.batching_wait(now)))
    batch = self.batch_time(min(expect, self.max_batch))
    return c + batch + self.margin_s <= self.slo_s

  # -- requests --------------------------------------------------------------------------
  def submit(self, p: Pending) -> None:
    with self._lock:
      self._queue.append(p)
      self._queued_images += p.n
      now = clock()
      self._rate = self.arrival_rate(now) + p.n / RATE_TAU_S
      self._rate_t = now
      if threading.get_ident() == self._ident:   # this thread admits it: not waiting
        return
      self._cv.notify()
    if self.poll is not None:
      self.wake_poll()   # submitted by another thread while this one polls

  def _waits_for_batches(self, now: float) -> bool:
    """Whether waiting for a fuller batch pays now: another request is likely to arrive
    within the delay (at low load a lone request runs at once instead of waiting
    `max_queue_delay`). With training off the device then idles for it (`_batch_wait`);
    with training active it trains meanwhile, in chunks that start before the oldest
    request has waited `batching_wait` (`_chunk_while_batch_forms`), and runs the
    batch at once when no chunk can. Called with the lock held."""
    return self.arrival_rate(now) * self.max_queue_delay_s >= 1.0

  def _fill_deadline(self, images: int, now: float) -> Optional[float]:
    """If a batch of `images` (the queued ones included) is not full and this scheduler
    waits for a fuller one (`_waits_for_batches`): the latest time it runs, once the
    oldest queued request (else a request arriving now) has waited `batching_wait`.
    Else None: it runs when the device is free. Called with the lock held."""
    if images >= self.max_batch or not self._waits_for_batches(now):
      return None
    return (self._queue[0].arrival if self._queue else now) + self.batching_wait(now)

  def _batch_wait(self, now: float) -> float:
    """Seconds to idle for a fuller batch (<= 0: run now; never idle with training
    active: see `_chunk_while_batch_forms`). Called with the lock held."""
    if self._training_active():
      return 0.0
    by = self._fill_deadline(self._queued_images, now)
    if by is None:
      return 0.0
    earliest = min(p.deadline for p in self._queue)
    run_by = earliest - self.batch_time(self._queued_images) - self.margin_s
    return min(by, run_by) - now

  def _training_active(self) -> bool:
    return self.trainer is not None and self.trainer.active

  def _chunk_time_if_trainable(self, now: float) -> Optional[float]:
    """The predicted chunk time if a training chunk may run now (training active, no
    request refused in the last `shed_holdoff`, the input ready, the chunk time known
    and within `max_chunk`), else None. Called with the lock held."""
    if (not self._training_active() or now < self._hold_training_until
        or not self.trainer.input_ready()):
      return None
    c = self.timer.predict("chunk")
    if c is None or (self.max_chunk_s and c > self.max_chunk_s):
      return None
    return c

  def _chunk_while_batch_forms(self, now: float) -> Optional[float]:
    """With requests queued and training active: the predicted chunk time if one
    training chunk should run before their batch, else None. The batch then keeps
    forming while the device trains (as it would while the device idles with training
    off) instead of running a batch for every chunk's worth of arrivals. A chunk runs
    only if the batch is not full, more requests are likely within the delay
    (`_waits_for_batches`), a chunk may run (`_chunk_time_if_trainable`), it starts
    before the oldest queued request has waited `batching_wait` and ends at most
    `chunk_overrun` chunk times after that (0: within the wait; 1: whenever it
    starts within it: the batch then starts up to one chunk after the wait, and
    batches are fewer and larger, which costs the device less per request), and the
    earliest deadline leaves room for the chunk, the batch that will have formed by
    then (the queued images plus the measured arrival rate's) and the margin. Called
    with the lock held."""
    by = self._fill_deadline(self._queued_images, now)
    if by is None:
      return None
    c = self._chunk_time_if_trainable(now)
    if c is None or not self._chunk_may_start(now, c, by):
      return None
    end = now + c
    expect = min(self._queued_images + int(self.arrival_rate(now) * c), self.max_batch)
    earliest = min(p.deadline for p in self._queue)
    return c if end + self.batch_time(expect) + self.margin_s <= earliest else None

  def _chunk_may_start(self, t: float, c: float, by: float) -> bool:
    """Whether a chunk of `c` seconds starting at `t` may run while a batch forms that
    is due at `by`: it starts before `by` and ends at most `chunk_overrun` x c after."""
    return t < by and t + c <= by + self.chunk_overrun * c

  def _take_batch(self, now: float) -> tuple[list[Pending], list[Pending], float]:
    """(batch, late, end): the next batch (FIFO, whole requests, at most `max_batch`
    images) and, with `drop_late`, the requests taken out of it because their
    response would be sent after their deadline even though the batch runs now:
    `end` = now + the batch's predicted time + the measured response delay (-inf
    without `drop_late`). The device always runs at least one request: if every
    request of the batch would be late, the one due last is kept, so the timings go
    on being measured (a pessimistic estimate cannot make the device drop everything
    it is given). Called with the lock held."""
    batch, n = [], 0
    queue = self._queue
    while queue and n + queue[0].n <= self.max_batch:
      p = queue.popleft()
      batch.append(p)
      n += p.n
    self._queued_images -= n
    if not self.drop_late:
      return batch, [], -math.inf
    end = now + self.batch_time(n) + self.response_delay()
    late = [p for p in batch if p.deadline < end]
    if not late:
      return batch, late, end
    if len(late) == len(batch):
      last = max(batch, key=lambda p: p.deadline)
      late.remove(last)
      return [last], late, end
    return [p for p in batch if p.deadline >= end], late, end

  def _drop(self, late: list[Pending], end: float, now: float) -> None:
    """Answers the requests `_take_batch` found late (`end`: when their response was
    predicted to be sent) with 503 + Retry-After (a shed, reason "late") and tells
    `on_drop`. Called without the lock."""
    retry_after_s = max(end - now, 0.0)
    for p in late:
      p.error = (f"overloaded: the response would be sent "
                 f"{1e3 * (end - p.arrival):.1f} ms after arrival, past the "
                 f"{1e3 * (p.deadline - p.arrival):.1f} ms deadline; retry later")
      p.retry_after_s = retry_after_s
      p.finish()
    self.metrics.shed.labels(reason="late").inc(len(late))
    self.results_done()
    self.on_drop(len(late), now)

  # -- the loop --------------------------------------------------------------------------
  def _spend(self, activity: int, until: Optional[float] = None) -> None:
    """Counts the time from the last mark to `until` (default: now) as `activity` (a
    THREAD_ACTIVITIES index), and marks `until`."""
    if until is None:
      until = clock()
    self.thread_seconds[activity] += until - self._mark
    self._mark = until

  def _wait(self, timeout: float, why: int) -> None:
    """Waits (with `_cv` held once) up to `timeout` s for a request: on the condition,
    or receiving requests with `poll` (the lock released meanwhile). The wait counts as
    activity `why`, the requests received during it as "receive"."""
    self._spend(_DECIDE)
    poll = self.poll
    handled = 0.0
    if poll is None:
      self._cv.wait(timeout)
    else:
      self._cv.release()
      try:
        handled = poll(timeout) or 0.0
      finally:
        self._cv.acquire()
    self.thread_seconds[_RECEIVE] += handled
    self.thread_seconds[why] -= handled
    self._spend(why)

  def _loop(self) -> None:
    self._ident = threading.get_ident()
    if self._on_thread_start is not None:
      self._on_thread_start()
    self._mark = clock()
    while True:
      batch = late = None
      train = False
      poll = self.poll
      if poll is not None:   # admit what arrived during the last device call
        self._spend(_DECIDE)
        poll(0.0)
        self._spend(_RECEIVE)
      with self._cv:
        while True:
          if self._stopped:
            return
          now = clock()
          if self._queue:
            chunk = self._chunk_while_batch_forms(now)
            if chunk is not None:
              train = True
              self._busy_until = now + chunk
              break
            wait = self._batch_wait(now)
            if wait <= 0:
              batch, late, late_end = self._take_batch(now)
              self._busy_until = now + self.batch_time(sum(p.n for p in batch))
              break
            self._wait(wait, _WAIT_BATCH)
            continue
          if self._training_active():
            if self.incoming() and not self._waits_for_batches(now):
              # a request is being parsed: it will be queued soon, and run at once
              self._wait(0.0005, _WAIT_INCOMING)
              continue
            if now < self._hold_training_until:   # requests were refused just now
              self._wait(min(self._hold_training_until - now, 0.01),
                         _WAIT_HOLDOFF)
              continue
            if not self.trainer.input_ready():    # never wait for input on the device
              self._wait(0.001, _WAIT_INPUT)
              continue
            if self.chunk_fits(now):
              train = True
              self._busy_until = now + (self.timer.predict("chunk") or 0.0)
              break
            self.train_skips += 1
            # Re-check every 10 ms as the arrival-rate estimate decays; relax the
            # estimates that decide (chunk and batch times, half-life ~0.7 s: they are
            # not being sampled now) so one slow spell cannot starve training.
            self.timer.relax_all(0.01)
            self._wait(0.01, _WAIT_SLACK)
            continue
          self._wait(0.1, _WAIT_IDLE)
      self._spend(_DECIDE)
      try:
        if late:
          self._drop(late, late_end, now)
        if batch:
          self._run_inference(batch)
          self._spend(_INFERENCE_RESULTS)
        elif train:
          self._run_chunk()
          self._spend(_TRAINING_OTHER)
      except Exception as e:  # never let one bad batch kill the device loop
        for p in [*(late or ()), *(batch or ())]:
          if p.finished_at is None:
            p.error = f"inference failed: {type(e).__name__}: {e}"
            p.finish()
        if batch or late:
          self.results_done()
        if train and self.trainer is not None and self.trainer.failure is None:
          self.trainer.failure = f"training chunk raised {type(e).__name__}: {e}"
          self.metrics.train_failures.inc()
      finally:
        with self._cv:
          self._busy_until = clock()

  def _run_inference(self, batch: list[Pending]) -> None:
    images = batch[0].images if len(batch) == 1 else np.concatenate([p.images for p in batch])
    n = images.shape[0]
    weights = self.weights
    t0 = clock()
    logits = self.predictor(weights, images)
    t1 = clock()
    dt = t1 - t0
    self._spend(_INFERENCE_RESULTS, t0)   # the device call is "inference", the rest of
    self._spend(_INFERENCE, t1)           # the batch "inference_results"
    b = self._bucket_of[n]
    self.timer.update(b, dt)
    # Estimates not sampled now slowly relax: one other bucket per batch, in turn, by
    # what `RELAX_PER_BATCH` a batch would have moved it since its last turn.
    buckets = self.predictor.buckets
    self._relax_turn = turn = (self._relax_turn + 1) % len(buckets)
    if buckets[turn] != b:
      self.timer.relax(buckets[turn], self._relax_per_turn)
    m = self.metrics
    self._busy_metric.inc(dt)
    self._busy = self.inference_busy(t1) + dt / RATE_TAU_S
    self._busy_t = t1
    m.compute_seconds.observe(dt)
    m.batch_images.observe(n)
    waits = [t0 - p.arrival for p in batch]
    m.queue_seconds.observe_many(waits)
    version, compute_ms, index = weights.version, dt * 1e3, self.index
    misses = i = 0
    for p, wait in zip(batch, waits):
      if t1 > p.deadline:
        misses += 1
      j = i + p.n
      p.result = {"logits": logits[i:j], "version": version, "queue_ms": wait * 1e3,
                  "compute_ms": compute_ms, "replica": index, "batch_size": n}
      i = j
      p.finish()
    if misses:
      m.deadline_miss.inc(misses)
    self.results_done()

  def _run_chunk(self) -> None:
    tr = self.trainer
    steps_before, failed_before = tr.opt_steps, tr.failure is not None
    t0 = clock()
    samples = tr.run_chunk()
    t1 = clock()
    dt = t1 - t0
    self._spend(_TRAINING_OTHER, t0)   # the chunk is "training", its metrics
    self._spend(_TRAINING, t1)         # "training_other"
    if samples:
      self.timer.update("chunk", dt)
    m = self.metrics
    m.train_busy.inc(dt)
    m.train_chunks.inc()
    m.train_samples.inc(samples)
    m.train_steps.inc(tr.opt_steps - steps_before)
    if tr.last_loss == tr.last_loss:
      m.train_loss.set(tr.last_loss)
    if tr.failure is not None and not failed_before:
      m.train_failures.inc()
