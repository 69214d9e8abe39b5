"""The two processes' message batching, without a model: the device side writes a
batch's results in one write; the front end writes the requests of one event-loop pass
in one write (holding them as incoming until then) and its accounting messages go out
before any forwarded call."""

import asyncio
import os
import socket
import types

import numpy as np
import pytest

from coltrain.serve import wire
from coltrain.serve.bridge import FrontEndProcess
from coltrain.serve.frontend import OUTBOX_DELAY_S, FrontEnd
from coltrain.serve.metrics import ServeMetrics, parse_metrics
from coltrain.serve.scheduler import Pending
from coltrain.serve.timing import clock
from tests.conftest import RecordingTransport, shared_page

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)


def test_results_are_buffered_until_the_batch_is_done_then_sent_in_one_write():
  app = types.SimpleNamespace(router=types.SimpleNamespace(), metrics=ServeMetrics(),
                              schedulers=[])
  fe = FrontEndProcess(app, "127.0.0.1", 0)
  mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
  fe._data = mine
  theirs.setblocking(False)
  try:
    for key in (7, 8):
      p = Pending(images=np.zeros((1, 2, 2, 1), np.float32), arrival=0.0, deadline=1.0,
                  on_done=lambda p, key=key: fe._finished(key, p))
      p.result = {"logits": np.full((1, 3), key, np.float32), "version": 4, "queue_ms": 0.5,
                  "compute_ms": 0.25, "replica": 0, "batch_size": 2}
      if key == 7:
        p.predicted = 12.5          # admission's prediction travels with the result
      p.finish()
    failed = Pending(images=np.zeros((1, 2, 2, 1), np.float32), arrival=0.0, deadline=1.0,
                     on_done=lambda p: fe._finished(9, p))
    failed.error = "inference failed: boom"
    failed.finish()
    dropped = Pending(images=np.zeros((1, 2, 2, 1), np.float32), arrival=0.0, deadline=1.0,
                      on_done=lambda p: fe._finished(10, p))
    dropped.error, dropped.retry_after_s = "overloaded: too late", 0.25   # a 503
    dropped.finish()
    try:                                     # nothing is written before the flush
      theirs.recv(1 << 16)
      raise AssertionError("a result was written before results_done")
    except BlockingIOError:
      pass
    fe.flush_results()
    frames = wire.Reader().feed(theirs.recv(1 << 16))
    results = [wire.read_result(payload) for kind, payload in frames]
    assert [kind for kind, _ in frames] == [wire.RESULT] * 4
    assert [(key, code) for key, code, _ in results] == [(7, 200), (8, 200), (9, 500),
                                                         (10, 503)]
    np.testing.assert_array_equal(results[1][2]["logits"], np.full((1, 3), 8, np.float32))
    assert results[0][2]["predicted"] == 12.5 and np.isnan(results[1][2]["predicted"])
    assert results[2][2] == "inference failed: boom"
    assert results[3][2] == (0.25, "overloaded: too late")
    m = parse_metrics(app.metrics.render().decode())
    assert m['coltrain_requests_total{code="200"}'] == 2
    assert m['coltrain_requests_total{code="500"}'] == 1
    assert m['coltrain_requests_total{code="503"}'] == 1
    fe.flush_results()                       # an empty flush writes nothing
    try:
      theirs.recv(1 << 16)
      raise AssertionError("an empty flush wrote something")
    except BlockingIOError:
      pass
  finally:
    mine.close()
    theirs.close()
    fe.listener.close()
    fe._shared.close()
    for fd in (fe._memfd, fe._wake_r, fe._wake_w):
      os.close(fd)


