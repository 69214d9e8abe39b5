"""The HTTP front end: Open Inference Protocol (KServe v2) endpoints and /metrics.

  GET  /v2/health/live            200 while the process runs
  GET  /v2/health/ready           200 when every replica's scheduler runs, else 503
  GET  /v2                        server metadata
  GET  /v2/models/{name}          model metadata (+ `parameters.training`: its status)
  GET  /v2/models/{name}/ready    200 / 503
  POST /v2/models/{name}/infer    inference (see `coltrain.serve.protocol`)
  GET  /metrics                   Prometheus text format
  GET|POST /coltrain/training     training status | {"enabled": bool} pause/resume

Errors are JSON `{"error": message}`: 400 malformed request, 404 unknown path or model,
405 wrong method, 411 a POST with neither Content-Length nor a chunked body, 413 body
too large, 503 shed (with Retry-After) or not ready, 500 if something unexpected failed
(the server keeps running). Malformed HTTP itself is answered by uvicorn (400).

`FrontEnd` is an ASGI application served by uvicorn (httptools parser, uvloop when
installed) on ONE event-loop thread: no thread per connection, so the front end's
Python work per request is small and leaves more of the GIL to the scheduler threads.
A request waits for its result on an asyncio future that the scheduler thread resolves
through `loop.call_soon_threadsafe`.

Admission sees the front end's own backlog: `LoopLag` measures, 500 times a second, how
long a callback waits in the event loop's ready queue (the time the loop needs to work
off what is already in it). Under overload that wait is how long a new request sat
unread, so an inference request is treated as having arrived that long before it was
parsed; its deadline and the router's shedding decision count that time (a 503 costs
far less than serving, so shedding drains the backlog instead of feeding it). Requests
are parsed before admission, so a malformed request is always a 400, whatever the load
(parsing with orjson costs ~40 us).
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import threading
import traceback
from typing import TYPE_CHECKING, Any, Optional

from coltrain.serve.protocol import ProtocolError, dumps, infer_response, parse_infer_request
from coltrain.serve.router import Shed
from coltrain.serve.scheduler import clock

if TYPE_CHECKING:
  from coltrain.serve.server import Server

MAX_BODY_BYTES = 16 << 20
LAG_PERIOD_S = 0.002      # how often the event loop's ready-queue wait is probed
LAG_DECAY = 0.5           # per probe: the backlog estimate falls to half of its old value


class HTTPError(Exception):
  """Answer `code` with `{"error": message}` (and `headers`)."""

  def __init__(self, code: int, message: str, headers: Optional[dict[str, str]] = None):
    super().__init__(message)
    self.code, self.message, self.headers = code, message, headers or {}


class LoopLag:
  """How long work currently waits in an asyncio loop before it runs (seconds).

  Every `period` a probe callback is queued with `call_soon`; the delay until it runs is
  the time the loop needs to drain what was ready before it. `seconds` is the larger of
  the newest sample and the previous estimate decayed by `decay` (it rises at once and
  falls off within a few probes)."""

  def __init__(self, period: float = LAG_PERIOD_S, decay: float = LAG_DECAY):
    self.period, self.decay = period, decay
    self.seconds = 0.0
    self._loop: Optional[asyncio.AbstractEventLoop] = None

  @property
  def running(self) -> bool:
    return self._loop is not None

  def start(self, loop: asyncio.AbstractEventLoop) -> None:
    self._loop = loop
    loop.call_later(self.period, self._probe)

  def _probe(self) -> None:
    self._loop.call_soon(self._sample, clock())

  def _sample(self, queued_at: float) -> None:
    self.seconds = max(clock() - queued_at, self.seconds * self.decay)
    self._loop.call_later(self.period, self._probe)


def _header(scope: dict, name: bytes) -> Optional[str]:
  for k, v in scope["headers"]:
    if k == name:
      return v.decode("latin-1")
  return None


async def _read_body(scope: dict, receive) -> bytes:
  """The whole request body (Content-Length or chunked), or raises `HTTPError`."""
  length = _header(scope, b"content-length")
  chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
  if length is None and not chunked:
    raise HTTPError(411, "a POST needs a body: send Content-Length (or a chunked body)")
  if length is not None:
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      raise HTTPError(400, f"invalid Content-Length {length!r}") from None
    if n > MAX_BODY_BYTES:
      raise HTTPError(413, f"body of {n} bytes exceeds the {MAX_BODY_BYTES} byte limit")
  parts, size = [], 0
  while True:
    msg = await receive()
    if msg["type"] == "http.disconnect":
      raise ConnectionResetError("client disconnected")
    chunk = msg.get("body", b"")
    size += len(chunk)
    if size > MAX_BODY_BYTES:
      raise HTTPError(413, f"body exceeds the {MAX_BODY_BYTES} byte limit")
    parts.append(chunk)
    if not msg.get("more_body", False):
      return parts[0] if len(parts) == 1 else b"".join(parts)


async def _send(send, code: int, payload: Any, headers: Optional[dict[str, str]] = None,
                content_type: bytes = b"application/json") -> None:
  body = payload if isinstance(payload, bytes) else dumps(payload)
  hdrs = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
  hdrs += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
  await send({"type": "http.response.start", "status": code, "headers": hdrs})
  await send({"type": "http.response.body", "body": body})


class FrontEnd:
  """The ASGI application (see module docstring) over a `Server`."""

  def __init__(self, app: "Server"):
    self.app = app
    self.lag = LoopLag()

  async def __call__(self, scope, receive, send) -> None:
    if scope["type"] != "http":
      return
    if not self.lag.running:   # the loop exists only once uvicorn runs: start on first use
      self.lag.start(asyncio.get_running_loop())
    arrival = clock() - self.lag.seconds
    try:
      if scope["method"] == "POST":
        await self._post(scope, receive, send, arrival)
      elif scope["method"] in ("GET", "HEAD"):
        await self._get(scope, send)
      else:
        raise HTTPError(405, f"method {scope['method']} is not allowed here")
    except HTTPError as e:
      await _send(send, e.code, {"error": e.message}, e.headers)
    except (ConnectionResetError, BrokenPipeError):
      pass
    except Exception as e:  # a bug must not take the server down: report it
      traceback.print_exc()
      try:
        await _send(send, 500, {"error": f"internal error: {type(e).__name__}: {e}"})
      except Exception:
        pass

  # -- GET -------------------------------------------------------------------------------
  async def _get(self, scope, send) -> None:
    app = self.app
    path = scope["path"]
    parts = [p for p in path.split("/") if p]
    if path == "/v2/health/live":
      return await _send(send, 200, {"live": True})
    if path == "/v2/health/ready":
      ready = app.ready
      return await _send(send, 200 if ready else 503, {"ready": ready})
    if path == "/v2":
      return await _send(send, 200, app.server_metadata())
    if path == "/metrics":
      return await _send(send, 200, app.metrics.render(),
                         content_type=b"text/plain; version=0.0.4")
    if path == "/coltrain/training":
      return await _send(send, 200, app.training_status())
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"]:
      self._check_model(parts[2])
      if len(parts) == 3:
        return await _send(send, 200, app.model_metadata())
      if parts[3] == "ready":
        ready = app.ready
        return await _send(send, 200 if ready else 503, {"name": app.model_name,
                                                         "ready": ready})
      if parts[3] == "infer":
        raise HTTPError(405, "method GET is not allowed here; POST an inference request")
    raise HTTPError(404, f"no such endpoint: GET {path}")

  def _check_model(self, name: str) -> None:
    if name != self.app.model_name:
      raise HTTPError(404, f"unknown model '{name}'; this server serves "
                           f"'{self.app.model_name}'")

  # -- POST ------------------------------------------------------------------------------
  async def _post(self, scope, receive, send, arrival: float) -> None:
    app = self.app
    path = scope["path"]
    parts = [p for p in path.split("/") if p]
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
      return await self._infer(scope, receive, send, parts[2], arrival)
    if path == "/coltrain/training":
      body = await _read_body(scope, receive)
      try:
        obj = json.loads(body)
      except (ValueError, RecursionError) as e:
        raise HTTPError(400, f"request body is not valid JSON: {e}") from None
      if not isinstance(obj, dict) or not isinstance(obj.get("enabled"), bool):
        raise HTTPError(400, 'expected {"enabled": true|false}')
      app.set_training(obj["enabled"])
      return await _send(send, 200, app.training_status())
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"] or path in (
        "/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
      raise HTTPError(405, f"method POST is not allowed on {path}")
    raise HTTPError(404, f"no such endpoint: POST {path}")

  async def _infer(self, scope, receive, send, model: str, arrival: float) -> None:
    app = self.app
    m = app.metrics
    router = app.router
    router.receiving(+1)   # no training chunk starts while a request is on its way in
    try:
      try:
        body = await _read_body(scope, receive)
        self._check_model(model)
      except HTTPError as e:
        m.requests.labels(code=str(e.code)).inc()
        raise
      try:
        req = parse_infer_request(body, image_shape=app.image_shape,
                                  max_images=app.max_batch)
      except ProtocolError as e:
        m.requests.labels(code="400").inc()
        raise HTTPError(400, str(e)) from None
      loop = asyncio.get_running_loop()
      done = loop.create_future()
      try:
        pending = router.submit(req.images, arrival=arrival, deadline_ms=req.deadline_ms,
                                on_done=lambda: loop.call_soon_threadsafe(_resolve, done))
      except Shed as e:
        raise self._shed(e) from None
    finally:
      router.receiving(-1)
    try:
      await asyncio.wait_for(done, timeout=max(pending.deadline - clock(), 0) + 60.0)
    except asyncio.TimeoutError:
      m.requests.labels(code="504").inc()
      raise HTTPError(504, "inference timed out") from None
    if pending.error is not None:
      m.requests.labels(code="500").inc()
      raise HTTPError(500, pending.error)
    r = pending.result
    payload = infer_response(
        model_name=app.model_name, version=r["version"], req_id=req.id, logits=r["logits"],
        parameters={"queue_ms": round(r["queue_ms"], 3), "compute_ms": round(r["compute_ms"], 3),
                    "replica": r["replica"], "batch_size": r["batch_size"]})
    m.requests.labels(code="200").inc()
    await _send(send, 200, payload)
    sent = clock()
    m.request_seconds.observe(sent - arrival)
    router.completed(pending, sent)

  def _shed(self, e: Shed) -> HTTPError:
    self.app.metrics.requests.labels(code="503").inc()
    return HTTPError(503, str(e), {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})


def _resolve(fut: asyncio.Future) -> None:
  if not fut.done():
    fut.set_result(None)


class HTTPThread:
  """uvicorn serving `FrontEnd(app)` on its own thread, on a socket bound at
  construction (port 0: a free port, see `port`)."""

  def __init__(self, app: "Server", host: str, port: int):
    import uvicorn
    try:
      import uvloop  # noqa: F401
      loop = "uvloop"
    except ImportError:
      loop = "asyncio"
    self.frontend = FrontEnd(app)
    self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                              socket.SOCK_STREAM)
    self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    self.sock.bind((host, port))
    self.port = self.sock.getsockname()[1]
    config = uvicorn.Config(self.frontend, loop=loop, http="httptools", lifespan="off",
                            access_log=False, log_level="warning", backlog=4096,
                            timeout_keep_alive=60, timeout_graceful_shutdown=5)
    self._server = uvicorn.Server(config)
    self._thread: Optional[threading.Thread] = None

  def start(self) -> None:
    self._thread = threading.Thread(target=self._server.run,
                                    kwargs={"sockets": [self.sock]}, name="http", daemon=True)
    self._thread.start()
    while not self._server.started:
      if not self._thread.is_alive():
        raise RuntimeError("the HTTP server failed to start (see the log above)")
      self._thread.join(0.01)

  def stop(self, timeout: float = 10.0) -> None:
    self._server.should_exit = True
    if self._thread is not None:
      self._thread.join(timeout)
    self.sock.close()
