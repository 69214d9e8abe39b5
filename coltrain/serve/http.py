"""A small HTTP/1.1 server: asyncio protocol + the httptools parser, one event loop.

Only what an inference front end needs, at a fraction of a general ASGI server's Python
cost per request (measured in `launch/bench_frontend.py`): no task or coroutine per
request, no ASGI message dicts, responses written as one buffer.

  * Keep-alive (HTTP/1.1 default, HTTP/1.0 with `Connection: keep-alive`), pipelining
    (responses leave in request order), `Expect: 100-continue`, chunked request bodies
    (decoded by httptools), HEAD (headers only).
  * The whole body is read before the handler runs. A body larger than `max_body`
    bytes is answered 413 at once (from Content-Length, or as chunks arrive) and the
    connection closed; a POST/PUT/PATCH with neither Content-Length nor a chunked body
    reaches the handler with `body=None` (it answers 411).
  * Bytes that are not HTTP get a 400 and the connection is closed; an exception in a
    handler is a 500 (the server keeps running); idle keep-alive connections are closed
    after `keep_alive_s`.
  * While a client does not read its responses the transport's buffer fills; reading
    from that client pauses until it drains (asyncio flow control).

A handler is `handle(request) -> Response | Deferred`, called on the loop thread; a
`Deferred` is answered later by calling its `resolve(response)` on the loop thread
(another thread gets there with `loop.call_soon_threadsafe`): the response is written
inside that call, with no further trip through the loop.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import deque
from http import HTTPStatus
from typing import Callable, Optional, Union
from urllib.parse import unquote

import httptools
import orjson

REASONS = {s.value: s.phrase for s in HTTPStatus}
BODY_METHODS = (b"POST", b"PUT", b"PATCH")


class Request:
  """One parsed request. `headers` keys are lower-case; `body` is the whole body, or
  None for a POST/PUT/PATCH sent with neither Content-Length nor a chunked body.
  `received` is the loop's clock (see `HTTPServer.clock`) when its first bytes were
  parsed."""
  __slots__ = ("method", "path", "headers", "body", "received")

  def __init__(self, method: str, path: str, headers: dict[str, str],
               body: Optional[bytes], received: float):
    self.method, self.path, self.headers, self.body = method, path, headers, body
    self.received = received


class Response:
  """Status `code`, `body` bytes, extra `headers` ((name, value) pairs)."""
  __slots__ = ("code", "body", "content_type", "headers")

  def __init__(self, code: int, body: bytes = b"", content_type: str = "application/json",
               headers: tuple[tuple[str, str], ...] = ()):
    self.code, self.body, self.content_type, self.headers = code, body, content_type, headers

  @classmethod
  def json(cls, code: int, obj, headers: tuple[tuple[str, str], ...] = ()) -> "Response":
    return cls(code, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY), headers=headers)

  @classmethod
  def error(cls, code: int, message: str,
            headers: tuple[tuple[str, str], ...] = ()) -> "Response":
    return cls.json(code, {"error": message}, headers)

  def encode(self, keep_alive: bool, head: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {self.code} {REASONS.get(self.code, 'Unknown')}",
             f"content-type: {self.content_type}", f"content-length: {len(self.body)}"]
    lines += [f"{k}: {v}" for k, v in self.headers]
    if not keep_alive:
      lines.append("connection: close")
    head_bytes = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head_bytes if head else head_bytes + self.body


class Deferred:
  """A response given later: `resolve(response)` (loop thread only) writes it."""
  __slots__ = ("_write", "_response")

  def __init__(self):
    self._write: Optional[Callable[[Response], None]] = None
    self._response: Optional[Response] = None

  def resolve(self, response: Response) -> None:
    if self._write is None:
      self._response = response
    else:
      self._write(response)

  def _attach(self, write: Callable[[Response], None]) -> None:
    if self._response is not None:
      write(self._response)
    else:
      self._write = write


Handler = Callable[[Request], Union[Response, Deferred]]


class _Slot:
  """A response this connection owes, in request order."""
  __slots__ = ("data", "close")

  def __init__(self):
    self.data: Optional[bytes] = None
    self.close = False


class HTTPProtocol(asyncio.Protocol):
  """One connection (see module docstring)."""

  def __init__(self, server: "HTTPServer"):
    self.server = server
    self.transport: Optional[asyncio.Transport] = None
    self.parser = httptools.HttpRequestParser(self)
    self.slots: deque[_Slot] = deque()
    self.closing = False      # no more requests are read: close once `slots` drain
    self.last_active = 0.0
    self._reset()

  def _reset(self) -> None:
    self.url = b""
    self.headers: dict[str, str] = {}
    self.parts: list[bytes] = []
    self.size = 0
    self.received = 0.0
    self.in_message = False
    self.refused = False      # answered early (413): ignore the rest of this message
    self.body_open = False    # between on_body_start and on_body_end

  # -- asyncio ---------------------------------------------------------------------------
  def connection_made(self, transport) -> None:
    self.transport = transport
    self.last_active = self.server.clock()
    self.server.connections.add(self)

  def connection_lost(self, exc) -> None:
    self.server.connections.discard(self)
    self._end_body()
    self.transport = None
    self.slots.clear()

  def data_received(self, data: bytes) -> None:
    if self.closing:
      return
    self.last_active = self.server.clock()
    try:
      self.parser.feed_data(data)
    except httptools.HttpParserUpgrade:
      self._refuse(400, "protocol upgrades are not supported")
    except httptools.HttpParserError as e:
      self._refuse(400, f"malformed HTTP request: {e}")

  def pause_writing(self) -> None:
    if self.transport is not None:
      self.transport.pause_reading()

  def resume_writing(self) -> None:
    if self.transport is not None and not self.closing:
      self.transport.resume_reading()

  # -- httptools callbacks ---------------------------------------------------------------
  def on_message_begin(self) -> None:
    self._reset()
    self.in_message = True
    self.received = self.server.received_at()

  def on_url(self, url: bytes) -> None:
    self.url += url

  def on_header(self, name: bytes, value: bytes) -> None:
    self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

  def on_headers_complete(self) -> None:
    method = self.parser.get_method()
    if method in BODY_METHODS:
      self.body_open = True
      self.server.on_body_start(self)
    length = self.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > self.server.max_body:
      self._refuse(413, f"body of {length} bytes exceeds the {self.server.max_body} "
                        f"byte limit")
      return
    if self.headers.get("expect", "").lower() == "100-continue":
      self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

  def on_body(self, body: bytes) -> None:
    if self.refused:
      return
    self.size += len(body)
    if self.size > self.server.max_body:
      self._refuse(413, f"body exceeds the {self.server.max_body} byte limit")
      return
    self.parts.append(body)

  def on_message_complete(self) -> None:
    if self.refused:
      return
    method = self.parser.get_method()
    body: Optional[bytes]
    if self.parts:
      body = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
    elif method in BODY_METHODS and "content-length" not in self.headers and (
        "chunked" not in self.headers.get("transfer-encoding", "").lower()):
      body = None
    else:
      body = b""
    path = httptools.parse_url(self.url).path.decode("latin-1")
    if "%" in path:
      path = unquote(path)
    request = Request(method.decode("latin-1"), path, self.headers, body, self.received)
    keep_alive = self.parser.should_keep_alive()
    slot = _Slot()
    slot.close = not keep_alive
    self.slots.append(slot)
    head = method == b"HEAD"
    try:
      out = self.server.handler(request)
    except Exception as e:   # a bug must not take the server down: report it
      out = self.server.internal_error(e)
    finally:
      self.in_message = False
      self._end_body()
    if isinstance(out, Response):
      slot.data = out.encode(keep_alive, head)
      self._flush()
    else:
      out._attach(lambda r: self._answer(slot, r, keep_alive, head))
    if not keep_alive:
      self.closing = True

  def _end_body(self) -> None:
    if self.body_open:
      self.body_open = False
      self.server.on_body_end(self)

  # -- responses -------------------------------------------------------------------------
  def _answer(self, slot: _Slot, out: Response, keep_alive: bool, head: bool) -> None:
    if self.transport is None:
      return
    slot.data = out.encode(keep_alive, head)
    self._flush()

  def _refuse(self, code: int, message: str) -> None:
    """Answers `code` after the responses already owed and closes the connection."""
    self._end_body()
    self.in_message = False
    self.refused = True
    slot = _Slot()
    slot.data, slot.close = Response.error(code, message).encode(keep_alive=False), True
    self.slots.append(slot)
    self.closing = True
    if self.transport is not None:
      self.transport.pause_reading()
    self._flush()

  def _flush(self) -> None:
    t = self.transport
    while self.slots and self.slots[0].data is not None:
      slot = self.slots.popleft()
      if t is None:
        return
      t.write(slot.data)
      if slot.close:
        self.closing = True
        self.slots.clear()
        t.close()
        return
    if self.closing and not self.slots and t is not None:
      t.close()


class HTTPServer:
  """Serves `handler` on `sock` (bound, listening is started here) in the running loop.

  `clock` is the time base of `Request.received`; `received_at` may shift it (the
  front end moves arrivals back by its own backlog). `on_body_start` / `on_body_end`
  bracket the time from a body-carrying request's headers to its handler's return (or
  to the connection's loss, or to a 413)."""

  def __init__(self, handler: Handler, *, clock: Callable[[], float],
               received_at: Optional[Callable[[], float]] = None,
               max_body: int = 16 << 20, keep_alive_s: float = 60.0,
               on_body_start: Callable[[HTTPProtocol], None] = lambda c: None,
               on_body_end: Callable[[HTTPProtocol], None] = lambda c: None):
    self.handler = handler
    self.clock = clock
    self.received_at = received_at or clock
    self.max_body = max_body
    self.keep_alive_s = keep_alive_s
    self.on_body_start, self.on_body_end = on_body_start, on_body_end
    self.connections: set[HTTPProtocol] = set()
    self._server: Optional[asyncio.AbstractServer] = None
    self._sweeper: Optional[asyncio.TimerHandle] = None

  def internal_error(self, e: BaseException) -> Response:
    traceback.print_exception(e)
    return Response.error(500, f"internal error: {type(e).__name__}: {e}")

  async def start(self, sock, backlog: int = 4096) -> None:
    loop = asyncio.get_running_loop()
    self._server = await loop.create_server(lambda: HTTPProtocol(self), sock=sock,
                                            backlog=backlog)
    self._sweeper = loop.call_later(self.keep_alive_s / 4, self._sweep)

  def _sweep(self) -> None:
    """Closes connections idle (nothing owed, nothing received) for `keep_alive_s`."""
    now = self.clock()
    for c in list(self.connections):
      if (not c.slots and not c.in_message and c.transport is not None
          and now - c.last_active > self.keep_alive_s):
        c.transport.close()
    self._sweeper = asyncio.get_running_loop().call_later(self.keep_alive_s / 4, self._sweep)

  async def close(self) -> None:
    if self._sweeper is not None:
      self._sweeper.cancel()
    if self._server is not None:
      self._server.close()
    for c in list(self.connections):
      if c.transport is not None:
        c.transport.close()
    if self._server is not None:
      await self._server.wait_closed()
