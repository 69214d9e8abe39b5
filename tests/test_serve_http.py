"""coltrain.serve.http: framing, keep-alive, pipelining order, deferred answers, limits,
malformed HTTP and handler failures, over real sockets."""

import asyncio
import socket
import threading
import time

import pytest

from coltrain.serve.http import Deferred, HTTPServer, Response

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)


class Running:
  """An HTTPServer with `handler` on its own loop thread."""

  def __init__(self, handler, **kw):
    self.loop = asyncio.new_event_loop()
    self.sock = socket.socket()
    self.sock.bind(("127.0.0.1", 0))
    self.port = self.sock.getsockname()[1]
    self.server = HTTPServer(handler, clock=time.monotonic, **kw)
    started = threading.Event()

    def run():
      asyncio.set_event_loop(self.loop)
      self.loop.run_until_complete(self.server.start(self.sock))
      started.set()
      self.loop.run_forever()
      self.loop.run_until_complete(self.server.close())
      self.loop.close()

    self.thread = threading.Thread(target=run, daemon=True)
    self.thread.start()
    started.wait(10)

  def stop(self):
    self.loop.call_soon_threadsafe(self.loop.stop)
    self.thread.join(10)
    self.sock.close()

  def connect(self) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", self.port), timeout=10)
    return c


