"""The device process's side of the front end: it runs the HTTP front end as a separate
process (`coltrain.serve.frontend`) and serves its messages (`coltrain.serve.wire`).

Why a process: the front end's Python work (HTTP, JSON, encoding) held the GIL that the
scheduler threads need between device calls, which stretched a batch's wall time about
2x under load and starved training chunks. Now the device process only decodes a small
binary message per request and encodes its result; parsing and encoding happen in the
front end's own interpreter.

  FrontEndProcess(app, host, port)   binds the listening socket (so `port` is known
                                     at once), then on start():
    * spawns `python -m coltrain.serve.frontend` with the listening socket, two socket
      pairs (the control link and the data link) and a shared counter page (memfd) as
      inherited file descriptors, pinned to the host CPUs when the server has a
      device/host split;
    * sends HELLO (model name, image shape, max batch) and waits for READY;
    * a control thread (on the host CPUs) reads the control link: SENT -> the router's
      response delay and the `request_seconds` histogram, COUNT -> `requests_total`,
      FSHED -> a shed, CALL -> `Control` (answered on the control link);
    * the INFER messages -> `Router.submit` (a shed is answered at once) come through
      the request ring (`coltrain.serve.ring`: shared memory, read without a system
      call; the front end rings a doorbell on the data link only while the reader
      waits), or over the data link with `use_ring` off or where the ring is not
      supported. The data link carries the RESULTs, which the scheduler thread that
      finishes a batch sends, the whole batch's in one write (`on_done` buffers them,
      the scheduler's `results_done` flushes). With one replica the scheduler thread
      receives the requests itself (`pump`, in its idle waits and between device
      calls): requests are admitted by the device's own thread, with no other thread
      on the device CPUs to wake, switch to or share the GIL with; a request that
      arrives during a batch or a training chunk waits in the ring until the device is
      free, which it would do anyway, and its deadline counts from its arrival in the
      front end. With several replicas a data thread on the device CPUs pumps and the
      schedulers are woken as before.
  The front end counts the requests it is receiving in the shared page; the router adds
  that count to `incoming`, so no training chunk starts while a request is on its way
  (the count drops once its INFER message is written, so a scheduler that drains the
  ring before it decides sees every request).
  stop() closes the socket pairs: the front end sees end-of-file and exits.

  Measured (see the README): at 2,200 req/s the old bridge thread on the device core
  took 56 us of CPU per request (wake-ups, GIL hand-overs, one message at a time) and
  the control work (metrics, SENT accounting) ran there too.

`Control` answers every endpoint but inference (health, metadata, metrics, the
training switch) from the server's state; the front end forwards those requests as
they are.
"""

from __future__ import annotations

import functools
import json
import mmap
import os
import select
import socket
import subprocess
import sys
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Optional

from coltrain.serve import ring as request_ring
from coltrain.serve import wire
from coltrain.serve.http import Response
from coltrain.serve.router import Shed
from coltrain.serve.scheduler import Pending
from coltrain.serve.timing import clock

if TYPE_CHECKING:
  from coltrain.serve.server import Server

START_TIMEOUT_S = 60.0


class HTTPError(Exception):
  """Answer `code` with `{"error": message}` (and `headers`)."""

  def __init__(self, code: int, message: str, headers: tuple[tuple[str, str], ...] = ()):
    super().__init__(message)
    self.code, self.message, self.headers = code, message, headers

  def response(self) -> Response:
    return Response.error(self.code, self.message, self.headers)