def test_front_end_writes_a_loop_pass_of_requests_at_once_and_accounting_first():
  async def main():
    loop = asyncio.get_running_loop()
    fd, page = shared_page()
    fe = FrontEnd(loop, page)
    fe.data.transport, fe.control.transport = RecordingTransport(), RecordingTransport()
    images = np.ones((1, 2, 2, 1), np.float32)
    assert fe._send_request(wire.infer(1, 0.5, None, images))
    assert fe._send_request(wire.infer(2, 0.6, 20.0, images))
    # queued, not written, and counted as incoming so the device starts no chunk
    assert fe.data.transport.writes == [] and wire.read_incoming(page) == 2
    await asyncio.sleep(0)                   # the loop pass ends
    assert len(fe.data.transport.writes) == 1 and wire.read_incoming(page) == 0
    frames = wire.Reader().feed(fe.data.transport.writes[0])
    got = [wire.read_infer(p, (2, 2, 1))[:3] for _, p in frames]
    assert got == [(1, 0.5, None), (2, 0.6, 20.0)]

    fe._post_later(wire.sent(0.001, 0.002))  # accounting waits up to OUTBOX_DELAY_S ...
    assert fe.control.transport.writes == []
    assert fe._send(wire.call(5, "GET", "/metrics", None))   # ... but precedes a call
    first, second = fe.control.transport.writes
    assert wire.Reader().feed(first)[0][0] == wire.SENT
    assert wire.Reader().feed(second)[0][0] == wire.CALL
    fe._post_later(wire.count(400))
    await asyncio.sleep(OUTBOX_DELAY_S * 3)  # and goes out by itself after the delay
    assert wire.Reader().feed(fe.control.transport.writes[2])[0][0] == wire.COUNT
    page.close()
    os.close(fd)

  asyncio.run(main())


def test_reader_recv_reassembles_messages_split_across_reads_and_reports_end_of_stream():
  mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
  mine.setblocking(False)
  reader = wire.Reader()
  images = np.arange(2 * 4, dtype=np.float32).reshape(2, 2, 2, 1)
  stream = wire.infer(3, 0.25, 15.0, images) + wire.count(404)
  try:
    try:                                    # nothing to read yet: the socket's error
      reader.recv(mine)
      raise AssertionError("recv on an empty non-blocking socket must raise")
    except BlockingIOError:
      pass
    theirs.sendall(stream[:11])             # a partial INFER completes nothing
    assert reader.recv(mine) == []
    theirs.sendall(stream[11:])
    (k1, p1), (k2, p2) = reader.recv(mine)
    assert (k1, k2) == (wire.INFER, wire.COUNT)
    key, arrival, deadline_ms, got = wire.read_infer(p1, (2, 2, 1))
    assert (key, arrival, deadline_ms) == (3, 0.25, 15.0)
    np.testing.assert_array_equal(got, images)
    assert wire.read_count(p2) == 404
    assert isinstance(p1, bytes)            # payloads outlive the reused receive buffer
    theirs.close()
    assert reader.recv(mine) is None
  finally:
    mine.close()


def test_front_end_reports_how_late_each_response_was_against_the_prediction():
  async def main():
    loop = asyncio.get_running_loop()
    fe = FrontEnd(loop)
    fe.data.transport, fe.control.transport = RecordingTransport(), RecordingTransport()
    fe.info = {"model_name": "m", "image_shape": (2, 2, 1), "max_batch": 4, "slo_s": 1.0}
    logits = np.zeros((1, 3), np.float32)
    now = clock()
    for predicted in (now - 0.020, float("nan")):
      key, w = fe._wait("r", now - 0.030, 60.0)
      payload = wire.Reader().feed(wire.result_ok(
          key, {"logits": logits, "version": 1, "queue_ms": 0.1, "compute_ms": 0.2,
                "replica": 0, "batch_size": 1}, now - 0.025, predicted))[0][1]
      fe._result(*wire.read_result(payload))
    fe._accounting.flush()
    sent = [wire.read_sent(p) for _, p in wire.Reader().feed(
        b"".join(fe.control.transport.writes))]
    after = clock()
    (delay, latency, late), (_, _, unknown) = sent
    assert 0.025 <= delay <= after - now + 0.025
    assert 0.030 <= latency <= after - now + 0.030
    assert 0.020 <= late <= after - now + 0.020   # sent 20 ms after the prediction
    assert np.isnan(unknown)

  asyncio.run(main())
