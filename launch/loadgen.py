"""Load generator for a KServe v2 server (run it as its own process, on 127.0.0.1).

  python -m launch.loadgen --url http://127.0.0.1:PORT --model lenet --mode open \
      --rate 200 --arrival poisson --duration 20 --slo_ms 10 --out load.json
  python -m launch.loadgen ... --mode open --rho 0.7 --capacity 400 --arrival gamma --cv 2
  python -m launch.loadgen ... --mode closed --concurrency 16 --duration 5   # closed loop
  python -m launch.loadgen ... --mode sequential --requests 300            # batch-1 latency
  python -m launch.loadgen ... --cpus 1      # pin this process to CPU 1 before starting
  python -m launch.loadgen ... --nice -10    # and run it ahead of the server on its core

Open loop: arrival times are drawn up front (Poisson: exponential gaps; bursty: Gamma
gaps with the given coefficient of variation, CV 2 by default) at `rate` requests/s (or
`rho` x `capacity`); a dispatcher releases request i at its scheduled time to a pool of
keep-alive connections, and **latency is measured from the scheduled arrival time**, so
a request that could not be sent on time (all connections busy, dispatcher late) is
charged for the wait and is never skipped. Closed loop: `concurrency` clients send
back to back (the capacity measurement). Sequential: one request at a time.

Engine. The load generator shares the machine's few cores with the server, so its own
CPU cost per request is kept small: one thread runs one asyncio event loop (uvloop when
importable) speaking raw HTTP/1.1 over keep-alive TCP connections (TCP_NODELAY), all
callback driven (no coroutine or thread per request). Each request (request line,
headers, body) is encoded once per body up front and sent with one write. During the
run a response is only framed: status line, Content-Length and `Connection: close`,
then exactly Content-Length body bytes (or up to EOF without one), kept raw; the model
version and predicted labels are decoded (orjson when importable) AFTER the timed run,
so no JSON work sits on the latency path. Connections open lazily (the free pool is a
stack, so only as many as the load needs are opened); a refused, reset or timed-out
(`--timeout`) request is recorded with status -1 and its connection reopened for the
next one, as is one answered with `Connection: close`. Sends are timed by a Linux
timerfd (nanosecond resolution, woken by the event loop's poll) rather than the loop's
millisecond timers; elsewhere a loop timer wakes ~1 ms early and the rest is yielded
away in loop iterations. `dispatch_late_ms` reports how late sends ran vs schedule
(including any wait for a free connection). The garbage collector is paused during a
run.

Priority. Clients on other machines send on time whatever the server's load; on a
shared core this generator does so only if it wins the core when a send is due.
`--nice N` sets this process's niceness first (below the current one needs root,
CAP_SYS_NICE or a matching RLIMIT_NICE; refused with a clear error otherwise); the
summary records the niceness it ran at (`niceness`).

Requests carry `images_per_request` images: real MNIST-5k test digits from `--images`
(an .npz with `images` uint8 (n, 28, 28, 1) and `labels`), else seeded random pixels.

The JSON written to --out (and the last line on stdout) holds: counts by status code,
latency percentiles of the served (200) requests, `slo_attainment` (fraction of ALL
scheduled requests served within `slo_ms`; shed or failed ones count as misses),
`slo_attainment_admitted` (among served ones; `slo_attainment_admitted_from_send` the
same with latency counted from when each request was actually sent, the server's view
when this generator itself ran late), `shed_fraction` (503s), throughput,
model versions seen, accuracy (with labels), how late the dispatcher ran, and (open
loop) `latency_breakdown_ms`: where the time of all and of the slowest 1 % of the served
requests went (this generator's lateness, the server's queueing and compute as it
reports them, the rest).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ctypes
import ctypes.util
import gc
import json
import math
import os
import socket
import sys
import time
import urllib.parse
from typing import Callable, Optional

import numpy as np

try:
  import orjson
  _loads = orjson.loads
except ImportError:  # pragma: no cover - orjson is a pinned dependency
  _loads = json.loads

try:
  import uvloop
  _loop_factory = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is a pinned dependency
  _loop_factory = None

clock = time.perf_counter  # CLOCK_MONOTONIC on Linux, the clock the timerfd runs on

def arrival_times(rate: float, duration: float, arrival: str, cv: float,
                  seed: int) -> np.ndarray:
  """Scheduled arrival offsets (s) in [0, duration) of a renewal process at `rate`/s.

  poisson: exponential gaps (CV 1); gamma: Gamma(shape 1/cv^2, scale cv^2/rate) gaps.
  """
  if rate <= 0 or duration <= 0:
    raise ValueError(f"rate and duration must be > 0, got {rate}, {duration}")
  rng = np.random.default_rng(seed)
  n = int(rate * duration * 1.5) + 100
  if arrival == "poisson":
    gaps = rng.exponential(1.0 / rate, n)
  elif arrival == "gamma":
    if cv <= 0:
      raise ValueError(f"cv must be > 0, got {cv}")
    k = 1.0 / cv ** 2
    gaps = rng.gamma(k, 1.0 / (rate * k), n)
  else:
    raise ValueError(f"unknown arrival process '{arrival}' (poisson or gamma)")
  t = np.cumsum(gaps)
  while t[-1] < duration:  # (practically never) extend
    t = np.concatenate([t, t[-1] + np.cumsum(rng.exponential(1.0 / rate, n))])
  return t[t < duration]


def request_bodies(images: np.ndarray, per_request: int, count: int,
                   binary: bool = False) -> list:
  """`count` KServe v2 bodies of `per_request` images each (cycling over images): JSON
  (FP32 numbers), or with `binary` (JSON header, then the images as raw UINT8 bytes:
  the protocol's binary tensor data) as (body, JSON length) pairs."""
  bodies = []
  n = len(images)
  for i in range(count):
    idx = [(i * per_request + j) % n for j in range(per_request)]
    if binary:
      x = np.ascontiguousarray(images[idx], np.uint8)
      head = json.dumps({"inputs": [{
          "name": "images", "shape": list(x.shape), "datatype": "UINT8",
          "parameters": {"binary_data_size": x.nbytes}}]}).encode()
      bodies.append((head + x.tobytes(), len(head)))
      continue
    x = images[idx].astype(np.float32)
    bodies.append(json.dumps({"inputs": [{
        "name": "images", "shape": list(x.shape), "datatype": "FP32",
        "data": x.ravel().tolist()}]}).encode())
  return bodies


# -- HTTP/1.1 over keep-alive connections -------------------------------------------------

def encode_requests(host: str, port: int, path: str, bodies: list) -> list[bytes]:
  """One complete POST (request line, headers, body) per body, encoded once; a
  (body, JSON length) pair (binary tensor data) also gets the
  `Inference-Header-Content-Length` header."""
  head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()
  out = []
  for b in bodies:
    if isinstance(b, tuple):
      b, json_length = b
      out.append(head + b"Content-Type: application/octet-stream\r\n"
                 b"Inference-Header-Content-Length: %d\r\nContent-Length: %d\r\n\r\n"
                 % (json_length, len(b)) + b)
    else:
      out.append(head + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                 % len(b) + b)
  return out


class _Connection(asyncio.Protocol):
  """One TCP connection: frames one response at a time and hands it to its slot.

  The slot calls `send`; the response reaches `slot.complete(status, body, reusable)`;
  a close (or an unreadable response) before it is complete reaches `slot.lost(self)`.
  """

  def __init__(self, slot: "_Slot"):
    self.slot: Optional[_Slot] = slot
    self.transport: Optional[asyncio.Transport] = None
    self.open = False
    self._reset()

  def _reset(self):
    self.buf = b""
    self.body_at = -1        # offset of the body in buf once the head is parsed
    self.status = -1
    self.length = -1         # Content-Length; -1: the body runs to EOF
    self.close_after = False

  def connection_made(self, transport):
    self.transport = transport
    if self.slot is None:  # given up on while connecting
      transport.abort()
      return
    self.open = True
    sock = transport.get_extra_info("socket")
    if sock is not None:
      sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def send(self, request: bytes):
    self.transport.write(request)

  def data_received(self, data: bytes):
    buf = self.buf + data if self.buf else data
    if self.body_at < 0:
      end = buf.find(b"\r\n\r\n")
      if end < 0:
        self.buf = buf
        return
      if not self._parse_head(buf[:end].lower()):
        self._drop()
        return
      self.body_at = end + 4
    if self.length >= 0 and len(buf) - self.body_at >= self.length:
      self._finish(buf[self.body_at:self.body_at + self.length], not self.close_after)
    else:
      self.buf = buf

  def _parse_head(self, head: bytes) -> bool:
    """Status line, Content-Length and Connection of a lower-cased response head."""
    try:
      self.status = int(head[9:12])
    except ValueError:
      return False
    self.close_after = not head.startswith(b"http/1.1")
    k = head.find(b"\r\nconnection:")
    if k >= 0:
      value = head[k + 13:].split(b"\r\n", 1)[0].strip()
      self.close_after = value != b"keep-alive" if self.close_after else value == b"close"
    k = head.find(b"\r\ncontent-length:")
    if k < 0:
      self.close_after = True  # no framing: the body is delimited by EOF
      return True
    try:
      self.length = int(head[k + 17:].split(b"\r\n", 1)[0])
    except ValueError:
      return False
    return self.length >= 0

  def _finish(self, body: bytes, reusable: bool):
    status, slot = self.status, self.slot
    self._reset()
    if not reusable:
      self.abandon()
    if slot is not None:
      slot.complete(status, body, reusable)

  def eof_received(self):
    if self.body_at >= 0 and self.length < 0:  # an EOF-delimited body is complete
      self._finish(self.buf[self.body_at:], False)
    return False  # the transport closes; connection_lost follows

  def connection_lost(self, exc):
    self.open = False
    slot, self.slot = self.slot, None
    if slot is not None:
      slot.lost(self)

  def _drop(self):
    slot = self.slot
    self.abandon()
    if slot is not None:
      slot.lost(self)

  def abandon(self):
    """Closes the connection; its slot hears no more from it."""
    self.open = False
    self.slot = None
    if self.transport is not None:
      self.transport.abort()


class _Slot:
  """A pool member: at most one request in flight, over a connection it (re)opens when
  the last one was closed; `run.on_done` hears of every request it was given."""

  def __init__(self, run: "_Run"):
    self.run = run
    self.conn: Optional[_Connection] = None
    self.opening: Optional[asyncio.Task] = None
    self.i = -1              # request in flight, -1 when idle
    self.sent = 0.0

  def send(self, i: int, request: bytes):
    self.i, self.sent = i, clock()
    conn = self.conn
    if conn is not None and conn.open:
      conn.send(request)
    else:
      self.conn = conn = _Connection(self)
      self.opening = self.run.loop.create_task(self._open(conn, request))

  async def _open(self, conn: _Connection, request: bytes):
    try:
      await self.run.loop.create_connection(lambda: conn, self.run.host, self.run.port)
    except OSError:  # refused, unreachable
      if conn.slot is self:
        conn.slot = None
        self.lost(conn)
      return
    if conn.slot is self:  # else it closed, or was given up on, meanwhile
      conn.send(request)

  def complete(self, status: int, body: bytes, reusable: bool):
    done = clock()
    i, self.i = self.i, -1
    if not reusable:
      self.conn = None
    if i >= 0:
      self.run.on_done(self, i, status, body, done)

  def lost(self, conn: _Connection):
    """`conn` closed: idle, or under the request in flight (refused, reset, dropped)."""
    if conn is self.conn:
      self.conn = None
      if self.i >= 0:
        self.complete(-1, b"", False)

  def fail(self):
    """Gives up on the in-flight request (timeout): status -1, connection dropped."""
    if self.conn is not None:
      self.conn.abandon()
    self.complete(-1, b"", False)

  def close(self):
    if self.opening is not None and not self.opening.done():
      self.opening.cancel()
    if self.conn is not None:
      self.conn.abandon()
      self.conn = None


# -- precise wake-ups ----------------------------------------------------------------------

class _TimerSpec(ctypes.Structure):
  _fields_ = [("interval_s", ctypes.c_long), ("interval_ns", ctypes.c_long),
              ("value_s", ctypes.c_long), ("value_ns", ctypes.c_long)]


class TimerfdTimer:
  """Calls `callback` at an absolute `clock()` time via a Linux timerfd.

  The timer (nanosecond resolution, CLOCK_MONOTONIC like `clock`) is armed with one
  syscall and wakes the event loop's poll when it expires, so a send is neither up to
  a millisecond late (the loop's own timers) nor paid for with a busy wait.
  """

  def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    self._settime = libc.timerfd_settime
    self._settime.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    fd = libc.timerfd_create(time.CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
      raise OSError(ctypes.get_errno(), "timerfd_create failed")
    self.fd, self.loop, self.callback = fd, loop, callback
    self._spec = _TimerSpec()
    self._spec_ref = ctypes.byref(self._spec)
    loop.add_reader(fd, self._fired)

  def arm(self, when: float):
    """Fires once at `when` (at once if past); re-arming replaces the expiry."""
    s = math.floor(when)
    self._spec.value_s, self._spec.value_ns = s, max(int((when - s) * 1e9), 1)
    if self._settime(self.fd, 1, self._spec_ref, None) != 0:  # 1: TFD_TIMER_ABSTIME
      raise OSError(ctypes.get_errno(), "timerfd_settime failed")

  def _fired(self):
    self.callback()  # which re-arms or disarms: either clears the fd's readiness

  def disarm(self):
    self._spec.value_s = self._spec.value_ns = 0
    self._settime(self.fd, 0, self._spec_ref, None)

  def close(self):
    self.loop.remove_reader(self.fd)
    os.close(self.fd)


class LoopTimer:
  """Fallback for `TimerfdTimer`: a loop timer wakes ~1 ms early (loop timers have
  millisecond granularity), then the remainder is yielded away one loop iteration at a
  time, so responses keep being handled while waiting."""

  EARLY = 1.5e-3

  def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]):
    self.loop, self.callback, self.when = loop, callback, 0.0

  def arm(self, when: float):
    self.when = when
    self._check()

  def disarm(self):
    self.when = math.inf

  def _check(self):
    if self.when == math.inf:
      return
    left = self.when - clock()
    if left <= 0:
      self.callback()
    elif left > self.EARLY:
      self.loop.call_later(left - self.EARLY + 5e-4, self._check)
    else:
      self.loop.call_soon(self._check)

  def close(self):
    pass


