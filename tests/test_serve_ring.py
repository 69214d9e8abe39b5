"""The request ring (`coltrain.serve.ring`): frames arrive whole, in order, exactly once,
across wraps and a full ring, between processes; the doorbell is rung only while the
reader waits, and a waiting device thread is woken by it."""

import asyncio
import mmap
import os
import random
import socket
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from coltrain.serve import ring as ring_mod
from coltrain.serve import wire
from coltrain.serve.bridge import FrontEndProcess
from coltrain.serve.frontend import RING_RETRY_S, FrontEnd
from coltrain.serve.ring import HEADER_BYTES, FrameRing
from tests.conftest import RecordingTransport, shared_page

pytestmark = pytest.mark.skipif(not ring_mod.SUPPORTED,
                                reason="the ring needs x86's memory order; the socket "
                                       "path is used (and tested) elsewhere")


def _pair(capacity: int):
  producer, fd = FrameRing.create(capacity)
  consumer = FrameRing.attach(fd)
  os.close(fd)
  return producer, consumer


def _frame(i: int, size: int) -> bytes:
  return wire.frame(wire.COUNT, bytes([i % 251]) * size)


def test_frames_arrive_whole_in_order_exactly_once_across_wraps_and_a_full_ring():
  producer, consumer = _pair(mmap.PAGESIZE)
  rng = random.Random(0)
  waiting, sent, got, partial_puts = [], [], [], 0
  for i in range(5000):
    waiting += [_frame(i * 7 + j, rng.choice((1, 2, 3, 50, 300, 1500)))
                for j in range(rng.randint(0, 4))]
    if waiting:
      n = producer.put(waiting)
      partial_puts += n < len(waiting)
      sent += waiting[:n]
      waiting = waiting[n:]
    if rng.random() < 0.4:
      got += [wire.frame(kind, p) for kind, p in consumer.read()]
  while waiting:
    got += [wire.frame(kind, p) for kind, p in consumer.read()]
    n = producer.put(waiting)
    sent += waiting[:n]
    waiting = waiting[n:]
  got += [wire.frame(kind, p) for kind, p in consumer.read()]
  assert got == sent and len(sent) > 5000
  assert partial_puts > 0                       # the ring did fill up
  assert producer._head > 20 * producer.capacity  # and wrapped many times
  assert consumer.read() == [] and not consumer.pending()