class Control:
  """Every endpoint except inference, answered from the `Server` (see the front end's
  module docstring for the list)."""

  def __init__(self, app: "Server"):
    self.app = app

  def __call__(self, method: str, path: str, body: Optional[bytes]) -> Response:
    try:
      if method == "POST":
        return self._post(path, body)
      if method in ("GET", "HEAD"):
        return self._get(path)
      raise HTTPError(405, f"method {method} is not allowed here")
    except HTTPError as e:
      return e.response()

  def _get(self, path: str) -> Response:
    app = self.app
    parts = [p for p in path.split("/") if p]
    if path == "/v2/health/ready":   # (liveness is answered by the front end itself)
      ready = app.ready
      return Response.json(200 if ready else 503, {"ready": ready})
    if path == "/v2":
      return Response.json(200, app.server_metadata())
    if path == "/metrics":
      return Response(200, app.metrics.render(), content_type="text/plain; version=0.0.4")
    if path == "/coltrain/training":
      return Response.json(200, app.training_status())
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"]:
      self._check_model(parts[2])
      if len(parts) == 3:
        return Response.json(200, app.model_metadata())
      if parts[3] == "ready":
        ready = app.ready
        return Response.json(200 if ready else 503, {"name": app.model_name, "ready": ready})
      if parts[3] == "infer":
        raise HTTPError(405, "method GET is not allowed here; POST an inference request")
    raise HTTPError(404, f"no such endpoint: GET {path}")

  def _check_model(self, name: str) -> None:
    if name != self.app.model_name:
      raise HTTPError(404, f"unknown model '{name}'; this server serves "
                           f"'{self.app.model_name}'")

  def _post(self, path: str, body: Optional[bytes]) -> Response:
    app = self.app
    parts = [p for p in path.split("/") if p]
    if path == "/coltrain/training":
      if body is None:
        raise HTTPError(411, "a POST needs a body: send Content-Length (or a chunked body)")
      try:
        obj = json.loads(body)
      except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("enabled"), bool):
        raise HTTPError(400, 'expected {"enabled": true|false}')
      app.set_training(obj["enabled"])
      return Response.json(200, app.training_status())
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"] or path in (
        "/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
      raise HTTPError(405, f"method POST is not allowed on {path}")
    raise HTTPError(404, f"no such endpoint: POST {path}")