def make_timer(loop, callback):
  """A `TimerfdTimer` where Linux offers one, else a `LoopTimer`."""
  try:
    return TimerfdTimer(loop, callback)
  except (OSError, AttributeError, NotImplementedError):
    return LoopTimer(loop, callback)


# -- runs ----------------------------------------------------------------------------------

class _Run:
  """One timed run on one event loop: a pool of slots, a timeout watchdog and the raw
  outcomes; subclasses decide what a finished request leads to (`on_done`)."""

  def __init__(self, gen: "LoadGen", slots: int):
    self.loop = asyncio.get_running_loop()
    self.host, self.port, self.timeout = gen.host, gen.port, gen.timeout
    self.requests = gen.requests
    self.slots = [_Slot(self) for _ in range(slots)]
    self.finished = self.loop.create_future()
    self._watch_every = min(max(self.timeout / 8, 1e-3), 0.25)
    self._watch = self.loop.call_later(self._watch_every, self._watchdog)

  def _watchdog(self):
    now = clock()
    for slot in self.slots:
      if slot.i >= 0 and now - slot.sent > self.timeout:
        slot.fail()
    self._watch = self.loop.call_later(self._watch_every, self._watchdog)

  def request(self, i: int) -> bytes:
    return self.requests[i % len(self.requests)]

  def on_done(self, slot: _Slot, i: int, status: int, body: bytes, done: float):
    raise NotImplementedError

  def finish(self):
    if not self.finished.done():
      self.finished.set_result(None)

  def close(self):
    self._watch.cancel()
    for slot in self.slots:
      slot.close()


