"""The messages between the front-end process and the device process (stream sockets;
the INFER messages through `coltrain.serve.ring` where it is used).

Every message is a frame: u32 length of the rest, u8 kind, then the kind's fields,
little-endian. Images and logits travel as raw float32 (row-major); everything small is
packed with `struct`. Times are `coltrain.serve.timing.clock()` readings
(CLOCK_MONOTONIC, the same in both processes on one host).

Beside the stream, a shared page (`add_incoming` / `read_incoming`) holds, at offset 0,
the number of requests the front end is receiving (i32; only the front end writes it).

front end -> device
  INFER   key u64, arrival f64, deadline_ms f64 (0: the SLO), n u32, images f32[n, *shape]
  SENT    response_delay f64 (result finished -> response written), latency f64
          (arrival -> response written), late f64 (response written - admission's
          prediction; nan if none): one per served request, for admission and the
          `request_seconds` histogram
  COUNT   code u16: a response the front end answered itself (400, 404, 411, 413, 504)
  FSHED   (no fields) the front end refused a request unread (its backlog): a shed
  CALL    key u64, method, path, body: any other endpoint, answered by the device process
  READY   (no fields) the front end is serving
device -> front end
  HELLO   JSON {model_name, image_shape, max_batch, slo_s}: sent first
  SLO     slo_s f64: the latency objective changed (after calibration)
  RESULT  key u64, code u16, then for 200: version u64, queue_ms f64, compute_ms f64,
          replica u32, batch_size u32, finished_at f64, predicted f64 (when admission
          expected the response sent), n u32, k u32, logits f32[n, k];
          for 503: retry_after_s f64 + message; for 500: message
  REPLY   key u64, code u16, content type, headers (JSON list of pairs), body: a CALL's
          answer
"""

from __future__ import annotations

import json
import struct
from typing import Any, Optional

import numpy as np

INFER, SENT, COUNT, CALL, READY, FSHED, HELLO, SLO, RESULT, REPLY = b"ISNCYFHLRP"
_FRAME = struct.Struct("<IB")
_INFER = struct.Struct("<QddI")
_SENT = struct.Struct("<ddd")
_COUNT = struct.Struct("<H")
_KEY_CODE = struct.Struct("<QH")
_RESULT_OK = struct.Struct("<QHQddIIddII")
_F64 = struct.Struct("<d")
_STR = struct.Struct("<I")
_INCOMING = struct.Struct("<i")


def add_incoming(page, delta: int) -> None:
  """Front end: one more (+1) or one fewer (-1) request being received."""
  _INCOMING.pack_into(page, 0, _INCOMING.unpack_from(page, 0)[0] + delta)


def read_incoming(page) -> int:
  """Device process: the requests the front end is receiving."""
  return max(_INCOMING.unpack_from(page, 0)[0], 0)


def frame(kind: int, *parts: bytes) -> bytes:
  return _FRAME.pack(1 + sum(map(len, parts)), kind) + b"".join(parts)


def _pack_str(b: bytes) -> bytes:
  return _STR.pack(len(b)) + b


def _unpack_str(buf, off: int) -> tuple[bytes, int]:
  (n,) = _STR.unpack_from(buf, off)
  off += 4
  return bytes(buf[off:off + n]), off + n


RECV_BYTES = 1 << 20   # the most one `Reader.recv` reads


class Reader:
  """Splits a byte stream into (kind, payload bytes) messages."""

  def __init__(self):
    self._buf = bytearray()
    self._recv_buf: Optional[bytearray] = None

  def recv(self, sock) -> Optional[list[tuple[int, bytes]]]:
    """Reads what `sock` has (up to RECV_BYTES, into a buffer kept for the next call;
    `sock.recv(1 << 20)` allocated and shrank a 1 MiB bytes object per call, ~14 us)
    and returns the messages it completes; None at end of stream. Raises what
    `recv_into` raises (`BlockingIOError` on a non-blocking socket with nothing to
    read, `OSError`)."""
    if self._recv_buf is None:
      self._recv_buf = bytearray(RECV_BYTES)
    n = sock.recv_into(self._recv_buf)
    if not n:
      return None
    return self.feed(memoryview(self._recv_buf)[:n])

  def feed(self, data) -> list[tuple[int, bytes]]:
    """The messages completed by `data` (a partial one waits for the rest)."""
    buf = self._buf
    buf += data
    with memoryview(buf) as view:   # one copy per payload (slicing `buf` copied twice)
      out, off = split_frames(view, 0, len(buf))
    if off:
      del buf[:off]
    return out


def split_frames(view: memoryview, off: int, end: int) -> tuple[list[tuple[int, bytes]], int]:
  """The whole frames in `view[off:end]` as (kind, payload bytes) (one copy each), and
  the offset after the last: it stops at a partial frame or at a length of 0 (no frame
  has one; `coltrain.serve.ring` marks a wrap with it)."""
  out = []
  while end - off >= 5:
    size, kind = _FRAME.unpack_from(view, off)
    if size == 0 or end - off - 4 < size:
      break
    out.append((kind, bytes(view[off + 5:off + 4 + size])))
    off += 4 + size
  return out, off


