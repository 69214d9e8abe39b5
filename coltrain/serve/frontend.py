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
405 wrong method, 411 no Content-Length, 413 body too large, 503 shed (with Retry-After)
or not ready, 500 if something unexpected failed (the server keeps running). One thread
per connection (stdlib `ThreadingHTTPServer`), HTTP/1.1 keep-alive, TCP_NODELAY.
"""

from __future__ import annotations

import json
import math
import socket
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from coltrain.serve.protocol import ProtocolError, infer_response, parse_infer_request
from coltrain.serve.router import Shed
from coltrain.serve.scheduler import clock

if TYPE_CHECKING:
  from coltrain.serve.server import Server

MAX_BODY_BYTES = 16 << 20


class _HTTPServer(ThreadingHTTPServer):
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 1024
  app: "Server"


class Handler(BaseHTTPRequestHandler):
  """Maps the endpoints above onto the `Server` (`self.server.app`)."""
  protocol_version = "HTTP/1.1"
  server_version = "coltrain-serve"
  error_content_type = "application/json"
  error_message_format = '{"error": "%(message)s"}'

  def setup(self):
    super().setup()
    self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

  def log_message(self, format, *args):  # noqa: A002 - quiet: metrics tell the story
    del format, args

  # -- helpers ---------------------------------------------------------------------------
  def _send(self, code: int, payload: Any, headers: dict[str, str] | None = None,
            content_type: str = "application/json") -> None:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    self.send_response(code)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    if self.close_connection:
      self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body)

  def _error(self, code: int, message: str, headers: dict[str, str] | None = None) -> None:
    self._send(code, {"error": message}, headers)

  def _read_body(self) -> bytes | None:
    """The request body, or None after answering 411/413/400 for a bad framing."""
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      self.close_connection = True
      self._error(411, "chunked bodies are not supported; send Content-Length")
      return None
    length = self.headers.get("Content-Length")
    if length is None:
      self.close_connection = True
      self._error(411, "Content-Length is required")
      return None
    try:
      n = int(length)
      if n < 0:
        raise ValueError
    except ValueError:
      self.close_connection = True
      self._error(400, f"invalid Content-Length {length!r}")
      return None
    if n > MAX_BODY_BYTES:
      self.close_connection = True
      self._error(413, f"body of {n} bytes exceeds the {MAX_BODY_BYTES} byte limit")
      return None
    body = self.rfile.read(n)
    if len(body) != n:
      self.close_connection = True
      return None
    return body

  def _guard(self, fn) -> None:
    try:
      fn()
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True
    except Exception as e:  # a bug must not take the server down: report it
      traceback.print_exc()
      try:
        self.close_connection = True
        self._error(500, f"internal error: {type(e).__name__}: {e}")
      except Exception:
        pass

  # -- methods ---------------------------------------------------------------------------
  def do_GET(self):  # noqa: N802
    self._guard(self._get)

  def do_POST(self):  # noqa: N802
    self._guard(self._post)

  def _method_not_allowed(self):
    self.close_connection = True
    self._error(405, f"method {self.command} is not allowed here")

  do_PUT = do_DELETE = do_PATCH = _method_not_allowed  # noqa: N815

  def _get(self):
    app = self.server.app
    path = self.path.split("?", 1)[0]
    parts = [p for p in path.split("/") if p]
    if path == "/v2/health/live":
      return self._send(200, {"live": True})
    if path == "/v2/health/ready":
      ready = app.ready
      return self._send(200 if ready else 503, {"ready": ready})
    if path == "/v2":
      return self._send(200, app.server_metadata())
    if path == "/metrics":
      return self._send(200, app.metrics.render(), content_type="text/plain; version=0.0.4")
    if path == "/coltrain/training":
      return self._send(200, app.training_status())
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"]:
      if parts[2] != app.model_name:
        return self._error(404, f"unknown model '{parts[2]}'; this server serves "
                                f"'{app.model_name}'")
      if len(parts) == 3:
        return self._send(200, app.model_metadata())
      if parts[3] == "ready":
        ready = app.ready
        return self._send(200 if ready else 503, {"name": app.model_name, "ready": ready})
      if parts[3] == "infer":
        return self._method_not_allowed()
    return self._error(404, f"no such endpoint: GET {path}")

  def _post(self):
    app = self.server.app
    arrival = clock()
    path = self.path.split("?", 1)[0]
    parts = [p for p in path.split("/") if p]
    if path == "/coltrain/training":
      body = self._read_body()
      if body is None:
        return
      try:
        obj = json.loads(body)
      except (ValueError, RecursionError) as e:
        return self._error(400, f"request body is not valid JSON: {e}")
      if not isinstance(obj, dict) or not isinstance(obj.get("enabled"), bool):
        return self._error(400, 'expected {"enabled": true|false}')
      app.set_training(obj["enabled"])
      return self._send(200, app.training_status())
    if len(parts) == 4 and parts[:2] == ["v2", "models"] and parts[3] == "infer":
      app.router.receiving(+1)
      pending = [True]

      def received():
        if pending:
          pending.clear()
          app.router.receiving(-1)

      try:
        body = self._read_body()
        if body is None:
          app.metrics.requests.labels(code="400").inc()
          return
        if parts[2] != app.model_name:
          app.metrics.requests.labels(code="404").inc()
          return self._error(404, f"unknown model '{parts[2]}'; this server serves "
                                  f"'{app.model_name}'")
        return self._infer(app, body, arrival, received)
      finally:
        received()
    if len(parts) in (3, 4) and parts[:2] == ["v2", "models"] or path in (
        "/v2/health/live", "/v2/health/ready", "/v2", "/metrics"):
      self._read_body()
      return self._method_not_allowed()
    self._read_body()
    return self._error(404, f"no such endpoint: POST {path}")

  def _infer(self, app: "Server", body: bytes, arrival: float, received) -> None:
    m = app.metrics
    if b'"deadline_ms"' not in body:  # default deadline: refuse before parsing if hopeless
      try:
        app.router.precheck(arrival)
      except Shed as e:
        received()
        m.requests.labels(code="503").inc()
        return self._error(503, str(e),
                           {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})
    try:
      req = parse_infer_request(body, image_shape=app.image_shape,
                                max_images=app.max_batch)
    except ProtocolError as e:
      received()
      m.requests.labels(code="400").inc()
      return self._error(400, str(e))
    try:
      pending = app.router.submit(req.images, arrival=arrival, deadline_ms=req.deadline_ms)
    except Shed as e:
      m.requests.labels(code="503").inc()
      return self._error(503, str(e), {"Retry-After": str(max(1, math.ceil(e.retry_after_s)))})
    finally:
      received()   # queued (or refused): no longer incoming
    if not pending.done.wait(timeout=max(pending.deadline - clock(), 0) + 60.0):
      m.requests.labels(code="504").inc()
      return self._error(504, "inference timed out")
    if pending.error is not None:
      m.requests.labels(code="500").inc()
      return self._error(500, pending.error)
    r = pending.result
    payload = infer_response(
        model_name=app.model_name, version=r["version"], req_id=req.id, logits=r["logits"],
        parameters={"queue_ms": round(r["queue_ms"], 3), "compute_ms": round(r["compute_ms"], 3),
                    "replica": r["replica"], "batch_size": r["batch_size"]})
    m.request_seconds.observe(clock() - arrival)
    m.requests.labels(code="200").inc()
    self._send(200, payload)


def make_http_server(app: "Server", host: str, port: int) -> _HTTPServer:
  """Binds (port 0: a free port) and returns the server; call `serve_forever()`."""
  httpd = _HTTPServer((host, port), Handler)
  httpd.app = app
  return httpd