def read_responses(conn: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
  """Reads `count` Content-Length framed responses: (status, headers, body)."""
  buf, out = b"", []
  while len(out) < count:
    while b"\r\n\r\n" not in buf:
      chunk = conn.recv(65536)
      if not chunk:
        raise ConnectionError(f"closed after {len(out)} responses")
      buf += chunk
    head, buf = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    if status == 100:
      continue
    n = int(headers.get("content-length", 0))
    while len(buf) < n:
      buf += conn.recv(65536)
    out.append((status, headers, buf[:n]))
    buf = buf[n:]
  return out


def closed_by_peer(conn: socket.socket) -> bool:
  try:
    return conn.recv(1) == b""
  except ConnectionResetError:
    return True


@pytest.fixture()
def echo():
  seen = []

  def handler(req):
    seen.append(req)
    if req.path == "/boom":
      raise RuntimeError("handler bug")
    return Response(200, req.method.encode() + b" " + req.path.encode() + b" "
                    + (b"<none>" if req.body is None else req.body), content_type="text/plain")

  r = Running(handler, max_body=1000)
  r.seen = seen
  yield r
  r.stop()


def test_keep_alive_and_pipelined_requests_are_answered_in_order(echo):
  c = echo.connect()
  c.sendall(b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /b%20c?q=1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /d HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nxy\r\n1\r\nz\r\n0\r\n\r\n")
  got = read_responses(c, 3)
  assert [b for _, _, b in got] == [b"POST /a abc", b"GET /b c ", b"POST /d xyz"]
  assert all(s == 200 and "connection" not in h for s, h, _ in got)
  assert echo.seen[0].headers["host"] == "x"
  c.sendall(b"GET /again HTTP/1.1\r\n\r\n")       # the connection is still open
  assert read_responses(c, 1)[0][2] == b"GET /again "
  c.close()


def test_post_without_framing_has_no_body_and_head_has_no_body(echo):
  c = echo.connect()
  c.sendall(b"POST /x HTTP/1.1\r\n\r\n")
  (status, _, body), = read_responses(c, 1)
  assert status == 200 and body == b"POST /x <none>"
  # the HEAD answer has a Content-Length but no body: the next bytes are the GET's answer
  c.sendall(b"HEAD /h HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
  data = b""
  while not data.endswith(b"GET /after "):
    data += c.recv(65536)
  head_part, get_part = data.split(b"HTTP/1.1 200", 2)[1:]
  assert b"content-length: 8" in head_part and head_part.endswith(b"\r\n\r\n")
  assert get_part.endswith(b"\r\n\r\nGET /after ")
  c.close()


def test_http10_closes_and_expect_100_continue_is_honoured(echo):
  c = echo.connect()
  c.sendall(b"GET /old HTTP/1.0\r\n\r\n")
  (status, headers, body), = read_responses(c, 1)
  assert status == 200 and headers["connection"] == "close" and closed_by_peer(c)
  c = echo.connect()
  c.sendall(b"POST /e HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
  assert c.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
  c.sendall(b"ok")
  assert read_responses(c, 1)[0][2] == b"POST /e ok"
  c.close()


@pytest.mark.parametrize("request_bytes", [
    b"POST /big HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",                   # declared
    b"POST /big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"              # streamed
    + b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8)),
])
def test_too_large_bodies_get_413_and_the_connection_closes(echo, request_bytes):
  c = echo.connect()
  c.sendall(request_bytes)
  (status, headers, body), = read_responses(c, 1)
  assert status == 413 and b"1000 byte limit" in body and headers["connection"] == "close"
  assert closed_by_peer(c)
  assert not [r for r in echo.seen if r.path == "/big"]


@pytest.mark.parametrize("junk", [b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                                  b"GET / HTTP/9.9\r\n\r\n", b"NOT HTTP AT ALL\r\n\r\n",
                                  b"GET / HTTP/1.1\r\nbad header line\r\n\r\n"])
def test_malformed_http_gets_400_and_the_server_keeps_serving(echo, junk):
  c = echo.connect()
  c.sendall(junk)
  (status, _, body), = read_responses(c, 1)
  assert status == 400 and b"malformed HTTP" in body and closed_by_peer(c)
  c = echo.connect()
  c.sendall(b"GET /ok HTTP/1.1\r\n\r\n")
  assert read_responses(c, 1)[0][:1] == (200,)
  c.close()


def test_a_handler_exception_is_a_500_and_the_connection_survives(echo, capsys):
  c = echo.connect()
  c.sendall(b"GET /boom HTTP/1.1\r\n\r\nGET /fine HTTP/1.1\r\n\r\n")
  (s1, _, b1), (s2, _, b2) = read_responses(c, 2)
  assert s1 == 500 and b"handler bug" in b1 and s2 == 200 and b2 == b"GET /fine "
  assert "handler bug" in capsys.readouterr().err
  c.close()


def test_deferred_answers_keep_request_order_and_the_body_bracket_closes():
  deferred, events = [], []

  def handler(req):
    if req.path == "/later":
      d = Deferred()
      deferred.append(d)
      return d
    return Response(200, b"now")

  r = Running(handler, on_body_start=lambda c: events.append("start"),
              on_body_end=lambda c: events.append("end"))
  try:
    c = r.connect()
    c.sendall(b"POST /later HTTP/1.1\r\nContent-Length: 1\r\n\r\nx"
              b"GET /now HTTP/1.1\r\n\r\n")
    time.sleep(0.2)
    c.settimeout(0.2)
    with pytest.raises(socket.timeout):       # /now is ready but must wait for /later
      c.recv(100)
    c.settimeout(10)
    r.loop.call_soon_threadsafe(deferred[0].resolve, Response(200, b"later"))
    assert [b for _, _, b in read_responses(c, 2)] == [b"later", b"now"]
    assert events == ["start", "end"]
    # a client that disconnects mid-body still closes the bracket
    c2 = r.connect()
    c2.sendall(b"POST /later HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
    time.sleep(0.1)
    c2.close()
    for _ in range(100):
      if events.count("end") == 2:
        break
      time.sleep(0.02)
    assert events == ["start", "end", "start", "end"]
    c.close()
  finally:
    r.stop()


def test_idle_keep_alive_connections_are_closed():
  r = Running(lambda req: Response(200, b"x"), keep_alive_s=0.2)
  try:
    c = r.connect()
    c.sendall(b"GET / HTTP/1.1\r\n\r\n")
    assert read_responses(c, 1)[0][0] == 200
    c.settimeout(5)
    t0 = time.monotonic()
    assert closed_by_peer(c) and time.monotonic() - t0 < 2
  finally:
    r.stop()