class _OpenLoopRun(_Run):
  """Releases request i at `due[i]` to a free slot (LIFO), else queues it (FIFO) until
  one frees up; records when each was sent and done."""

  def __init__(self, gen: "LoadGen", due: list[float], connections: int):
    super().__init__(gen, connections)
    n = len(due)
    self.due, self.next = due, 0
    self.free = self.slots[::-1]
    self.backlog: collections.deque = collections.deque()
    self.sent = [math.nan] * n
    self.done = [math.nan] * n
    self.status = [0] * n
    self.body = [b""] * n
    self.left = n
    self.timer = make_timer(self.loop, self._release_due)

  def start(self):
    if self.left == 0:
      self.finish()
    else:
      self.timer.arm(self.due[0])

  def _release_due(self):
    due, n, now = self.due, len(self.due), clock()
    while self.next < n and due[self.next] <= now:
      i = self.next
      self.next += 1
      if self.free:
        self._send(self.free.pop(), i)
      else:
        self.backlog.append(i)
    if self.next < n:
      self.timer.arm(due[self.next])
    else:
      self.timer.disarm()

  def _send(self, slot: _Slot, i: int):
    self.sent[i] = clock()
    slot.send(i, self.request(i))

  def on_done(self, slot, i, status, body, done):
    self.status[i], self.body[i], self.done[i] = status, body, done
    if self.backlog:
      self._send(slot, self.backlog.popleft())
    else:
      self.free.append(slot)
    self.left -= 1
    if self.left == 0:
      self.finish()

  def close(self):
    super().close()
    self.timer.close()


