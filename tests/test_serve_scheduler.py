"""Device scheduler, router and online timer logic, with fake device work (no JAX
compute): batching, inference priority, training only in fitting slack, admission
control and least-expected-completion-time routing."""

import threading
import time

import jax
import numpy as np
import pytest

from coltrain.serve.metrics import ServeMetrics, parse_metrics
from coltrain.serve.buckets import (bucket_for, buckets_up_to, parse_buckets,
                                    quarter_octave_buckets)
from coltrain.serve.model import Weights
from coltrain.serve.router import Router, Shed
from coltrain.serve.scheduler import RATE_TAU_S, DeviceScheduler, Pending, clock
from coltrain.serve.timing import DecayedFraction, OnlineTimer, RecentQuantile

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)

SHAPE = (2, 2, 1)


class FakePredictor:
  """Logits row i = [sum of image i, version]; records batch sizes."""

  def __init__(self, max_batch=8, fail_on=None, buckets=None):
    self.max_batch = max_batch
    self.buckets = buckets or buckets_up_to(max_batch)
    self.image_shape = SHAPE
    self.device = jax.devices()[0]
    self.sizes = []
    self.log = None
    self.fail_on = fail_on

  def bucket_for(self, n):
    return bucket_for(n, self.buckets)

  def __call__(self, weights, images):
    n = images.shape[0]
    if self.log is not None:
      self.log.append(("infer", n))
    self.sizes.append(n)
    if self.fail_on is not None and n == self.fail_on:
      raise RuntimeError("boom")
    s = images.reshape(n, -1).sum(1)
    return np.stack([s, np.full(n, weights.version, np.float64)], 1)


class FakeTrainer:
  def __init__(self, log):
    self.log = log
    self.enabled = True
    self.failure = None
    self.opt_steps = 0
    self.last_loss = 1.0
    self.calls = 0

  @property
  def active(self):
    return self.enabled and self.failure is None

  def warmup(self, runs=3):
    return [0.001] * runs

  def input_ready(self):
    return True

  def run_chunk(self):
    self.calls += 1
    self.log.append(("chunk", 1))
    time.sleep(0.001)
    self.opt_steps += 1
    return 4


def make_sched(index=0, trainer=None, slo=1.0, max_batch=8, max_queue=100, delay=0.0,
               metrics=None, predictor=None, infer_s=lambda b: 0.001, drop_late=False):
  pred = predictor or FakePredictor(max_batch)
  s = DeviceScheduler(index, pred, Weights(0, {}, {}), slo_s=slo, max_queue_delay_s=delay,
                      margin_s=0.0, max_queue=max_queue, metrics=metrics or ServeMetrics(),
                      trainer=trainer, drop_late=drop_late)
  for b in pred.buckets:
    s.timer.update(b, infer_s(b))
  return s, pred


def pending(n, value=1.0, deadline=60.0):
  now = clock()
  return Pending(images=np.full((n,) + SHAPE, value, np.float32), arrival=now,
                 deadline=now + deadline)


def wait_for(cond, timeout=30.0):
  end = time.time() + timeout
  while not cond():
    if time.time() > end:
      raise AssertionError("condition not reached in time")
    time.sleep(0.005)


def test_default_buckets_pad_a_batch_by_less_than_a_quarter():
  assert parse_buckets("", 32) == quarter_octave_buckets(32) == (
      1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32)
  assert quarter_octave_buckets(64)[-5:] == (32, 40, 48, 56, 64)
  assert quarter_octave_buckets(1) == (1,) and quarter_octave_buckets(6) == (1, 2, 3, 4, 5, 6)
  for m in (8, 32, 256):
    b = quarter_octave_buckets(m)
    assert b[-1] == m and list(b) == sorted(set(b))
    assert all(bucket_for(n, b) - n < max(1, n / 4) for n in range(1, m + 1))


