"""The HTTP front end: Open Inference Protocol (KServe v2) endpoints and /metrics, run as
its own process next to the device process (see `coltrain.serve.bridge`).

  GET  /v2/health/live            200 while the front end runs
  GET  /v2/health/ready           200 when every replica's scheduler runs, else 503
  GET  /v2                        server metadata
  GET  /v2/models/{name}          model metadata (+ `parameters.training`: its status)
  GET  /v2/models/{name}/ready    200 / 503
  POST /v2/models/{name}/infer    inference (see `coltrain.serve.protocol`)
  GET  /metrics                   Prometheus text format
  GET|POST /coltrain/training     training status | {"enabled": bool} pause/resume

Errors are JSON `{"error": message}`: 400 malformed request (or malformed HTTP), 404
unknown path or model, 405 wrong method, 411 a POST with neither Content-Length nor a
chunked body, 413 body too large, 503 shed (with Retry-After) or not ready, 504 no
result in time (or the device process gone), 500 if something unexpected failed (the
server keeps running).

This process parses and checks inference requests (a malformed one is a 400 whatever
the load) and sends the images to the device process as raw float32 (`wire.INFER`,
through the shared-memory request ring `coltrain.serve.ring`, else the data link); the
answer comes back as a `wire.RESULT` and is encoded here. Every other endpoint
but liveness is forwarded as it is (`wire.CALL`) and answered by the device process.
HTTP is served by `coltrain.serve.http.HTTPServer` on one uvloop event loop: no thread
per connection and no task per request.

Admission sees the front end's own backlog (`LoopBacklog`). The event loop reads ready
sockets in phases (one poll, then every ready connection in turn); when the front end is
the bottleneck, requests wait in socket buffers for the phases before theirs. A request
is treated as having arrived that long before its first bytes were parsed (an upper
bound, see `LoopBacklog.wait`), so its deadline and the router's shedding decision
count that time. When that wait alone exceeds `FRONT_SHED_FRACTION` of the SLO the
request is refused here (503 + Retry-After) before its JSON is parsed and without a
trip to the device process: under overload a refusal must cost far less than serving,
or the backlog grows instead of draining. (Such a refused request is not checked: under
overload a malformed request may be answered 503 instead of 400.)

  python -m coltrain.serve.frontend --listen_fd N --ipc_fd N --data_fd N --shared_fd N
      [--ring_fd N]
  (internal: started by `FrontEndProcess`; exits when the device process closes the
  socket pairs)
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import mmap
import signal
import socket
import sys
from typing import Any, Optional

from coltrain.serve import wire
from coltrain.serve.ring import FrameRing
from coltrain.serve.http import Deferred, HTTPServer, Request, Response
from coltrain.serve.protocol import (HEADER_LENGTH, ProtocolError, encode_infer_response,
                                     header_length, parse_infer_request)
from coltrain.serve.timing import clock

MAX_BODY_BYTES = 16 << 20
FRONT_SHED_FRACTION = 0.5  # refuse unparsed when the backlog took this much of the SLO
RESULT_GRACE_S = 60.0     # 504 if a request's result is this late past its deadline
KEEP_ALIVE_S = 60.0       # idle keep-alive connections are closed after this
RING_RETRY_S = 0.0005     # requests that found the request ring full are retried this often
OUTBOX_DELAY_S = 0.002    # accounting messages (SENT, COUNT, FSHED) are written this
                          # long after the first one queued: one write per ~2 ms instead
                          # of one per loop pass (each wakes the device's control thread)


class LoopBacklog:
  """An upper bound on how long data read now waited in its socket (seconds).

  `mark()` is called whenever the loop processes received data. The first mark of a
  phase notes its start and queues `call_soon(_end)`, which runs once the phase's I/O
  callbacks are done. Data read now arrived after the poll before this phase's, so it
  waited at most the time since this phase started, plus the previous phase if the
  loop went straight from that one to this one (no idle poll in between:
  `gap_s`)."""

  def __init__(self, loop: asyncio.AbstractEventLoop, gap_s: float = 0.0002):
    self.loop = loop
    self.gap_s = gap_s
    self._start = 0.0       # when the current (or last) phase started
    self._open = False
    self._end_t = -1.0      # when the last phase ended
    self._prev = 0.0        # how long the last phase took
    self._carry = 0.0       # the part of the last phase a request read now may have waited

  def mark(self) -> None:
    if not self._open:
      now = clock()
      back_to_back = now - self._end_t <= self.gap_s
      self._carry = self._prev if back_to_back else 0.0
      self._start = now
      self._open = True
      self.loop.call_soon(self._end)

  def _end(self) -> None:
    self._end_t = clock()
    self._prev = self._end_t - self._start
    self._open = False

  def wait(self, now: float) -> float:
    """The bound for data read at `now` (call `mark()` first)."""
    return (now - self._start) + self._carry if self._open else 0.0


class _Waiting:
  """A request sent to the device process, waiting for its answer (`arrival` is None
  for a forwarded call: only inference requests have one)."""
  __slots__ = ("reply", "request_id", "arrival", "timer", "binary_outputs")

  def __init__(self, request_id: Optional[str], arrival: Optional[float],
               binary_outputs: frozenset = frozenset()):
    self.reply = Deferred()
    self.request_id, self.arrival = request_id, arrival
    self.binary_outputs = binary_outputs   # outputs to answer as raw bytes
    self.timer: Optional[asyncio.TimerHandle] = None


class _Link(asyncio.Protocol):
  """One socket pair to the device process: frames its messages for the front end."""

  def __init__(self, fe: "FrontEnd"):
    self.fe = fe
    self.transport: Optional[asyncio.Transport] = None
    self._reader = wire.Reader()

  def connection_made(self, transport) -> None:
    self.transport = transport

  def connection_lost(self, exc) -> None:
    self.transport = None
    self.fe.link_lost()

  def data_received(self, data: bytes) -> None:
    self.fe.backlog.mark()
    self.fe.messages(self._reader.feed(data))


class _WriteBuffer:
  """Messages for one link, written together by `flush()`: scheduled `delay_s` after
  the first queued message, or at the end of the event-loop pass when `delay_s` is 0.
  `on_flushed(n)` is called after each flush of n messages (written, or dropped if the
  link is gone). `_deliver` writes them; one that takes only some (`_RingWriter`)
  leaves the rest queued, in order, for a retry `delay_s` (at least RING_RETRY_S)
  later."""

  def __init__(self, loop: asyncio.AbstractEventLoop, link: _Link, delay_s: float,
               on_flushed=None):
    self.loop, self.link, self.delay_s = loop, link, delay_s
    self.on_flushed = on_flushed
    self._messages: list[bytes] = []

  def add(self, message: bytes) -> None:
    if not self._messages:
      if self.delay_s > 0:
        self.loop.call_later(self.delay_s, self.flush)
      else:
        self.loop.call_soon(self.flush)
    self._messages.append(message)

  def _deliver(self, transport, messages: list[bytes]) -> int:
    """Writes `messages` on the link; returns how many were taken."""
    transport.write(b"".join(messages))
    return len(messages)

  def flush(self) -> None:
    messages = self._messages
    if not messages:
      return
    transport = self.link.transport
    n = len(messages) if transport is None else self._deliver(transport, messages)
    self._messages = messages[n:]
    if n and self.on_flushed is not None:
      self.on_flushed(n)
    if self._messages:   # not all taken: retried later, before anything added since
      self.loop.call_later(max(self.delay_s, RING_RETRY_S), self.flush)


class _RingWriter(_WriteBuffer):
  """The INFER messages of one event-loop pass, written into the request ring
  (`coltrain.serve.ring`) together at the end of the pass; the device's doorbell (a byte
  on the data link) is rung only if its reader waits. Messages that do not fit (the
  device is behind) wait, in order, and are retried every RING_RETRY_S."""

  def __init__(self, loop: asyncio.AbstractEventLoop, ring: FrameRing, link: _Link,
               on_flushed):
    super().__init__(loop, link, 0.0, on_flushed)
    self.ring = ring

  def _deliver(self, transport, messages: list[bytes]) -> int:
    n = self.ring.put(messages)
    if n and self.ring.consumer_waiting():
      transport.write(b"\0")
    return n


class FrontEnd:
  """The request handler (see module docstring). Two links to the device process: the
  data link carries the inference results (and the requests, without a request ring;
  with one, the doorbell), the control link everything else (forwarded calls,
  accounting, the SLO)."""

  def __init__(self, loop: asyncio.AbstractEventLoop, shared: Optional[mmap.mmap] = None,
               ring: Optional[FrameRing] = None):
    self.loop = loop
    self.backlog = LoopBacklog(loop)
    self.shared = shared
    self.slo_s = 1.0
    self.control = _Link(self)
    self.data = _Link(self)
    self.info: Optional[dict[str, Any]] = None
    self.hello = loop.create_future()
    self.closed = loop.create_future()
    self._waiting: dict[int, _Waiting] = {}
    self._next_key = 0
    # accounting (SENT / COUNT / FSHED) on the control link, every OUTBOX_DELAY_S; the
    # requests (INFER) into the request ring (else on the data link), at the end of
    # each event-loop pass
    self._accounting = _WriteBuffer(loop, self.control, OUTBOX_DELAY_S)
    flushed = lambda n: self.receiving(-n)  # noqa: E731
    self._requests = (_RingWriter(loop, ring, self.data, flushed) if ring is not None else
                      _WriteBuffer(loop, self.data, 0.0, on_flushed=flushed))

  # -- the device links ------------------------------------------------------------------
  def link_lost(self) -> None:
    for key in list(self._waiting):
      self._answer(key, Response.error(504, "the device process is gone"))
    if not self.closed.done():
      self.closed.set_result(None)

  def messages(self, frames) -> None:
    for kind, payload in frames:
      if kind == wire.RESULT:
        self._result(*wire.read_result(payload))
      elif kind == wire.REPLY:
        key, code, ctype, headers, body = wire.read_reply(payload)
        self._answer(key, Response(code, body, ctype, headers))
      elif kind == wire.SLO:
        self.slo_s = wire.read_slo(payload)
      elif kind == wire.HELLO and not self.hello.done():
        self.info = wire.read_hello(payload)
        self.info["image_shape"] = tuple(self.info["image_shape"])
        self.slo_s = self.info["slo_s"]
        self.hello.set_result(self.info)

  def _post_later(self, message: bytes) -> None:
    """Queues an accounting message for the control link (written within
    OUTBOX_DELAY_S, or before the next message sent there, whichever is first)."""
    self._accounting.add(message)

  def _send_request(self, message: bytes) -> bool:
    """Queues an INFER message for the device (the request ring, else the data link);
    the requests parsed in one pass of the event loop are written together once its
    callbacks are done (one write, one
    wake-up of the device's thread, which then admits them all before it decides).
    A queued request stays counted as incoming until it is written, so the device
    starts no training chunk meanwhile. False if the link is gone."""
    if self.data.transport is None:
      return False
    self._requests.add(message)
    self.receiving(+1)
    return True

  def _send(self, message: bytes, link: Optional[_Link] = None) -> bool:
    """Writes `message` on the control link (or `link`); False if it is gone. On the
    control link the queued accounting goes first, so a forwarded call (e.g. /metrics)
    is answered after every response sent before it was counted."""
    link = link or self.control
    transport = link.transport
    if transport is None:
      return False
    if link is self.control:
      self._accounting.flush()
    transport.write(message)
    return True

  def _wait(self, request_id: Optional[str], arrival: Optional[float],
            timeout: float, binary_outputs: frozenset = frozenset()) -> tuple[int, _Waiting]:
    key = self._next_key
    self._next_key += 1
    w = self._waiting[key] = _Waiting(request_id, arrival, binary_outputs)
    w.timer = self.loop.call_later(timeout, self._timed_out, key)
    return key, w

  def _timed_out(self, key: int) -> None:
    w = self._waiting.get(key)
    if w is not None:
      w.timer = None
      if w.arrival is not None:             # an inference request (not a forwarded call)
        self._post_later(wire.count(504))
      self._answer(key, Response.error(504, "no answer from the device process in time"))

  def _answer(self, key: int, response: Response) -> Optional[_Waiting]:
    w = self._waiting.pop(key, None)
    if w is not None:
      if w.timer is not None:
        w.timer.cancel()
      w.reply.resolve(response)
    return w

  def _result(self, key: int, code: int, fields) -> None:
    w = self._waiting.get(key)
    if w is None:
      return
    if code == 200:
      info = self.info
      body, json_length = encode_infer_response(
          model_name=info["model_name"], version=fields["version"], req_id=w.request_id,
          logits=fields["logits"], parameters={
              "queue_ms": round(fields["queue_ms"], 3),
              "compute_ms": round(fields["compute_ms"], 3),
              "replica": fields["replica"], "batch_size": fields["batch_size"]},
          binary_outputs=w.binary_outputs)
      if json_length is None:
        self._answer(key, Response(200, body))
      else:
        self._answer(key, Response(200, body, "application/octet-stream",
                                   ((HEADER_LENGTH, str(json_length)),)))
      sent = clock()
      self._post_later(wire.sent(sent - fields["finished_at"], sent - w.arrival,
                                 sent - fields["predicted"]))
    elif code == 503:
      retry_after_s, message = fields
      self._answer(key, Response.error(
          503, message, (("retry-after", str(max(1, math.ceil(retry_after_s)))),)))
    else:
      self._answer(key, Response.error(code, fields))

  # -- HTTP ------------------------------------------------------------------------------
  def arrival(self) -> float:
    """When a request whose first bytes are parsed now arrived, at the latest: now
    minus the loop's backlog (see module docstring)."""
    self.backlog.mark()
    now = clock()
    return now - self.backlog.wait(now)

  def receiving(self, delta: int) -> None:
    """Counts the requests being received in the page the device process reads."""
    if self.shared is not None:
      wire.add_incoming(self.shared, delta)

  def __call__(self, request: Request):
    path, method = request.path, request.method
    if method == "POST" and path.startswith("/v2/models/") and path.endswith("/infer"):
      parts = [p for p in path.split("/") if p]
      if len(parts) == 4:
        return self._infer(request, parts[2])
    if path == "/v2/health/live" and method in ("GET", "HEAD"):
      return Response.json(200, {"live": True})
    key, w = self._wait(None, None, RESULT_GRACE_S)
    if not self._send(wire.call(key, method, path, request.body)):
      self._answer(key, Response.error(503, "the device process is gone"))
    return w.reply

  def _error(self, code: int, message: str) -> Response:
    self._post_later(wire.count(code))
    return Response.error(code, message)

  def _infer(self, request: Request, model: str):
    info = self.info
    waited = clock() - request.received
    if waited > FRONT_SHED_FRACTION * self.slo_s:
      self._post_later(wire.front_shed())
      return Response.error(
          503, f"overloaded: the request waited {1e3 * waited:.1f} ms to be read, over "
               f"{FRONT_SHED_FRACTION:g} of the {1e3 * self.slo_s:.1f} ms deadline; retry "
               f"later", (("retry-after", "1"),))
    if request.body is None:
      return self._error(411, "a POST needs a body: send Content-Length (or a chunked body)")
    if model != info["model_name"]:
      return self._error(404, f"unknown model '{model}'; this server serves "
                              f"'{info['model_name']}'")
    try:
      req = parse_infer_request(
          request.body, image_shape=info["image_shape"], max_images=info["max_batch"],
          json_length=header_length(request.headers.get(HEADER_LENGTH)))
    except ProtocolError as e:
      return self._error(400, str(e))
    budget_s = req.deadline_ms / 1e3 if req.deadline_ms else self.slo_s
    key, w = self._wait(req.id, request.received,
                        max(request.received + budget_s - clock(), 0.0) + RESULT_GRACE_S,
                        req.binary_outputs)
    if not self._send_request(wire.infer(key, request.received, req.deadline_ms,
                                         req.images)):
      self._answer(key, Response.error(503, "the device process is gone"))
    return w.reply


async def _serve(listener: socket.socket, control: socket.socket, data: socket.socket,
                 shared: Optional[mmap.mmap], ring: Optional[FrameRing] = None) -> None:
  loop = asyncio.get_running_loop()
  fe = FrontEnd(loop, shared, ring)
  await loop.connect_accepted_socket(lambda: fe.control, control)
  await loop.connect_accepted_socket(lambda: fe.data, data)
  await fe.hello
  http = HTTPServer(fe, clock=clock, received_at=fe.arrival, max_body=MAX_BODY_BYTES,
                    keep_alive_s=KEEP_ALIVE_S,
                    on_body_start=lambda conn: fe.receiving(+1),
                    on_body_end=lambda conn: fe.receiving(-1))
  await http.start(listener)
  fe._send(wire.ready())
  gc.collect()
  gc.freeze()   # what lives as long as the process: out of the collector's sight
  await fe.closed
  await http.close()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="coltrain's HTTP front-end process (internal)")
  p.add_argument("--listen_fd", type=int, required=True)
  p.add_argument("--ipc_fd", type=int, required=True, help="the control link")
  p.add_argument("--data_fd", type=int, required=True, help="the data link")
  p.add_argument("--shared_fd", type=int, default=-1)
  p.add_argument("--ring_fd", type=int, default=-1, help="the request ring's memfd")
  a = p.parse_args(argv)
  signal.signal(signal.SIGINT, signal.SIG_IGN)   # the device process decides when to stop
  _die_with_parent()
  listener = socket.socket(fileno=a.listen_fd)
  control = socket.socket(fileno=a.ipc_fd)
  data = socket.socket(fileno=a.data_fd)
  shared = mmap.mmap(a.shared_fd, mmap.PAGESIZE) if a.shared_fd >= 0 else None
  ring = FrameRing.attach(a.ring_fd) if a.ring_fd >= 0 else None
  try:
    import uvloop
    uvloop.run(_serve(listener, control, data, shared, ring))
  except ImportError:
    asyncio.run(_serve(listener, control, data, shared, ring))
  return 0


def _die_with_parent() -> None:
  """SIGKILL this process when its parent dies (Linux prctl PR_SET_PDEATHSIG)."""
  try:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)
  except (OSError, AttributeError):
    pass


if __name__ == "__main__":
  sys.exit(main())