class _ClosedLoopRun(_Run):
  """Each slot sends its next request as soon as the last one finished, until
  `stop_at` (or `max_requests` were issued)."""

  def __init__(self, gen: "LoadGen", concurrency: int, stop_at: float,
               max_requests: Optional[int]):
    super().__init__(gen, concurrency)
    self.stop_at, self.max_requests = stop_at, max_requests
    self.issued, self.active = 0, concurrency
    self.out: list[tuple[int, float, int, bytes]] = []  # i, latency, status, body

  def start(self):
    for slot in list(self.slots):
      self._next(slot)

  def _next(self, slot: _Slot):
    if clock() >= self.stop_at or self.issued == self.max_requests:
      self.active -= 1
      if self.active == 0:
        self.finish()
      return
    i = self.issued
    self.issued += 1
    slot.send(i, self.request(i))

  def on_done(self, slot, i, status, body, done):
    self.out.append((i, done - slot.sent, status, body))
    self._next(slot)


def run_loop(make_run: Callable[[], _Run]) -> _Run:
  """Runs one `_Run` to completion on a fresh event loop (uvloop when available), with
  the garbage collector paused; returns the run."""

  async def go():
    run = make_run()
    try:
      run.start()
      await run.finished
    finally:
      run.close()
    return run

  gc.collect()
  gc.disable()
  try:
    with asyncio.Runner(loop_factory=_loop_factory) as runner:
      return runner.run(go())
  finally:
    gc.enable()