def test_pow2_buckets():
  assert buckets_up_to(8) == (1, 2, 4, 8)
  assert buckets_up_to(1) == (1,) and buckets_up_to(24) == (1, 2, 4, 8, 16, 24)
  assert parse_buckets("pow2", 8) == (1, 2, 4, 8)
  b = buckets_up_to(8)
  assert [bucket_for(n, b) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
  for n in (0, 9):
    with pytest.raises(ValueError, match="outside"):
      bucket_for(n, b)


def test_given_buckets_are_sorted_and_end_at_the_max_batch():
  b = parse_buckets(" 6, 1,2,3,4,12", 16)
  assert b == (1, 2, 3, 4, 6, 12, 16)   # sorted, max_batch added
  assert [bucket_for(n, b) for n in range(1, 17)] == [
      1, 2, 3, 4, 6, 6, 12, 12, 12, 12, 12, 12, 16, 16, 16, 16]
  assert parse_buckets("5", 8) == (5, 8)   # a batch of 1..5 pads to 5
  for spec, msg in (("1,x", "not an integer"), ("0,4", "outside"), ("1,9", "outside"),
                    ("2,2", "given twice"), ("1,,2", "not an integer")):
    with pytest.raises(ValueError, match=msg):
      parse_buckets(spec, 8)


def test_batch_time_follows_the_given_buckets():
  pred = FakePredictor(8, buckets=(1, 2, 3, 4, 6, 8))
  s, _ = make_sched(predictor=pred, infer_s=lambda b: 0.001 * (1 + b))
  # each batch is predicted at its own bucket's time: 5 images run bucket 6, 7 bucket 8,
  # 11 = a full batch of 8 plus 3 (bucket 3)
  t = {b: s.bucket_time(b) for b in pred.buckets}
  assert t[3] < t[4] < t[6] < t[8]
  assert s.batch_time(5) == t[6] and s.batch_time(7) == t[8]
  assert s.batch_time(11) == pytest.approx(t[8] + t[3])
  counts = {b: s.timer.count(b) for b in pred.buckets}
  p = pending(5)
  s.submit(p)
  s.start()
  try:
    assert p.done.wait(30)
  finally:
    s.stop()
  assert pred.sizes == [5]
  # the batch's measured time went to bucket 6's estimate, and only there
  assert {b: s.timer.count(b) - counts[b] for b in pred.buckets} == {
      1: 0, 2: 0, 3: 0, 4: 0, 6: 1, 8: 0}


def test_batches_are_fifo_whole_requests_and_results_map_back():
  s, pred = make_sched(max_batch=8)
  reqs = [pending(3, value=float(i)) for i in range(5)]
  for p in reqs:
    s.submit(p)
  s.start()
  try:
    for p in reqs:
      assert p.done.wait(30)
  finally:
    s.stop()
  assert pred.sizes == [6, 6, 3]
  for i, p in enumerate(reqs):
    assert p.error is None
    np.testing.assert_allclose(p.result["logits"][:, 0], 4.0 * i)  # 2x2 pixels of value i
    assert p.result["version"] == 0 and p.result["batch_size"] in (6, 3)


class FakeLink:
  """A data link for a scheduler that receives its own requests: `poll` admits what
  the test put in `inbox`, else waits until woken (ignoring the timeout: a wait that
  no wake-up ends would stall the test)."""

  def __init__(self, sched):
    self.sched, self.inbox, self.polls = sched, [], []
    self.woken = threading.Event()

  def poll(self, timeout):
    self.polls.append(timeout)
    if not self.inbox and timeout:
      self.woken.wait(30)
    self.woken.clear()
    while self.inbox:
      self.sched.submit(self.inbox.pop(0))

  def wake(self):
    self.woken.set()


def test_a_scheduler_that_receives_its_own_requests_admits_them_before_deciding():
  s, pred = make_sched(max_batch=8)
  link = FakeLink(s)
  s.poll, s.wake_poll = link.poll, link.wake
  s.start()
  try:
    wait_for(lambda: len(link.polls) >= 2)      # idle: waiting on its link
    reqs = [pending(2, value=float(i)) for i in range(3)]
    link.inbox.extend(reqs)
    link.wake()                                  # a message arrives
    for p in reqs:
      assert p.done.wait(30)
    # one batch: everything received was admitted before the batch was formed
    assert pred.sizes == [6]
    late = pending(1)                            # submitted by another thread:
    s.submit(late)                               # the link wait is ended at once
    assert late.done.wait(5)
  finally:
    s.stop()
  assert 0.0 in link.polls                       # drained between device calls


class SlowPredictor(FakePredictor):
  def __call__(self, weights, images):
    time.sleep(0.002)
    return super().__call__(weights, images)


def test_the_thread_accounting_splits_its_wall_time_by_activity():
  """`thread_seconds` adds up to the thread's wall time, and each activity gets what it
  did: batches, chunks, the link's admission work, a hold-off, idling."""
  log = []
  trainer = FakeTrainer(log)                       # chunks of 1 ms
  pred = SlowPredictor(8)                          # batches of 2 ms
  s, _ = make_sched(trainer=trainer, predictor=pred)
  woken, inbox, handled = threading.Event(), [], []

  def poll(timeout):                               # a link that honours its timeout
    if not inbox and timeout:
      woken.wait(timeout)
    woken.clear()
    if not inbox:
      return 0.0
    t0 = clock()
    while inbox:
      s.submit(inbox.pop(0))
    time.sleep(0.003)                              # admission work, as the link reports it
    handled.append(clock() - t0)
    return handled[-1]

  s.poll, s.wake_poll = poll, woken.set
  metrics = ServeMetrics()
  from coltrain.serve.metrics import THREAD_ACTIVITIES
  metrics.track_thread_seconds(0, s.thread_seconds, THREAD_ACTIVITIES)
  t_start = clock()
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 20)
    trainer.enabled = False                        # idle: requests arrive on the link
    s.wake()
    time.sleep(0.05)
    reqs = [pending(1) for _ in range(3)]
    inbox.extend(reqs)
    woken.set()
    for p in reqs:
      assert p.done.wait(30)
    trainer.enabled = True                         # a shed: training held for 0.1 s
    s.hold_training(clock() + 0.1)
    s.wake()
    time.sleep(0.15)
  finally:
    s.stop()
  t_stop = clock()
  acc = dict(zip(THREAD_ACTIVITIES, s.thread_seconds))
  assert all(v >= 0 for v in acc.values()), acc
  # every moment of the thread is counted once: from its start to its exit
  assert t_stop - t_start - 0.05 <= sum(acc.values()) <= t_stop - t_start
  assert acc["inference"] >= 0.002 * len(pred.sizes) and len(pred.sizes) >= 1
  assert acc["training"] >= 0.001 * trainer.calls
  assert acc["receive"] >= sum(handled) >= 0.003   # the link's work, out of the wait
  assert acc["wait_holdoff"] >= 0.08
  assert acc["wait_idle"] >= 0.04
  assert acc["wait_batch"] == acc["wait_slack"] == acc["wait_input"] == 0.0
  scraped = parse_metrics(metrics.render().decode())
  for name, v in acc.items():
    assert scraped[f'coltrain_device_thread_seconds_total{{activity="{name}",replica="0"}}'] == v


def test_inference_runs_before_any_training_chunk_while_requests_wait():
  log = []
  trainer = FakeTrainer(log)
  s, pred = make_sched(trainer=trainer, max_batch=2)
  pred.log = log
  reqs = [pending(1) for _ in range(6)]
  for p in reqs:
    s.submit(p)
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 3)
  finally:
    s.stop()
  first_chunk = log.index(("chunk", 1))
  assert [k for k, _ in log[:first_chunk]] == ["infer"] * 3
  assert all(p.done.is_set() for p in reqs)


def test_training_fills_idle_time_and_requests_are_still_served():
  log = []
  trainer = FakeTrainer(log)
  s, _ = make_sched(trainer=trainer)
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 5)
    p = pending(2)
    s.submit(p)
    assert p.done.wait(30) and p.error is None
    calls = trainer.calls
    wait_for(lambda: trainer.calls > calls)  # and training resumes afterwards
  finally:
    s.stop()


def test_a_chunk_that_does_not_fit_the_slack_never_runs():
  log = []
  trainer = FakeTrainer(log)
  s, _ = make_sched(trainer=trainer, slo=0.010)
  s.timer.update("chunk", 0.050)  # predicted chunk 50 ms > SLO 10 ms
  assert not s.chunk_fits(clock())
  s.start()
  try:
    wait_for(lambda: s.train_skips >= 5)
  finally:
    s.stop()
  assert trainer.calls == 0