# -- front end -> device -----------------------------------------------------------------
def infer(key: int, arrival: float, deadline_ms: Optional[float], images: np.ndarray) -> bytes:
  x = np.ascontiguousarray(images, np.float32)
  return frame(INFER, _INFER.pack(key, arrival, deadline_ms or 0.0, x.shape[0]), x.tobytes())


def infer_bytes(n: int, image_shape: tuple[int, ...]) -> int:
  """The size of an INFER frame of n images of `image_shape` (bytes)."""
  return _FRAME.size + _INFER.size + 4 * n * int(np.prod(image_shape))


def read_infer(p: bytes, image_shape: tuple[int, ...]):
  """-> (key, arrival, deadline_ms or None, images float32 (n, *image_shape))."""
  key, arrival, deadline_ms, n = _INFER.unpack_from(p)
  images = np.frombuffer(p, np.float32, offset=_INFER.size).reshape((n,) + image_shape)
  return key, arrival, (deadline_ms or None), images


def sent(response_delay: float, latency: float, late: float = float("nan")) -> bytes:
  return frame(SENT, _SENT.pack(response_delay, latency, late))


def read_sent(p: bytes) -> tuple[float, float, float]:
  return _SENT.unpack_from(p)


def count(code: int) -> bytes:
  return frame(COUNT, _COUNT.pack(code))


def read_count(p: bytes) -> int:
  return _COUNT.unpack_from(p)[0]


def call(key: int, method: str, path: str, body: Optional[bytes]) -> bytes:
  has_body = body is not None
  return frame(CALL, struct.pack("<QB", key, has_body), _pack_str(method.encode()),
               _pack_str(path.encode("utf-8", "surrogateescape")), body or b"")


def read_call(p: bytes) -> tuple[int, str, str, Optional[bytes]]:
  key, has_body = struct.unpack_from("<QB", p)
  method, off = _unpack_str(p, 9)
  path, off = _unpack_str(p, off)
  return (key, method.decode(), path.decode("utf-8", "surrogateescape"),
          bytes(p[off:]) if has_body else None)


def ready() -> bytes:
  return frame(READY)


def front_shed() -> bytes:
  return frame(FSHED)


# -- device -> front end -----------------------------------------------------------------
def hello(info: dict[str, Any]) -> bytes:
  return frame(HELLO, json.dumps(info).encode())


def read_hello(p: bytes) -> dict[str, Any]:
  return json.loads(bytes(p))


def slo(slo_s: float) -> bytes:
  return frame(SLO, _F64.pack(slo_s))


def read_slo(p: bytes) -> float:
  return _F64.unpack_from(p)[0]


def result_ok(key: int, r: dict, finished_at: float,
              predicted: float = float("nan")) -> bytes:
  logits = np.ascontiguousarray(r["logits"], np.float32)
  n, k = logits.shape
  return frame(RESULT, _RESULT_OK.pack(key, 200, r["version"], r["queue_ms"], r["compute_ms"],
                                       r["replica"], r["batch_size"], finished_at,
                                       predicted, n, k),
               logits.tobytes())


def result_shed(key: int, retry_after_s: float, message: str) -> bytes:
  return frame(RESULT, _KEY_CODE.pack(key, 503), _F64.pack(retry_after_s), message.encode())


def result_error(key: int, code: int, message: str) -> bytes:
  return frame(RESULT, _KEY_CODE.pack(key, code), message.encode())


def read_result(p: bytes) -> tuple[int, int, Any]:
  """-> (key, code, fields): 200: dict(version, queue_ms, compute_ms, replica,
  batch_size, finished_at, predicted, logits); 503: (retry_after_s, message); else:
  message."""
  key, code = _KEY_CODE.unpack_from(p)
  if code == 200:
    (_, _, version, queue_ms, compute_ms, replica, batch_size, finished_at, predicted, n,
     k) = _RESULT_OK.unpack_from(p)
    logits = np.frombuffer(p, np.float32, offset=_RESULT_OK.size).reshape(n, k)
    return key, code, {"version": version, "queue_ms": queue_ms, "compute_ms": compute_ms,
                       "replica": replica, "batch_size": batch_size,
                       "finished_at": finished_at, "predicted": predicted,
                       "logits": logits}
  off = _KEY_CODE.size
  if code == 503:
    (retry,) = _F64.unpack_from(p, off)
    return key, code, (retry, bytes(p[off + 8:]).decode())
  return key, code, bytes(p[off:]).decode()


def reply(key: int, code: int, body: bytes, content_type: str,
          headers: tuple[tuple[str, str], ...] = ()) -> bytes:
  return frame(REPLY, _KEY_CODE.pack(key, code), _pack_str(content_type.encode()),
               _pack_str(json.dumps(list(headers)).encode()), body)


def read_reply(p: bytes) -> tuple[int, int, str, tuple[tuple[str, str], ...], bytes]:
  key, code = _KEY_CODE.unpack_from(p)
  ctype, off = _unpack_str(p, _KEY_CODE.size)
  headers, off = _unpack_str(p, off)
  return (key, code, ctype.decode(), tuple(tuple(h) for h in json.loads(headers)),
          bytes(p[off:]))