class LoadGen:
  """Sends bodies to `url`'s model and records per-request outcomes."""

  def __init__(self, url: str, model: str, bodies: list[bytes],
               labels: Optional[list[list[int]]] = None, timeout: float = 30.0):
    u = urllib.parse.urlparse(url)
    if u.scheme != "http" or not u.hostname:
      raise ValueError(f"--url must be http://HOST:PORT, got {url!r}")
    if timeout <= 0:
      raise ValueError(f"timeout must be > 0, got {timeout}")
    self.host, self.port = u.hostname, u.port or 80
    self.path = f"/v2/models/{model}/infer"
    self.bodies, self.labels, self.timeout = bodies, labels, timeout
    self.requests = encode_requests(self.host, self.port, self.path, bodies)

  def record(self, i: int, status: int, body: bytes) -> list:
    """[status, model version, correct labels] of request i, decoded from its body."""
    return self.decode(i, status, body)[0]

  def decode(self, i: int, status: int, body: bytes) -> tuple[list, tuple[float, float]]:
    """(`record`, (queue_ms, compute_ms)): the latter are the server's own account of
    request i (its `parameters`: from its arrival in the front end to its batch's start,
    and the batch's device time), NaN when absent (not a 200, or a server that does not
    report them)."""
    rec, timing = [status, -1, 0], (math.nan, math.nan)
    if status != 200:
      return rec, timing
    try:
      resp = _loads(body)
      rec[1] = int(resp.get("model_version", -1))
      params = resp.get("parameters")
      if isinstance(params, dict):
        timing = (float(params.get("queue_ms", math.nan)),
                  float(params.get("compute_ms", math.nan)))
      if self.labels is not None:
        pred = resp["outputs"][1]["data"]
        want = self.labels[i % len(self.labels)]
        rec[2] = sum(int(a == b) for a, b in zip(pred, want))
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
      pass  # a 200 without a readable body: counted, but no version or labels
    return rec, timing

  def open_loop(self, offsets: np.ndarray, connections: int) -> dict:
    """Request i is released `offsets[i]` s after a start 0.1 s from now, over at most
    `connections` keep-alive connections; latency counts from the scheduled time."""
    if connections < 1:
      raise ValueError(f"connections must be >= 1, got {connections}")
    offsets = np.asarray(offsets, float)
    t0 = clock() + 0.1
    t0_unix = time.time() + (t0 - clock())
    run = run_loop(lambda: _OpenLoopRun(self, (t0 + offsets).tolist(), connections))
    status = np.array(run.status)
    done = np.array(run.done)
    latency = done - (t0 + offsets)
    latency[status == -1] = np.nan
    late = np.array(run.sent) - (t0 + offsets)
    decoded = [self.decode(i, s, b) for i, (s, b) in enumerate(zip(run.status, run.body))]
    recs = [r for r, _ in decoded]
    server_ms = np.array([t for _, t in decoded], float).reshape(-1, 2)
    if len(offsets) == 0:
      return {"latency": latency, "recs": recs, "wall": 0.0,
              "window_unix": [t0_unix, t0_unix], "late_ms": {}}
    return {"latency": latency, "recs": recs, "wall": float(np.nanmax(done) - t0),
            "late": late, "server_ms": server_ms,
            "window_unix": [t0_unix, t0_unix + float(offsets[-1])],  # arrivals
            "late_ms": late_ms(late)}

  def closed_loop(self, concurrency: int, duration: float,
                  max_requests: Optional[int] = None) -> dict:
    """`concurrency` clients back to back for `duration` s (or `max_requests` in all);
    latency from each send."""
    if concurrency < 1:
      raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    t0 = clock()
    run = run_loop(lambda: _ClosedLoopRun(self, concurrency, t0 + duration, max_requests))
    wall = clock() - t0
    latency = np.array([lat if s != -1 else np.nan for _, lat, s, _ in run.out])
    return {"latency": latency, "recs": [self.record(i, s, b) for i, _, s, b in run.out],
            "wall": wall}

  def sequential(self, requests: int) -> dict:
    """One request at a time, `requests` of them."""
    return self.closed_loop(1, math.inf, max_requests=requests)