def test_chunk_slack_accounts_for_max_chunk_and_arrival_rate():
  s, _ = make_sched(trainer=FakeTrainer([]), slo=0.010, infer_s=lambda b: 0.0015 * b)
  s.timer.update("chunk", 0.004)
  assert s.chunk_fits(clock())
  s.max_chunk_s = 0.002
  assert not s.chunk_fits(clock())
  s.max_chunk_s = 0.0
  for _ in range(100):  # a high arrival rate: a big batch forms during the chunk
    s._rate, s._rate_t = 5000.0, clock()
  assert not s.chunk_fits(clock())


def test_paused_or_failed_trainer_does_not_train():
  log = []
  trainer = FakeTrainer(log)
  trainer.enabled = False
  s, _ = make_sched(trainer=trainer)
  s.start()
  try:
    p = pending(1)
    s.submit(p)
    assert p.done.wait(30)
    time.sleep(0.05)
    assert trainer.calls == 0
    trainer.enabled = True
    wait_for(lambda: trainer.calls >= 1)
    trainer.failure = "nan"
    calls = trainer.calls
    time.sleep(0.05)
    assert trainer.calls <= calls + 1   # at most the chunk that was already deciding
  finally:
    s.stop()


def test_a_failing_batch_reports_an_error_and_the_loop_survives():
  s, pred = make_sched(predictor=FakePredictor(fail_on=3))
  bad, good = pending(3), pending(1)
  s.submit(bad)
  s.start()
  try:
    assert bad.done.wait(30)
    assert "boom" in bad.error
    s.submit(good)
    assert good.done.wait(30) and good.error is None
  finally:
    s.stop()


def _run_until_done(s, *requests):
  """Queues `requests` on `s` and runs it until all are finished; -> the on_drop
  calls [(count, now)]."""
  drops = []
  s.on_drop = lambda count, now: drops.append((count, now))
  for p in requests:
    s.submit(p)
  s.start()
  try:
    assert all(p.done.wait(30) for p in requests)
  finally:
    s.stop()
  return drops


def _late_and_on_time(s, late_deadline_s):
  """Runs `s` on a request due in `late_deadline_s` and one due in 60 s; -> (late,
  on_time, on_drop calls)."""
  late, on_time = pending(1, 2.0, deadline=late_deadline_s), pending(2, 3.0)
  return late, on_time, _run_until_done(s, late, on_time)


def test_with_drop_late_a_request_that_would_miss_its_deadline_is_dropped_not_computed():
  metrics = ServeMetrics()
  s, pred = make_sched(metrics=metrics, infer_s=lambda b: 0.05, drop_late=True)
  late, on_time, drops = _late_and_on_time(s, 0.010)   # 50 ms batch, 10 ms deadline
  assert late.result is None and late.retry_after_s is not None
  assert 0 < late.retry_after_s <= 0.2           # about one batch time
  assert late.error.startswith("overloaded: the response would be sent")
  assert "past the 10.0 ms deadline" in late.error
  assert on_time.error is None and on_time.result["logits"][:, 0].tolist() == [12.0, 12.0]
  assert pred.sizes == [2]                   # only the request on time was computed
  assert [count for count, _ in drops] == [1]
  m = parse_metrics(metrics.render().decode())
  assert m['coltrain_shed_total{reason="late"}'] == 1


def test_drop_late_always_computes_one_request_of_a_batch():
  # every request would be late: the one due last runs (the timings stay measured)
  s, pred = make_sched(infer_s=lambda b: 0.05, drop_late=True)
  first, last = pending(1, 2.0, deadline=0.010), pending(2, 3.0, deadline=0.020)
  assert [count for count, _ in _run_until_done(s, first, last)] == [1]
  assert first.retry_after_s is not None and first.result is None
  assert last.error is None and pred.sizes == [2]


def test_without_drop_late_a_request_predicted_late_is_still_computed():
  metrics = ServeMetrics()
  s, pred = make_sched(metrics=metrics, infer_s=lambda b: 0.05)
  late, on_time, drops = _late_and_on_time(s, 0.010)
  assert late.error is None and late.result["logits"][:, 0].tolist() == [8.0]
  assert on_time.error is None and pred.sizes == [3] and drops == []
  m = parse_metrics(metrics.render().decode())
  assert 'coltrain_shed_total{reason="late"}' not in m


def test_drop_late_counts_the_measured_response_delay():
  s, pred = make_sched(infer_s=lambda b: 0.001, drop_late=True)
  s.response_delay = lambda: 0.5            # responses take 0.5 s to be sent
  late, on_time, drops = _late_and_on_time(s, 0.2)
  assert late.retry_after_s is not None and on_time.error is None
  assert pred.sizes == [2] and [count for count, _ in drops] == [1]
  s2, pred2 = make_sched(infer_s=lambda b: 0.001, drop_late=True)   # 0 delay: on time
  late2, on_time2, drops2 = _late_and_on_time(s2, 0.2)
  assert late2.error is None and on_time2.error is None and drops2 == []


def test_a_drop_at_dispatch_turns_an_admitted_request_into_a_shed_one():
  s, _ = make_sched(slo=0.05, max_queue=10_000, drop_late=True)
  router = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.0, shed_holdoff_s=0.4)
  assert s.on_drop == router.dropped and s.response_delay == router.response_delay_s
  for _ in range(3):
    router.submit(np.zeros((1,) + SHAPE, np.float32), deadline_ms=60_000)
  assert router.recent_shed_fraction() == 0.0
  now = clock()
  router.dropped(1, now)
  # one of the three is shed now (the three decay a little while they are submitted)
  assert 1 / 3 <= router.recent_shed_fraction() <= 1 / 3 * 1.05
  assert s._hold_training_until > now        # training holds off as after a shed


def test_router_sends_to_the_replica_that_finishes_first():
  metrics = ServeMetrics()
  a, _ = make_sched(0, metrics=metrics)
  b, _ = make_sched(1, metrics=metrics)
  for _ in range(4):        # replica 0 has a backlog (not started: nothing drains)
    a.submit(pending(8))
  r = Router([a, b], metrics, slo_s=1.0, margin_s=0.0)
  p = r.submit(np.zeros((1,) + SHAPE, np.float32))
  assert p in b._queue and p not in a._queue
  assert b.expected_completion(1, clock()) < a.expected_completion(1, clock())