class FrontEndProcess:
  """See module docstring."""

  def __init__(self, app: "Server", host: str, port: int, use_ring: bool = True):
    self.app = app
    # requests through the shared-memory ring (`coltrain.serve.ring`) where supported;
    # made in start(), when the largest request is known
    self.use_ring = use_ring and request_ring.SUPPORTED
    self._ring: Optional[request_ring.FrameRing] = None
    self.control = Control(app)
    self.listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_STREAM)
    self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.listener.bind((host, port))
    self.listener.listen(4096)
    self.port = self.listener.getsockname()[1]
    self._memfd = os.memfd_create("coltrain-frontend", 0)
    os.ftruncate(self._memfd, mmap.PAGESIZE)
    self._shared = mmap.mmap(self._memfd, mmap.PAGESIZE)
    self.proc: Optional[subprocess.Popen] = None
    self._cpus = None
    self._sock: Optional[socket.socket] = None        # the control link
    self._data: Optional[socket.socket] = None        # the data link (non-blocking)
    self._data_reader = wire.Reader()
    self._data_eof = False
    self._data_handlers = {wire.INFER: self._infer}
    self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    self._threads: list[threading.Thread] = []
    self._send_lock = threading.Lock()
    self._data_lock = threading.Lock()
    self._outbox: list[bytes] = []          # finished results not yet sent
    self._outbox_errors = 0                 # how many of them are errors (500)
    self._outbox_sheds = 0                  # ... and dropped requests (503)
    self._outbox_lock = threading.Lock()
    self._ready = threading.Event()
    self._closing = False
    self.error: Optional[str] = None   # why the front end stopped, if it did
    app.router.incoming_source = lambda: wire.read_incoming(self._shared)

  # -- life cycle ------------------------------------------------------------------------
  def start(self, cpus=None) -> None:
    """Starts the front end and the control thread (both pinned to `cpus.host` for a
    `coltrain.cpus.CpuPartition` `cpus`, else unpinned), and hands the data link to
    the device: with one replica its scheduler thread receives the requests itself
    (`pump` in its idle waits and between device calls), with several a data thread
    on the device CPUs does."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    data_mine, data_theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    app = self.app
    fds = (self.listener.fileno(), theirs.fileno(), data_theirs.fileno(), self._memfd)
    args = ["--listen_fd", str(fds[0]), "--ipc_fd", str(fds[1]), "--data_fd", str(fds[2]),
            "--shared_fd", str(fds[3])]
    ring_fd = None
    if self.use_ring:
      largest = wire.infer_bytes(app.max_batch, app.image_shape)
      self._ring, ring_fd = request_ring.FrameRing.create(request_ring.capacity_for(largest))
      fds += (ring_fd,)
      args += ["--ring_fd", str(ring_fd)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    self.proc = subprocess.Popen([sys.executable, "-m", "coltrain.serve.frontend", *args],
                                 pass_fds=fds, env=env)
    theirs.close()
    data_theirs.close()
    if ring_fd is not None:   # the front end has its own; the mapping stays
      os.close(ring_fd)
    if cpus is not None:
      os.sched_setaffinity(self.proc.pid, cpus.host)
    self._cpus = cpus
    self._sock = mine
    data_mine.setblocking(False)
    self._data = data_mine
    for sch in app.schedulers:   # a batch's results go out in one write
      sch.results_done = self.flush_results
    self.send(wire.hello({"model_name": app.model_name, "image_shape": list(app.image_shape),
                          "max_batch": app.max_batch, "slo_s": app.slo_s}))
    self._start_thread(self._serve_control, "frontend-control", cpus and cpus.host)
    if len(app.schedulers) == 1:
      sch = app.schedulers[0]
      sch.poll, sch.wake_poll = self.pump, self.wake
      sch.wake()   # from its plain idle wait into `pump`
    else:
      self._start_thread(self._serve_data, "frontend-data", cpus and cpus.device)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not self._ready.wait(0.05):
      if self.proc.poll() is not None or time.monotonic() > deadline:
        code = self.proc.poll()
        self.stop()
        raise RuntimeError("the HTTP front end failed to start" + (
            f" (exit status {code}; see its messages above)" if code is not None else
            f" within {START_TIMEOUT_S:.0f} s"))

  def _start_thread(self, target, name: str, cpus) -> None:
    def run():
      if cpus:
        os.sched_setaffinity(0, cpus)
      target()
    t = threading.Thread(target=run, name=name, daemon=True)
    t.start()
    self._threads.append(t)

  def stop(self, timeout: float = 10.0) -> None:
    self._closing = True
    for sch in self.app.schedulers:   # requests now go nowhere: schedulers stop pumping
      if sch.poll == self.pump:
        sch.poll = None
    self.wake()
    for sock in (self._sock, self._data):
      if sock is not None:
        try:
          sock.shutdown(socket.SHUT_RDWR)
        except OSError:
          pass
    if self.proc is not None and self.proc.poll() is None:
      try:
        self.proc.wait(timeout)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait(timeout)
    for t in self._threads:
      t.join(timeout)
    for sock in (self._sock, self._data):
      if sock is not None:
        sock.close()
    self.listener.close()

  # -- messages --------------------------------------------------------------------------
  def send(self, data: bytes) -> None:
    """Sends on the control link."""
    try:
      with self._send_lock:
        self._sock.sendall(data)
    except OSError:   # the front end is gone: its requests have no one to answer
      pass

  def _send_data(self, data: bytes) -> None:
    """Sends a result on the data link (non-blocking socket: waits for room if the
    front end is behind)."""
    try:
      with self._data_lock:
        view = memoryview(data)
        while view:
          try:
            view = view[self._data.send(view):]
          except BlockingIOError:
            select.select([], [self._data], [], 1.0)
    except OSError:
      pass

  def _serve_control(self) -> None:
    """The control thread: every message of the control link (SENT, COUNT, CALL,
    READY, FSHED)."""
    reader = wire.Reader()
    sock = self._sock
    handlers = {wire.SENT: self._sent, wire.COUNT: self._count, wire.CALL: self._call,
                wire.READY: lambda p: self._ready.set(), wire.FSHED: self._front_shed}
    while True:
      try:
        messages = reader.recv(sock)
      except OSError:
        messages = None
      if messages is None:
        if self.proc is not None and self.proc.poll() not in (None, 0):
          self.error = f"the HTTP front end exited with status {self.proc.returncode}"
        return
      for kind, payload in messages:
        self._handle(handlers, kind, payload)

  def _handle(self, handlers, kind: int, payload: bytes) -> None:
    try:
      handlers[kind](payload)
    except Exception as e:  # a bug must not stop the device process: report it
      traceback.print_exc()
      self.error = f"front-end bridge: {type(e).__name__}: {e}"

  def pump(self, timeout: Optional[float]) -> float:
    """Receives the requests waiting on the data link and admits them (`Router.submit`;
    a shed is answered at once), first waiting up to `timeout` seconds (None: without
    limit) for one to arrive or for `wake()`. Called by the thread that owns the data
    link: the scheduler (one replica) or the data thread. Returns the seconds spent
    after the wait (receiving and admitting), which the scheduler counts apart from
    its waiting."""
    if self._ring is not None:
      return self._pump_ring(timeout)
    sock = self._data
    if self._data_eof or sock is None:
      if timeout is None or timeout > 0:
        select.select([self._wake_r], [], [], timeout)
        self._drain_wake()
      return 0.0
    if timeout is None or timeout > 0:
      ready, _, _ = select.select([sock, self._wake_r], [], [], timeout)
      if self._wake_r in ready:
        self._drain_wake()
      if sock not in ready:
        return 0.0
    t0 = clock()
    try:
      messages = self._data_reader.recv(sock)
    except BlockingIOError:
      return clock() - t0
    except OSError:
      messages = None
    if messages is None:
      self._data_eof = True
      return clock() - t0
    for kind, payload in messages:
      self._handle(self._data_handlers, kind, payload)
    return clock() - t0

  def _pump_ring(self, timeout: Optional[float]) -> float:
    """`pump` with the requests in the ring: a wait (only if the ring is empty) blocks on
    the data link, where the front end rings a doorbell while this side waits."""
    ring = self._ring
    if (timeout is None or timeout > 0) and not ring.pending():
      if ring.begin_wait():
        links = [self._wake_r] if self._data_eof or self._data is None else [
            self._data, self._wake_r]
        ready, _, _ = select.select(links, [], [], timeout)
        ring.end_wait()
        if self._wake_r in ready:
          self._drain_wake()
        if self._data in ready:
          self._drain_doorbell()
      else:
        ring.end_wait()
    t0 = clock()
    for kind, payload in ring.read():
      self._handle(self._data_handlers, kind, payload)
    return clock() - t0

  def _drain_doorbell(self) -> None:
    """Reads the doorbell's bytes (with the ring, nothing else comes on the data link
    from the front end); end of stream: the front end is gone."""
    try:
      if not self._data.recv(4096):
        self._data_eof = True
    except BlockingIOError:
      pass
    except OSError:
      self._data_eof = True

  def wake(self) -> None:
    """Ends a `pump` wait early (from any thread)."""
    try:
      os.write(self._wake_w, b"\0")
    except (BlockingIOError, OSError):
      pass

  def _drain_wake(self) -> None:
    try:
      while os.read(self._wake_r, 4096):
        pass
    except (BlockingIOError, OSError):
      pass

  def _serve_data(self) -> None:
    """The data thread (several replicas): pumps until the link closes."""
    while not self._closing and not self._data_eof:
      self.pump(None)

  def _infer(self, payload: bytes) -> None:
    app = self.app
    key, arrival, deadline_ms, images = wire.read_infer(payload, app.image_shape)
    try:
      app.router.submit(images, arrival=arrival, deadline_ms=deadline_ms,
                        on_done=functools.partial(self._finished, key))
    except Shed as e:
      app.metrics.count_response(503)
      self._send_data(wire.result_shed(key, e.retry_after_s, str(e)))

  def _finished(self, key: int, p: Pending) -> None:
    """A scheduler thread finished `p`: its result is buffered, and sent with the
    rest of its batch by `flush_results` (the scheduler's `results_done`)."""
    shed = error = 0
    if p.error is None:
      message = wire.result_ok(key, p.result, p.finished_at, p.predicted)
    elif p.retry_after_s is not None:   # dropped at dispatch
      message, shed = wire.result_shed(key, p.retry_after_s, p.error), 1
    else:
      message, error = wire.result_error(key, 500, p.error), 1
    with self._outbox_lock:
      self._outbox.append(message)
      self._outbox_errors += error
      self._outbox_sheds += shed

  def flush_results(self) -> None:
    """Sends the buffered results to the front end in one write (and counts them)."""
    with self._outbox_lock:
      if not self._outbox:
        return
      messages, errors, sheds = self._outbox, self._outbox_errors, self._outbox_sheds
      self._outbox, self._outbox_errors, self._outbox_sheds = [], 0, 0
    if errors:
      self.app.metrics.count_response(500, errors)
    if sheds:
      self.app.metrics.count_response(503, sheds)
    if len(messages) > errors + sheds:
      self.app.metrics.count_response(200, len(messages) - errors - sheds)
    self._send_data(b"".join(messages))

  def _sent(self, payload: bytes) -> None:
    delay, latency, late = wire.read_sent(payload)
    self.app.router.completed(delay, late=late, latency=latency)
    self.app.metrics.request_seconds.observe(latency)

  def set_slo(self, slo_s: float) -> None:
    """Tells a running front end the new latency objective."""
    if self._sock is not None:
      self.send(wire.slo(slo_s))

  def _front_shed(self, payload: bytes) -> None:
    self.app.metrics.count_response(503)
    self.app.router.shed_unread()

  def _count(self, payload: bytes) -> None:
    self.app.metrics.count_response(wire.read_count(payload))

  def _call(self, payload: bytes) -> None:
    key, method, path, body = wire.read_call(payload)
    try:
      r = self.control(method, path, body)
    except Exception as e:  # a bug must not take the server down: report it
      traceback.print_exc()
      r = Response.error(500, f"internal error: {type(e).__name__}: {e}")
    self.send(wire.reply(key, r.code, r.body, r.content_type, r.headers))