def late_ms(late_s: np.ndarray) -> dict:
  """p50 / p99 / max (ms) of how late the generator sent its requests (seconds each)."""
  return {"p50": float(np.nanmedian(late_s) * 1e3),
          "p99": float(np.nanpercentile(late_s, 99) * 1e3),
          "max": float(np.nanmax(late_s) * 1e3)}


def save_raw(res: dict, path: str) -> None:
  """Writes an open-loop run's per-request record (`open_loop`'s result) to `path`
  (.npz), so that several runs can be summarized as one (`load_raw`, `merge_raw`)."""
  if "server_ms" not in res:
    raise ValueError("save_raw takes an open-loop run with at least one request")
  np.savez(path, latency=np.asarray(res["latency"], float),
           recs=np.asarray(res["recs"], np.int64).reshape(-1, 3),
           late=np.asarray(res["late"], float), server_ms=np.asarray(res["server_ms"], float),
           wall=float(res["wall"]), window_unix=np.asarray(res["window_unix"], float))


def load_raw(path: str) -> dict:
  """The run `save_raw` wrote, in `open_loop`'s form."""
  with np.load(path) as z:
    return {"latency": z["latency"], "recs": z["recs"].tolist(), "late": z["late"],
            "server_ms": z["server_ms"], "wall": float(z["wall"]),
            "window_unix": z["window_unix"].tolist()}


def merge_raw(runs: list[dict]) -> dict:
  """Several open-loop runs as one, for `summarize`: their requests together, `wall`
  the sum of their walls (throughput = served / time under load), `window_unix` from
  the first start to the last end."""
  if not runs:
    raise ValueError("merge_raw needs at least one run")
  late = np.concatenate([np.asarray(r["late"], float) for r in runs])
  return {"latency": np.concatenate([np.asarray(r["latency"], float) for r in runs]),
          "recs": [rec for r in runs for rec in r["recs"]], "late": late,
          "server_ms": np.concatenate([np.asarray(r["server_ms"], float).reshape(-1, 2)
                                       for r in runs]),
          "wall": float(sum(r["wall"] for r in runs)),
          "window_unix": [min(r["window_unix"][0] for r in runs),
                          max(r["window_unix"][1] for r in runs)],
          "late_ms": late_ms(late)}