def test_router_sheds_requests_that_would_miss_their_deadline():
  metrics = ServeMetrics()
  s, _ = make_sched(metrics=metrics, infer_s=lambda b: 0.5)   # 0.5 s per batch...
  s.submit(pending(8))         # ...and a backlog
  r = Router([s], metrics, slo_s=0.010, margin_s=0.0)
  with pytest.raises(Shed) as e:
    r.submit(np.zeros((1,) + SHAPE, np.float32))
  assert e.value.reason == "deadline" and e.value.retry_after_s > 0
  assert "misses the 10.0 ms admitted for the 10.0 ms deadline" in str(e.value)
  # a longer per-request deadline is admitted
  p = r.submit(np.zeros((1,) + SHAPE, np.float32), deadline_ms=30_000)
  assert p in s._queue
  m = parse_metrics(metrics.render().decode())
  assert m['coltrain_shed_total{reason="deadline"}'] == 1


def test_an_idle_replica_is_never_shed_even_with_pessimistic_timings():
  metrics = ServeMetrics()
  s, _ = make_sched(metrics=metrics, infer_s=lambda b: 5.0)
  r = Router([s], metrics, slo_s=0.010, margin_s=0.0)
  p = r.submit(np.zeros((1,) + SHAPE, np.float32))
  assert p in s._queue


def test_full_queues_shed():
  metrics = ServeMetrics()
  s, _ = make_sched(metrics=metrics, max_queue=2)
  r = Router([s], metrics, slo_s=10.0, margin_s=0.0)
  r.submit(np.zeros((1,) + SHAPE, np.float32))
  r.submit(np.zeros((1,) + SHAPE, np.float32))
  with pytest.raises(Shed) as e:
    r.submit(np.zeros((1,) + SHAPE, np.float32))
  assert e.value.reason == "queue_full"


def test_published_weights_serve_the_next_batches_on_every_replica():
  metrics = ServeMetrics()
  scheds = [make_sched(i, metrics=metrics)[0] for i in range(2)]
  r = Router(scheds, metrics, slo_s=1.0, margin_s=0.0)
  r.publish(Weights(7, {}, {}))
  assert [s.weights.version for s in scheds] == [7, 7]
  scheds[1].start()
  try:
    p = pending(1)
    scheds[1].submit(p)
    assert p.done.wait(30)
  finally:
    scheds[1].stop()
  assert p.result["version"] == 7 and p.result["logits"][0, 1] == 7
  assert parse_metrics(metrics.render().decode())["coltrain_model_version"] == 7


def test_online_timer():
  t = OnlineTimer(alpha=0.5, k_dev=2.0)
  assert t.predict("x") is None and t.predict("x", 3.0) == 3.0
  t.update("x", 1.0)
  assert t.mean("x") == 1.0 and t.predict("x") == pytest.approx(1.5)
  t.update("x", 1.0)
  assert t.mean("x") == 1.0 and t.predict("x") < 1.5
  before = t.mean("x")
  t.update("x", 1000.0)   # an outlier is clipped before averaging
  assert before < t.mean("x") < 2.0
  for _ in range(60):     # a lasting slowdown is followed
    t.update("x", 10.0)
  assert t.mean("x") == pytest.approx(10.0, rel=0.05)
  with pytest.raises(ValueError):
    t.update("x", -1.0)
  assert t.predict_many(["x", "never"]) == [t.predict("x"), None]   # the same formula


def test_stale_estimates_relax_so_training_resumes():
  log = []
  trainer = FakeTrainer(log)
  s, _ = make_sched(trainer=trainer, slo=0.010, infer_s=lambda b: 0.0005 * b)
  s.timer.update("chunk", 0.001)      # the fastest chunk seen...
  for b in s.predictor.buckets:       # ...then a slow spell inflated every estimate
    for _ in range(30):
      s.timer.update(b, 0.2)
  for _ in range(30):
    s.timer.update("chunk", 0.2)
  assert not s.chunk_fits(clock())
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 1)
  finally:
    s.stop()
  assert s.train_skips > 0


def _batch_wait_after(s, arrivals):
  """`_batch_wait` right after `arrivals` requests were submitted (rate estimate
  updated)."""
  for _ in range(arrivals):
    s.submit(pending(1))
  with s._cv:
    return s._batch_wait(clock())


def test_batching_idles_only_when_more_requests_are_likely_and_training_is_off():
  delay = 0.05
  s, _ = make_sched(delay=delay)         # 1 request: rate ~1/s x 50 ms << 1: run at once
  assert _batch_wait_after(s, 1) <= 0
  s, _ = make_sched(delay=delay, max_batch=1024)
  w = _batch_wait_after(s, 100)
  assert 0 < w <= delay                  # waits for a fuller batch, at most the delay
  s, _ = make_sched(delay=delay, max_batch=1024, trainer=FakeTrainer([]))
  assert _batch_wait_after(s, 100) <= 0   # training active: never idle-wait (it trains
                                          # meanwhile: `_chunk_while_batch_forms`)


def test_predicted_completion_counts_the_batching_wait_only_when_the_scheduler_waits():
  delay, t1 = 0.05, 0.001

  def predicted_start(trainer=None, chunk_s=0.001, hold=False, busy_s=0.0, overrun=1.0):
    """(expected completion - batch time, oldest arrival, now, predicted chunk time)
    after 100 fast arrivals, the device busy for `busy_s` more."""
    s, _ = make_sched(delay=delay, max_batch=1024, trainer=trainer, infer_s=lambda b: t1)
    s.chunk_overrun = overrun
    if chunk_s is not None:
      s.timer.update("chunk", chunk_s)
    if hold:
      s.hold_training(clock() + 10)
    _batch_wait_after(s, 100)           # high arrival rate: batching pays
    now = clock()
    s._busy_until = now + busy_s
    return (s.expected_completion(1, now) - s.batch_time(101), s._queue[0].arrival, now,
            s.timer.predict("chunk"))

  # training off (the device idles for the batch): the batch starts at the latest once
  # the oldest request waited the delay
  start, oldest, _, _ = predicted_start(None)
  assert start == pytest.approx(oldest + delay, abs=1e-3)
  # training on with a chunk that can run meanwhile: the last chunk starts before then
  # and may end a chunk's time later
  for chunk_s in (0.001, 2 * delay):
    start, oldest, _, c = predicted_start(FakeTrainer([]), chunk_s=chunk_s)
    assert c >= chunk_s and start == pytest.approx(oldest + delay + c, abs=1e-3)
  # chunk_overrun 0: the last chunk ends by then; one that cannot is not waited for
  start, oldest, _, _ = predicted_start(FakeTrainer([]), overrun=0.0)
  assert start == pytest.approx(oldest + delay, abs=1e-3)
  start, _, now, _ = predicted_start(FakeTrainer([]), chunk_s=2 * delay, overrun=0.0)
  assert start == pytest.approx(now, abs=1e-3)
  # training on but no chunk can run while the batch forms: it runs when the device is
  # free
  for kw in ({"hold": True},               # requests were shed just now
             {"chunk_s": None},            # chunk time unknown
             {"busy_s": 2 * delay}):       # the device is busy past the delay
    start, _, now, _ = predicted_start(FakeTrainer([]), **kw)
    assert start == pytest.approx(now + kw.get("busy_s", 0.0), abs=1e-3)
  s, _ = make_sched(delay=delay, infer_s=lambda b: t1)   # low rate: no wait
  now = clock()
  assert s.expected_completion(1, now) == pytest.approx(now + s.bucket_time(1), abs=1e-4)