def test_a_frame_that_does_not_fit_before_the_end_starts_the_next_lap():
  producer, consumer = _pair(mmap.PAGESIZE)
  cap = producer.capacity
  first = _frame(1, cap - 5 - 10)              # leaves 10 bytes before the end
  assert producer.put([first]) == 1
  assert consumer.read() == [(wire.COUNT, first[5:])]
  second = _frame(2, 20)                       # 25 bytes: goes to offset 0
  assert producer.put([second]) == 1
  assert int.from_bytes(producer.buf[HEADER_BYTES + cap - 10:HEADER_BYTES + cap - 6],
                        "little") == 0          # the wrap marker
  assert bytes(producer.buf[HEADER_BYTES:HEADER_BYTES + 25]) == second
  assert consumer.read() == [(wire.COUNT, second[5:])]
  third = _frame(3, cap - 25 - 5 - 2)          # leaves 2 bytes: no room for a marker
  assert producer.put([third]) == 1 and consumer.read() == [(wire.COUNT, third[5:])]
  fourth = _frame(4, 1)
  assert producer.put([fourth]) == 1 and consumer.read() == [(wire.COUNT, fourth[5:])]
  assert producer._head == 2 * cap + 6
  filler = _frame(7, cap // 2 - 6 - 5)         # to the middle of the lap
  assert producer.put([filler]) == 1 and len(consumer.read()) == 1
  exact = _frame(5, cap // 2 - 5)              # ends exactly at the end of the lap,
  after = _frame(6, 3)                         # the next starts the next lap: one read
  assert producer.put([exact, after]) == 2
  assert consumer.read() == [(wire.COUNT, exact[5:]), (wire.COUNT, after[5:])]
  assert producer._head == consumer._tail == 3 * cap + 8


def test_a_full_ring_takes_nothing_more_and_a_frame_larger_than_the_ring_is_refused():
  producer, consumer = _pair(mmap.PAGESIZE)
  half = _frame(0, producer.capacity // 2 - 5)
  assert producer.put([half, half, half]) == 2  # the third waits for room
  assert producer.put([_frame(1, 1)]) == 0
  assert len(consumer.read()) == 2
  assert producer.put([half]) == 1
  with pytest.raises(ValueError, match="cannot fit"):
    producer.put([_frame(2, producer.capacity)])


def test_capacity_holds_four_of_the_largest_frames_in_whole_pages():
  assert ring_mod.capacity_for(100) == ring_mod.MIN_CAPACITY
  big = ring_mod.capacity_for(3 << 20)
  assert big >= 4 * (3 << 20) and big % mmap.PAGESIZE == 0


def test_the_waiting_flag_is_seen_by_the_producer_and_pending_data_cancels_a_wait():
  producer, consumer = _pair(mmap.PAGESIZE)
  assert not producer.consumer_waiting()
  assert consumer.begin_wait()                 # empty: the consumer may block
  assert producer.consumer_waiting()
  consumer.end_wait()
  assert not producer.consumer_waiting()
  producer.put([_frame(1, 3)])
  assert not consumer.begin_wait()             # something to read: do not block
  consumer.end_wait()


def test_frames_cross_processes_through_the_shared_mapping():
  producer, fd = FrameRing.create(mmap.PAGESIZE)
  child = (
      "import os, sys\n"
      "from coltrain.serve import wire\n"
      "from coltrain.serve.ring import FrameRing\n"
      "r = FrameRing.attach(int(sys.argv[1]))\n"
      "for i in range(3000):\n"
      "  f = wire.frame(wire.COUNT, i.to_bytes(4, 'little') * (1 + i % 40))\n"
      "  while not r.put([f]):\n"
      "    pass\n")
  proc = subprocess.Popen([sys.executable, "-c", child, str(fd)], pass_fds=(fd,))
  os.close(fd)
  got, deadline = [], time.monotonic() + 60
  while len(got) < 3000 and time.monotonic() < deadline:
    got += producer.read()                     # (this end reads: either end may)
  proc.wait(30)
  assert proc.returncode == 0
  assert [p for _, p in got] == [i.to_bytes(4, "little") * (1 + i % 40) for i in range(3000)]


def test_front_end_puts_a_loop_pass_in_the_ring_and_rings_only_a_waiting_reader():
  async def main():
    loop = asyncio.get_running_loop()
    fd, page = shared_page()
    producer, device = _pair(mmap.PAGESIZE)
    fe = FrontEnd(loop, page, producer)
    fe.data.transport = RecordingTransport()
    images = np.ones((1, 2, 2, 1), np.float32)
    assert fe._send_request(wire.infer(1, 0.5, None, images))
    assert fe._send_request(wire.infer(2, 0.6, 20.0, images))
    assert not device.pending() and wire.read_incoming(page) == 2
    await asyncio.sleep(0)                     # the loop pass ends: both in the ring
    assert wire.read_incoming(page) == 0 and fe.data.transport.writes == []  # no bell
    got = [wire.read_infer(p, (2, 2, 1))[:3] for _, p in device.read()]
    assert got == [(1, 0.5, None), (2, 0.6, 20.0)]

    assert device.begin_wait()                 # the device is about to block
    fe._send_request(wire.infer(3, 0.7, None, images))
    await asyncio.sleep(0)
    assert fe.data.transport.writes == [b"\0"]
    device.end_wait()
    assert [wire.read_infer(p, (2, 2, 1))[0] for _, p in device.read()] == [3]

    big = np.ones((1, 20, 20, 1), np.float32)  # 1.6 KB: two fill the 4 KB ring
    for key in (10, 11, 12):
      fe._send_request(wire.infer(key, 0.0, None, big))
    await asyncio.sleep(0)
    assert wire.read_incoming(page) == 1       # the third waits, still incoming
    assert [wire.read_infer(p, (20, 20, 1))[0] for _, p in device.read()] == [10, 11]
    await asyncio.sleep(RING_RETRY_S * 4)      # retried once there is room
    assert wire.read_incoming(page) == 0
    assert [wire.read_infer(p, (20, 20, 1))[0] for _, p in device.read()] == [12]
    page.close()
    os.close(fd)

  asyncio.run(main())


@pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)
def test_pump_admits_from_the_ring_and_a_waiting_pump_wakes_on_the_doorbell():
  submitted = []

  def submit(images, *, arrival, deadline_ms, on_done):
    submitted.append((images.shape, arrival, deadline_ms))

  app = types.SimpleNamespace(router=types.SimpleNamespace(submit=submit), schedulers=[],
                              metrics=None, image_shape=(2, 2, 1), max_batch=4)
  fe = FrontEndProcess(app, "127.0.0.1", 0)
  mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
  mine.setblocking(False)
  fe._data = mine
  fe._ring, producer = _pair(mmap.PAGESIZE)
  images = np.ones((2, 2, 2, 1), np.float32)
  try:
    assert fe.pump(0.0) >= 0 and submitted == []
    producer.put([wire.infer(1, 0.25, 30.0, images)])
    fe.pump(0.0)                               # no wait, no system call: read at once
    assert submitted == [((2, 2, 2, 1), 0.25, 30.0)]

    def later():
      time.sleep(0.2)
      producer.put([wire.infer(2, 0.5, None, images)])
      if producer.consumer_waiting():
        theirs.send(b"\0")
    t = threading.Thread(target=later)
    t0 = time.monotonic()
    t.start()
    fe.pump(30.0)                              # blocks until the doorbell rings
    waited = time.monotonic() - t0
    t.join()
    assert submitted[-1] == ((2, 2, 2, 1), 0.5, None)
    assert 0.15 < waited < 10.0
    assert not producer.consumer_waiting()     # the wait is over
    theirs.close()                             # the front end is gone: end of stream
    fe.pump(1.0)
    assert fe._data_eof
  finally:
    mine.close()
    fe.listener.close()
    fe._shared.close()
    for f in (fe._memfd, fe._wake_r, fe._wake_w):
      os.close(f)