def summarize(res: dict, *, slo_ms: Optional[float], images_per_request: int,
              labels: bool) -> dict:
  lat = np.asarray(res["latency"], float)
  status = np.array([r[0] for r in res["recs"]])
  ok = status == 200
  out = {"requests": int(len(status)),
         "codes": {str(c): int(np.sum(status == c)) for c in sorted(set(status.tolist()))},
         "shed_fraction": float(np.mean(status == 503)) if len(status) else 0.0,
         "wall_s": float(res["wall"]),
         "throughput_rps": float(np.sum(ok) / res["wall"]) if res["wall"] > 0 else 0.0}
  if np.any(ok):
    good = lat[ok] * 1e3
    out["latency_ms"] = {"p50": float(np.percentile(good, 50)),
                         "p90": float(np.percentile(good, 90)),
                         "p99": float(np.percentile(good, 99)),
                         "p999": float(np.percentile(good, 99.9)),
                         "max": float(good.max()), "mean": float(good.mean())}
    versions = [r[1] for r, k in zip(res["recs"], ok) if k]
    out["versions"] = {"min": int(min(versions)), "max": int(max(versions)),
                       "distinct": int(len(set(versions)))}
    if labels:
      out["accuracy"] = float(sum(r[2] for r, k in zip(res["recs"], ok) if k)
                              / (np.sum(ok) * images_per_request))
  if slo_ms:
    within = ok & (lat * 1e3 <= slo_ms)
    out["slo_ms"] = slo_ms
    out["slo_attainment"] = float(np.mean(within)) if len(status) else 0.0
    out["slo_attainment_admitted"] = float(np.sum(within) / max(np.sum(ok), 1))
    if res.get("late") is not None:   # the server's view: from when each was sent
      sent = lat - np.nan_to_num(np.asarray(res["late"], float))
      out["slo_attainment_admitted_from_send"] = float(
          np.sum(ok & (sent * 1e3 <= slo_ms)) / max(np.sum(ok), 1))
    if "server_ms" in res:
      out["latency_breakdown_ms"] = latency_breakdown(
          lat, ok, np.asarray(res["server_ms"], float), res.get("late"))
  if "window_unix" in res:
    out["window_unix"] = res["window_unix"]
  if "late_ms" in res:
    out["dispatch_late_ms"] = res["late_ms"]
  return out


def latency_breakdown(latency_s: np.ndarray, ok: np.ndarray, server_ms: np.ndarray,
                      late_s: Optional[np.ndarray] = None) -> dict:
  """Where the time of the served requests went (open loop), in ms, as means over all
  of them (`all`) and over the slowest 1 % (`tail`: latency >= the p99): `latency`
  (from the scheduled arrival), `dispatch_late` (this generator sending after the
  scheduled time), `server_queue` and `compute` (the server's `queue_ms` and
  `compute_ms`: from the request's arrival in its front end, as the front end dates it,
  to its batch's start on the device, i.e. parsing, the hand-over and the wait for the
  device; and the batch's device time) and `rest` = latency - server_queue - compute
  (the generator's lateness, the transfers, the response path through the front end).
  Requests whose response has no server timings are left out; {} if none has them."""
  have = ok & np.all(np.isfinite(server_ms), axis=1) & np.isfinite(latency_s)
  if not np.any(have):
    return {}
  lat = latency_s * 1e3
  p99 = np.percentile(lat[have], 99)
  late = (np.asarray(late_s, float) * 1e3 if late_s is not None
          else np.full(len(lat), math.nan))
  out = {}
  for name, sel in (("all", have), ("tail", have & (lat >= p99))):
    q, c = server_ms[sel, 0], server_ms[sel, 1]
    out[name] = {"requests": int(np.sum(sel)), "latency": float(np.mean(lat[sel])),
                 "dispatch_late": float(np.mean(late[sel])),
                 "server_queue": float(np.mean(q)), "compute": float(np.mean(c)),
                 "rest": float(np.mean(lat[sel] - q - c))}
  return out


def load_images(path: Optional[str], seed: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
  if path:
    with np.load(path) as z:
      return np.asarray(z["images"]), np.asarray(z["labels"])
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (64, 28, 28, 1), dtype=np.uint8), None


def parse_cpus(spec: str) -> set[int]:
  """CPU ids from '0', '0,1' or '0-3' (ValueError when malformed or not on this host)."""
  from coltrain.cpus import parse_cpu_list   # dependency-free (no JAX in the generator)
  try:
    cpus = set(parse_cpu_list(spec))
  except ValueError as e:
    raise ValueError(f"--cpus takes ids like 0 or 0,1 or 0-3: {e}") from None
  n = os.cpu_count() or 1
  bad = sorted(c for c in cpus if c >= n)
  if bad:
    raise ValueError(f"--cpus: no CPU {bad} on this machine (ids 0..{n - 1})")
  return cpus


def pin_cpus(spec: str) -> set[int]:
  """Pins this process to the CPUs in `spec` (see `parse_cpus`); returns them."""
  cpus = parse_cpus(spec)
  try:
    os.sched_setaffinity(0, cpus)
  except OSError as e:
    allowed = sorted(os.sched_getaffinity(0))
    raise ValueError(f"--cpus {spec}: cannot pin to {sorted(cpus)} ({e.strerror}); "
                     f"this process may use {allowed}") from None
  return cpus