def _chunk_first_after(s, arrivals, now=None):
  for _ in range(arrivals):
    s.submit(pending(1))
  with s._cv:
    return s._chunk_while_batch_forms(clock() if now is None else now) is not None


def test_with_training_a_batch_forms_during_chunks_that_start_within_the_delay():
  delay, chunk = 0.05, 0.001
  def sched(trainer=True, max_batch=1024, chunk_s=chunk, **kw):
    s, _ = make_sched(delay=delay, max_batch=max_batch, slo=1.0,
                      trainer=FakeTrainer([]) if trainer else None,
                      infer_s=lambda b: 0.0001 * b, **kw)
    if chunk_s is not None:
      s.timer.update("chunk", chunk_s)
    return s
  assert _chunk_first_after(sched(), 100)             # young queue, more coming: train
  s = sched()
  _chunk_first_after(s, 100)
  oldest, c = s._queue[0].arrival, s.timer.predict("chunk")
  by = oldest + delay   # when the oldest request has waited the delay
  with s._cv:
    # chunk_overrun 1 (default): a chunk may start until then, whenever it ends
    for start, runs in ((by - 2 * c, True), (by - c / 2, True), (by - 0.01 * c, True),
                        (by, False), (by + c, False)):
      assert (s._chunk_while_batch_forms(start) == c) == runs, start - by
    # 0: only a chunk that ends by then; 0.5: one that ends at most half a chunk later
    for overrun, start, runs in ((0.0, by - 2 * c, True), (0.0, by - c / 2, False),
                                 (0.5, by - 0.6 * c, True), (0.5, by - 0.4 * c, False)):
      s.chunk_overrun = overrun
      assert (s._chunk_while_batch_forms(start) == c) == runs, (overrun, start - by)
  assert not _chunk_first_after(sched(), 1)           # low rate: no batch to wait for
  assert not _chunk_first_after(sched(trainer=False), 100)   # nothing to train
  assert not _chunk_first_after(sched(chunk_s=None), 100)    # chunk time unknown yet
  assert not _chunk_first_after(sched(max_batch=64), 100)    # the batch is full
  s = sched()
  s.max_chunk_s = chunk / 2
  assert not _chunk_first_after(s, 100)               # the chunk exceeds max_chunk
  s = sched()
  s.hold_training(clock() + 10)
  assert not _chunk_first_after(s, 100)               # requests were shed just now
  # a request whose deadline leaves room for the batch but not for a chunk before it
  for room_for_chunk in (False, True):
    s = sched()
    for _ in range(30):
      s.submit(pending(1))
    batch, c = s.batch_time(32), s.timer.predict("chunk")   # 31 queued: bucket 32
    s.submit(pending(1, deadline=batch + (c + 0.01 if room_for_chunk else c / 2)))
    with s._cv:
      assert (s._chunk_while_batch_forms(clock()) is not None) == room_for_chunk


def test_with_training_the_batching_wait_grows_with_the_inference_load():
  delay, slo, cap = 0.05, 0.5, 0.3
  s, _ = make_sched(delay=delay, slo=slo, max_batch=1024, trainer=FakeTrainer([]))
  s.train_queue_delay_cap = cap
  now = clock()
  assert s.inference_busy(now) == 0.0 and s.batching_wait(now) == delay   # idle device
  # max_queue_delay / (1 - U), at most cap x SLO
  for busy, wait in ((0.25, delay / 0.75), (0.5, 2 * delay), (0.6, 2.5 * delay),
                     (0.7, cap * slo), (0.95, cap * slo), (1.0, cap * slo)):
    s._busy, s._busy_t = busy, now
    assert s.batching_wait(now) == pytest.approx(wait), busy
  s._busy, s._busy_t = 0.5, now - RATE_TAU_S      # the estimate decays: U = 0.5 / e
  assert s.batching_wait(now) == pytest.approx(delay / (1 - 0.5 / np.e))
  s._busy, s._busy_t = 0.5, now
  metrics = ServeMetrics()        # /metrics shows both, read at the scrape
  metrics.track_batching(0, lambda: s.batching_wait(now), lambda: s.inference_busy(now))
  got = parse_metrics(metrics.render().decode())
  assert got['coltrain_batching_wait_seconds{replica="0"}'] == pytest.approx(2 * delay)
  assert got['coltrain_inference_busy_fraction{replica="0"}'] == pytest.approx(0.5)
  # admission's prediction and the chunks while a batch forms count the longer wait
  _chunk_first_after(s, 100)
  s.timer.update("chunk", 0.0001)
  oldest, c = s._queue[0].arrival, s.timer.predict("chunk")
  assert s.expected_completion(1, now) - s.batch_time(101) == pytest.approx(
      oldest + 2 * delay + c, abs=1e-6)
  with s._cv:
    assert s._chunk_while_batch_forms(oldest + 1.5 * delay) == c     # past max_queue_delay
    assert s._chunk_while_batch_forms(oldest + 2 * delay) is None
  # the short wait: training off, the cap 0, or a cap below max_queue_delay
  s.trainer.enabled = False
  assert s.batching_wait(now) == delay
  s.trainer.enabled = True
  for frac in (0.0, 0.05):   # (0.05 x SLO < max_queue_delay)
    s.train_queue_delay_cap = frac
    assert s.batching_wait(now) == delay


def test_the_inference_busy_estimate_counts_each_batchs_device_time():
  class SlowPredictor(FakePredictor):
    def __call__(self, weights, images):
      time.sleep(0.005)
      return super().__call__(weights, images)
  s, _ = make_sched(predictor=SlowPredictor())
  s.submit(pending(1))
  t0 = clock()
  s._run_inference(s._take_batch(clock())[0])
  busy = s.inference_busy(clock())
  assert 0.005 / RATE_TAU_S * 0.9 < busy <= (clock() - t0) / RATE_TAU_S
  assert s.inference_busy(clock() + RATE_TAU_S) == pytest.approx(busy / np.e, rel=1e-3)


def test_a_request_on_its_way_holds_training_only_if_it_would_run_at_once():
  """While the front end parses a request (`incoming`), no chunk starts if that request
  will run as soon as it is queued (low rate: no batch to wait for); at a rate where its
  batch would form during chunks anyway, training goes on."""
  from coltrain.serve.metrics import THREAD_ACTIVITIES
  for rate in (0.0, 5000.0):
    trainer = FakeTrainer([])
    s, _ = make_sched(trainer=trainer, delay=0.05, max_batch=1024)
    s.timer.update("chunk", 0.001)
    s.incoming = lambda: 1
    s._rate, s._rate_t = rate, clock()
    s.start()
    try:
      if rate:
        wait_for(lambda: trainer.calls >= 3)
      else:
        time.sleep(0.2)
    finally:
      s.stop()
    held = dict(zip(THREAD_ACTIVITIES, s.thread_seconds))["wait_incoming"]
    if rate:
      assert trainer.calls >= 3
    else:
      assert trainer.calls == 0 and held > 0.1


def test_requests_arriving_fast_batch_up_while_the_device_trains():
  log = []
  trainer = FakeTrainer(log)   # a chunk sleeps 1 ms
  delay = 0.05
  s, pred = make_sched(trainer=trainer, delay=delay, max_batch=1024)
  pred.log = log
  s.timer.update("chunk", 0.002)
  s._rate, s._rate_t = 5000.0, clock()   # a high measured arrival rate (images/s)
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 2)
    del log[:]
    reqs = [pending(1) for _ in range(3)]
    for p in reqs:
      s.submit(p)
    assert all(p.done.wait(30) and p.error is None for p in reqs)
  finally:
    s.stop()
  first = next(i for i, e in enumerate(log) if e[0] == "infer")
  # trained while the batch formed (without it: at most the one chunk in progress)...
  assert log[:first].count(("chunk", 1)) >= 2
  assert log[first] == ("infer", 3)      # ...and the three requests ran as one batch,
  # once the oldest had waited about the delay (the last chunk starts before it)
  assert 1e3 * (delay - 0.015) <= reqs[0].result["queue_ms"] < 1e3 * (delay + 0.5)


def test_admission_adds_the_measured_response_delay_to_predictions():
  s, _ = make_sched(slo=0.05, infer_s=lambda b: 0.001)
  s._busy_until = clock() + 0.010            # busy for 10 ms: not idle
  router = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.0)
  p = router.submit(np.zeros((1,) + SHAPE, np.float32))   # ~12 ms of 50: admitted
  p.finish()
  assert p.done.is_set() and p.finished_at is not None
  for _ in range(50):                        # responses went out 60 ms after the results
    router.completed(0.060, p.finished_at + 0.060)
  assert router.response_delay_s() >= 0.05
  from coltrain.serve.router import RESPONSE_TAU_S
  later = router._response_t + 5 * RESPONSE_TAU_S          # nothing admitted since:
  assert router.response_delay_s(later) < 0.01 * router.response_delay_s()   # it fades
  s._busy_until = clock() + 0.010
  with pytest.raises(Shed):
    router.submit(np.zeros((1,) + SHAPE, np.float32))
  fresh = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.0)
  assert fresh.response_delay_s() == 0.0
  s._busy_until = clock() + 0.010
  fresh.submit(np.zeros((1,) + SHAPE, np.float32))        # without the delay: admitted


def test_a_request_that_waited_in_the_front_end_is_shed_even_on_an_idle_replica():
  s, _ = make_sched(slo=0.05)
  router = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.0)
  assert s.idle(clock())
  router.submit(np.zeros((1,) + SHAPE, np.float32), arrival=clock() - 0.001)  # fresh: ok
  with pytest.raises(Shed):    # arrived 60 ms ago (a front-end backlog): already late
    router.submit(np.zeros((1,) + SHAPE, np.float32), arrival=clock() - 0.060)


def test_shedding_holds_training_off_longer_the_more_is_shed():
  from coltrain.serve.router import HOLDOFF_FULL_FRACTION
  log = []
  trainer = FakeTrainer(log)
  s, _ = make_sched(trainer=trainer, slo=0.05, max_queue=10_000)
  router = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.0, shed_holdoff_s=0.4)
  for _ in range(999):                       # many requests served ...
    router.submit(np.zeros((1,) + SHAPE, np.float32), deadline_ms=60_000)
  s._busy_until = clock() + 0.2              # ... then one that cannot make 50 ms
  with pytest.raises(Shed):
    router.submit(np.zeros((1,) + SHAPE, np.float32))
  # one stray shed in about 1,000 (the counts decay with time: a pause while
  # submitting leaves fewer of them; seen when the whole module runs)
  frac = router.recent_shed_fraction()
  assert 1e-3 * 0.95 <= frac <= 2e-3
  stray = s._hold_training_until - clock()   # a short pause
  assert 0 < stray <= 0.4 * frac / HOLDOFF_FULL_FRACTION + 0.001
  for _ in range(100):                       # sustained shedding: the whole hold-off
    with pytest.raises(Shed):
      router.submit(np.zeros((1,) + SHAPE, np.float32))
  shed_at = clock()
  assert router.recent_shed_fraction() > HOLDOFF_FULL_FRACTION
  assert s._hold_training_until - shed_at >= 0.4 - 0.01
  s._queue.clear()
  s._queued_images = 0
  s._busy_until = 0.0
  s.start()
  try:
    wait_for(lambda: trainer.calls >= 1)
    first = clock()
  finally:
    s.stop()
  assert first - shed_at >= 0.4 - 0.02       # no chunk during the hold-off