def set_niceness(nice: int) -> int:
  """Sets this process's niceness to `nice` (-20..19); returns it. ValueError, saying
  why, when the OS refuses (raising priority needs privileges)."""
  if not -20 <= nice <= 19:
    raise ValueError(f"--nice must be in -20..19, got {nice}")
  try:
    os.setpriority(os.PRIO_PROCESS, 0, nice)
  except PermissionError:
    raise ValueError(
        f"--nice {nice}: not permitted (this process runs at "
        f"{os.getpriority(os.PRIO_PROCESS, 0)}; a lower niceness needs root, CAP_SYS_NICE "
        f"or RLIMIT_NICE)") from None
  return os.getpriority(os.PRIO_PROCESS, 0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--url", required=True)
  p.add_argument("--model", default="lenet")
  p.add_argument("--mode", choices=("open", "closed", "sequential"), default="open")
  p.add_argument("--rate", type=float, help="open loop: requests/s")
  p.add_argument("--rho", type=float, help="open loop: load as a fraction of --capacity")
  p.add_argument("--capacity", type=float, help="requests/s at rho = 1")
  p.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson")
  p.add_argument("--cv", type=float, default=2.0, help="gamma: coefficient of variation")
  p.add_argument("--duration", type=float, default=10.0, help="seconds (open, closed)")
  p.add_argument("--requests", type=int, default=200, help="sequential: requests")
  p.add_argument("--concurrency", type=int, default=16, help="closed: clients")
  p.add_argument("--connections", type=int, default=256,
                 help="open: connection pool (opened only as the load needs; it must "
                      "exceed rate x latency, or sends wait for a free connection)")
  p.add_argument("--images_per_request", type=int, default=1)
  p.add_argument("--images", help=".npz with images (n, 28, 28, 1) uint8 and labels")
  p.add_argument("--binary", action="store_true",
                 help="send the images as binary tensor data (UINT8 bytes after a JSON "
                      "header) instead of JSON numbers")
  p.add_argument("--slo_ms", type=float)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--timeout", type=float, default=30.0)
  p.add_argument("--cpus", help="pin this process to these CPU ids first: 0, 0,1, 0-3")
  p.add_argument("--nice", type=int,
                 help="run at this niceness (lower = higher priority; below the current "
                      "one needs privileges)")
  p.add_argument("--out")
  p.add_argument("--raw_out", help="open loop: also write every request's record here "
                                   "(.npz; see save_raw)")
  a = p.parse_args(argv)
  if a.cpus is not None:
    try:
      pin_cpus(a.cpus)
    except ValueError as e:
      p.error(str(e))
  if a.nice is not None:
    try:
      set_niceness(a.nice)
    except ValueError as e:
      p.error(str(e))
  if a.mode == "open":
    if a.rate is None:
      if a.rho is None or a.capacity is None:
        p.error("open loop needs --rate, or --rho with --capacity")
      a.rate = a.rho * a.capacity
    if a.rate <= 0:
      p.error(f"the request rate must be > 0, got {a.rate}")
  if a.raw_out and a.mode != "open":
    p.error("--raw_out records open-loop runs only")
  if a.images_per_request < 1:
    p.error("--images_per_request must be >= 1")
  for flag in ("requests", "concurrency", "connections"):
    if getattr(a, flag) < 1:
      p.error(f"--{flag} must be >= 1")
  images, labels = load_images(a.images, a.seed)
  nb = min(len(images), 256)
  bodies = request_bodies(images, a.images_per_request, nb, binary=a.binary)
  label_lists = None
  if labels is not None:
    n = len(images)
    label_lists = [[int(labels[(i * a.images_per_request + j) % n])
                    for j in range(a.images_per_request)] for i in range(nb)]
  try:
    gen = LoadGen(a.url, a.model, bodies, label_lists, a.timeout)
  except ValueError as e:
    p.error(str(e))
  if a.mode == "open":
    offsets = arrival_times(a.rate, a.duration, a.arrival, a.cv, a.seed)
    res = gen.open_loop(offsets, a.connections)
    if a.raw_out:
      save_raw(res, a.raw_out)
  elif a.mode == "closed":
    res = gen.closed_loop(a.concurrency, a.duration)
  else:
    res = gen.sequential(a.requests)
  out = summarize(res, slo_ms=a.slo_ms, images_per_request=a.images_per_request,
                  labels=labels is not None)
  out["args"] = vars(a)
  out["niceness"] = os.getpriority(os.PRIO_PROCESS, 0)
  if a.mode == "open":
    out["offered_rps"] = a.rate
  text = json.dumps(out)
  if a.out:
    with open(a.out, "w") as f:
      f.write(text)
  print(text, flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