def test_sustained_shedding_keeps_headroom_for_admitted_requests():
  from coltrain.serve.router import HEADROOM_FULL_FRACTION
  s, _ = make_sched(slo=0.1, max_queue=10_000, infer_s=lambda b: 0.03)
  router = Router([s], ServeMetrics(), slo_s=0.1, margin_s=0.002, overload_headroom=0.3)
  deadline = clock() + 0.1
  # nothing shed yet: the whole budget (minus the margin) is admitted
  assert router.admission_target(deadline, 0.1) == pytest.approx(deadline - 0.002)
  for _ in range(970):                        # many served ...
    router.submit(np.zeros((1,) + SHAPE, np.float32), deadline_ms=60_000)
  s._busy_until = clock() + 60.0              # ... then a device that finishes nothing
  for _ in range(30):
    with pytest.raises(Shed):
      router.submit(np.zeros((1,) + SHAPE, np.float32))
  # 3 % shed: a few tail sheds leave admission as it was
  assert router.recent_shed_fraction() == pytest.approx(0.03, rel=0.05)
  assert router.admission_target(deadline, 0.1) == pytest.approx(deadline - 0.002)
  for _ in range(1000):
    with pytest.raises(Shed):
      router.submit(np.zeros((1,) + SHAPE, np.float32))
  assert router.recent_shed_fraction() > HEADROOM_FULL_FRACTION
  s._queue.clear()                            # (the 970 were never run)
  s._queued_images = 0
  # overloaded: 30 % of the budget is kept in reserve
  assert router.admission_target(deadline, 0.1) == pytest.approx(deadline - 0.002 - 0.03)
  # a batch in progress for 30 ms more, then this one (30 ms, predicted conservatively
  # as 45 ms: mean + 2 deviations): done at 75 % of the budget, past the 68 % now
  # admitted ...
  s._busy_until = clock() + 0.03
  with pytest.raises(Shed) as e:
    router.submit(np.zeros((1,) + SHAPE, np.float32))
  assert "admitted for the 100.0 ms deadline" in str(e.value)
  # ... and admitted without the headroom
  router.overload_headroom = 0.0
  s._busy_until = clock() + 0.03
  assert router.submit(np.zeros((1,) + SHAPE, np.float32)) in s._queue


def test_no_chunk_starts_while_training_input_is_not_ready():
  log = []
  tr = FakeTrainer(log)
  ready = [False]
  tr.input_ready = lambda: ready[0]
  s, _ = make_sched(trainer=tr)
  s.start()
  try:
    time.sleep(0.1)
    assert tr.calls == 0                # active, idle device, but no input: no chunk
    ready[0] = True
    for _ in range(200):
      if tr.calls:
        break
      time.sleep(0.005)
    assert tr.calls > 0
  finally:
    s.stop()


def test_bucket_predictions_follow_every_timer_change():
  # The bucket-time table is cached per timer change; a new sample or a relaxation
  # must show in the next prediction, and the linear cap from smaller buckets holds.
  s, _ = make_sched(max_batch=2, infer_s=lambda b: 0.001 * b)
  t1, t2 = s.bucket_time(1), s.bucket_time(2)
  assert t1 == pytest.approx(0.0015) and t2 == pytest.approx(0.003)
  assert s.batch_time(5) == pytest.approx(2 * t2 + t1)   # two full batches and one image
  for _ in range(30):
    s.timer.update(2, 0.050)          # bucket 2 got slow: capped by 2 x bucket 1
  assert s.timer.predict(2) > 0.05 and s.bucket_time(2) == pytest.approx(2 * t1)
  for _ in range(30):
    s.timer.update(1, 0.010)          # bucket 1 slower too: the cap moves with it
  slow1 = s.bucket_time(1)
  assert slow1 > 0.010 and s.bucket_time(2) == pytest.approx(2 * slow1)
  assert s.batch_time(3) == pytest.approx(3 * slow1)
  v = s.timer.version
  s.timer.relax_all(0.5)              # relaxing changes the version: seen at once
  assert s.timer.version > v and s.bucket_time(1) < slow1
  assert s.bucket_time(2) == pytest.approx(2 * s.bucket_time(1))


def test_pending_done_is_set_whether_made_before_or_after_finish():
  calls = []
  early = pending(1)
  event = early.done                  # waited on before the request finished
  assert not event.is_set()
  late = Pending(images=np.zeros((2,) + SHAPE, np.float32), arrival=0.0, deadline=1.0,
                 on_done=calls.append)
  assert late.n == 2
  for p in (early, late):
    p.result = {"ok": True}
    p.finish()
  assert event.is_set() and early.done is event
  assert late.done.is_set() and late.done.wait(0) and late.finished_at is not None
  assert calls == [late]


def test_unsampled_buckets_relax_one_per_batch_at_the_per_batch_rate():
  # Each batch relaxes one other bucket in turn, by what RELAX_PER_BATCH per batch
  # would have moved it since its last turn: after every len(buckets) batches each
  # unsampled estimate keeps exactly (1 - RELAX_PER_BATCH) ** len(buckets) of its
  # distance to its floor, as with every bucket relaxed after every batch; the sampled
  # bucket is never relaxed, only updated.
  from coltrain.serve.scheduler import RELAX_PER_BATCH
  s, pred = make_sched(max_batch=8, infer_s=lambda b: 0.001)   # buckets 1, 2, 4, 8
  for _ in range(20):
    s.timer.update(8, 0.011)                                   # bucket 8 above its floor
  floor, mean8 = 0.001, s.timer.mean(8)
  rounds = 5
  for _ in range(rounds * len(pred.buckets)):
    s._run_inference([pending(1)])
  kept = (1 - RELAX_PER_BATCH) ** (rounds * len(pred.buckets))
  assert s.timer.mean(8) == pytest.approx(floor + (mean8 - floor) * kept, rel=1e-12)
  assert s.timer.count(1) == 1 + rounds * len(pred.buckets)   # sampled every batch
  assert pred.sizes == [1] * (rounds * len(pred.buckets))


def test_recent_quantile_is_the_quantile_of_the_last_window_values():
  q = RecentQuantile(0.99, window=256, every=16, min_count=32, default=-1.0)
  rng = np.random.default_rng(0)
  xs = rng.exponential(1.0, 1000)
  for x in xs[:31]:
    q.add(x)
  assert q.value() == -1.0                    # fewer than min_count: the default
  q.add(xs[31])                               # the 32nd: computed at the next read
  assert q.value() == np.quantile(xs[:32], 0.99)
  for x in xs[32:47]:                         # 15 more: the cached value
    q.add(x)
  assert q.value() == np.quantile(xs[:32], 0.99)
  q.add(xs[47])                               # the 16th: recomputed
  assert q.value() == np.quantile(xs[:48], 0.99)
  for x in xs[48:1000]:                       # unread meanwhile: no work, and the next
    q.add(x)                                  # read sees the last 256
  assert q.count == 1000 and q.value() == np.quantile(xs[1000 - 256:1000], 0.99)
  for x in np.full(256, 5.0):                 # the old values leave the window
    q.add(x)
  assert q.value() == 5.0
  for bad in ({"q": 0.0}, {"q": 1.0}, {"q": 0.5, "window": 0},
              {"q": 0.5, "window": 8, "min_count": 9}, {"q": 0.5, "every": 0}):
    with pytest.raises(ValueError):
      RecentQuantile(**bad)


def test_decayed_fraction_weighs_events_by_their_age():
  d = DecayedFraction(tau_s=1.0, t=0.0)
  assert d.fraction() == 0.0                  # no events yet
  d.count(0.0, True)
  d.count(0.0, False)
  assert d.fraction() == 0.5 and d.t == 0.0
  d.count(1.0, False)                         # the first two weigh e^-1 now
  w = np.exp(-1.0)
  assert d.fraction() == pytest.approx(w / (2 * w + 1)) and d.t == 1.0
  d.count(0.5, True)                          # out of order: never weighed up
  assert d.fraction() == pytest.approx((w + 1) / (2 * w + 2)) and d.t == 0.5


def test_decayed_fraction_turns_counted_events_into_hits_without_new_events():
  d = DecayedFraction(tau_s=1.0, t=0.0)
  for hit in [True] + [False] * 7:
    d.count(0.0, hit)
  d.turned_hits(0.0, 1)                       # one of the seven misses was a hit
  assert d.fraction() == 0.25 and d.t == 0.0
  d.turned_hits(1.0, 1)                       # decays to t = 1 first
  assert d.fraction() == pytest.approx((2 * np.exp(-1.0) + 1) / (8 * np.exp(-1.0)))
  assert d.t == 1.0
  d.turned_hits(0.5, 10)                      # never more hits than events, t stays
  assert d.fraction() == 1.0 and d.t == 1.0


def test_admission_keeps_in_reserve_how_late_responses_were_while_they_miss_the_slo():
  from coltrain.serve.router import RESERVE_FULL_MISSED, RESPONSE_TAU_S
  s, _ = make_sched(slo=0.05, max_queue=10_000, infer_s=lambda b: 0.001)
  router = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.002, late_quantile=0.99)
  off = Router([s], ServeMetrics(), slo_s=0.05, margin_s=0.002)
  assert router.late_reserve_s() == 0.0      # nothing learned yet
  s._busy_until = clock() + 0.010            # busy for 10 ms: not idle
  before = clock()
  p = router.submit(np.zeros((1,) + SHAPE, np.float32))
  # the prediction admission made travels with the request: the device's completion
  # (10 ms busy + this batch, conservatively) and no response delay learned yet
  assert before + 0.010 < p.predicted < clock() + 0.015
  late = np.random.default_rng(1).uniform(0.0, 0.010, 2048)  # up to 10 ms late ...
  t = clock()
  for x in late:                             # ... and all within the 50 ms SLO
    router.completed(0.0005, t, late=float(x), latency=0.030)
    off.completed(0.0005, t, late=float(x), latency=0.030)
    router.completed(0.0005, t, late=float("nan"))  # not predicted: not learned
  reserve = np.quantile(late, 0.99)
  assert router.late_reserve_s(t) == pytest.approx(reserve)
  assert off.late_reserve_s() == 0.0
  deadline = t + 0.05
  # the responses met the SLO: no reserve kept
  assert router.recent_missed_fraction() == 0.0
  assert router.admission_target(deadline, 0.05, t) == pytest.approx(deadline - 0.002)
  for _ in range(30):                        # 30 of ~2,000 recent ones (1.5 %) missed
    router.completed(0.0005, t, late=0.005, latency=0.060)
  assert router.recent_missed_fraction() > RESERVE_FULL_MISSED
  reserve = np.quantile(np.r_[late[30:], np.full(30, 0.005)], 0.99)
  assert router.headroom_s(0.05, t) == pytest.approx(reserve)
  assert router.admission_target(deadline, 0.05, t) == pytest.approx(
      deadline - 0.002 - reserve)
  assert off.admission_target(deadline, 0.05, t) == pytest.approx(deadline - 0.002)
  # a request predicted to be done ~12 ms from now of its 50 ms: admitted by the
  # margin alone, refused with the reserve when it came 35 ms late
  arrival = clock() - 0.035
  s._busy_until = clock() + 0.010
  off.submit(np.zeros((1,) + SHAPE, np.float32), arrival=arrival)
  s._busy_until = clock() + 0.010
  with pytest.raises(Shed):
    router.submit(np.zeros((1,) + SHAPE, np.float32), arrival=arrival)
  # nothing served since: the reserve fades
  assert router.late_reserve_s(t + 5 * RESPONSE_TAU_S) < 0.01 * reserve
  # on time again (3 s later, the misses have decayed): the reserve is let go,
  # whatever the shed fraction
  for _ in range(200):
    router.completed(0.0005, t + 3.0, late=0.001, latency=0.030)
  assert router.recent_missed_fraction() < 0.002
  assert router.headroom_s(0.05, t + 3.0) == 0.0
  for x in np.full(2048, -0.001):            # responses earlier than predicted:
    router.completed(0.0005, t + 3.0, late=float(x))  # no reserve, never a negative one
  assert router.late_reserve_s(t + 3.0) == 0.0
