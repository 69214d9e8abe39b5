"""A single-producer, single-consumer ring of `coltrain.serve.wire` frames in shared
memory: the front end's inference requests to the device process, which the device
thread reads without a system call.

Why: with one replica the scheduler thread is the emulated device and receives its own
requests between device calls (`coltrain.serve.bridge`). Over the data socket that was a
`recv` per loop pass (one after every batch and every training chunk, ~1,300 a second at
3,000 req/s with training on), each on caches the device work had just left cold. From
the ring it is two reads of shared memory and one copy per request.

Layout of the mapping (`HEADER_BYTES` + `capacity`):
  [0, 8)     head  u64: bytes ever written; only the producer stores it, after the frames
  [64, 72)   tail  u64: bytes ever consumed; only the consumer stores it, after copying
  [128, 132) waiting u32: 1 while the consumer is about to block (see the doorbell)
  [HEADER_BYTES, +capacity)  the frames, each whole at offset `position % capacity`; a
             frame that does not fit before the end goes to the start of the next lap,
             after a wrap marker (u32 0: a frame's own length is >= 1) if 4 bytes remain.

The doorbell: a consumer that would block (nothing to read) sets `waiting`, reads `head`
again and only then blocks on its doorbell, a socket from the producer; the producer,
after publishing `head`, rings it (one byte) only while `waiting` is set. So a consumer
that keeps busy (a device training between batches) is never rung, and one that blocks
is woken.

Memory ordering: x86-64's total store order keeps the frames before `head` and a copy
before the `tail` that frees it, without fences. The doorbell's store-then-load on each
side needs a full fence, which is an uncontended `threading.Lock` acquire and release
(an atomic read-modify-write instruction, a full barrier on x86). Other architectures
order memory more weakly: `SUPPORTED` is False there and the requests use the socket.
"""

from __future__ import annotations

import mmap
import os
import platform
import struct
import threading
from typing import Sequence

from coltrain.serve import wire

SUPPORTED = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
HEADER_BYTES = 4096
MIN_CAPACITY = 4 << 20   # bytes
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_HEAD, _TAIL, _WAITING = 0, 64, 128
_FENCE = threading.Lock()


def _fence() -> None:
  """A full memory barrier (see the module docstring)."""
  _FENCE.acquire()
  _FENCE.release()


def capacity_for(max_frame_bytes: int) -> int:
  """The ring capacity for frames of up to `max_frame_bytes`: room for at least four of
  the largest, and at least MIN_CAPACITY, rounded up to whole pages."""
  want = max(MIN_CAPACITY, 4 * max_frame_bytes)
  return -(-want // mmap.PAGESIZE) * mmap.PAGESIZE


class FrameRing:
  """One end of the ring over `buf` (an mmap of HEADER_BYTES + capacity bytes); the
  producer calls `put` and `consumer_waiting`, the consumer `read`, `begin_wait` and
  `end_wait` (see the module docstring)."""

  def __init__(self, buf: mmap.mmap):
    if len(buf) <= HEADER_BYTES:
      raise ValueError(f"a ring needs more than {HEADER_BYTES} bytes, got {len(buf)}")
    self.buf = buf
    self.capacity = len(buf) - HEADER_BYTES
    self._view = memoryview(buf)
    self._head = _U64.unpack_from(buf, _HEAD)[0]   # the producer's own copy
    self._tail = _U64.unpack_from(buf, _TAIL)[0]   # the consumer's own copy

  @classmethod
  def create(cls, capacity: int) -> tuple["FrameRing", int]:
    """A new ring in a memfd (inherited by a child process, which maps it with
    `attach`): (the ring, the memfd)."""
    fd = os.memfd_create("coltrain-requests", 0)
    os.ftruncate(fd, HEADER_BYTES + capacity)
    return cls(mmap.mmap(fd, HEADER_BYTES + capacity)), fd

  @classmethod
  def attach(cls, fd: int) -> "FrameRing":
    """The other end of a ring made by `create` (`fd`: its memfd)."""
    return cls(mmap.mmap(fd, os.fstat(fd).st_size))

  def close(self) -> None:
    self._view.release()
    self.buf.close()

  # -- producer --------------------------------------------------------------------------
  def put(self, frames: Sequence[bytes]) -> int:
    """Writes whole frames, in order, while they fit; returns how many were written (the
    rest wait for the consumer to free room). Raises ValueError for a frame that could
    never fit."""
    buf, cap, head = self.buf, self.capacity, self._head
    tail = _U64.unpack_from(buf, _TAIL)[0]
    blob = b"".join(frames) if len(frames) > 1 else frames[0] if frames else b""
    off = head % cap
    if len(blob) <= cap - off and head + len(blob) - tail <= cap:   # the usual case
      buf[HEADER_BYTES + off:HEADER_BYTES + off + len(blob)] = blob
      self._publish(head + len(blob))
      return len(frames)
    written = 0
    for f in frames:
      n = len(f)
      if n > cap:
        raise ValueError(f"a frame of {n} bytes cannot fit a ring of {cap} bytes")
      off = head % cap
      skip = cap - off if n > cap - off else 0
      if head + skip + n - tail > cap:
        break
      if skip:
        if skip >= 4:
          _U32.pack_into(buf, HEADER_BYTES + off, 0)
        head += skip
        off = 0
      buf[HEADER_BYTES + off:HEADER_BYTES + off + n] = f
      head += n
      written += 1
    if written:
      self._publish(head)
    return written

  def _publish(self, head: int) -> None:
    self._head = head
    _U64.pack_into(self.buf, _HEAD, head)

  def consumer_waiting(self) -> bool:
    """After `put`: whether the consumer may be blocked (ring its doorbell)."""
    _fence()
    return _U32.unpack_from(self.buf, _WAITING)[0] != 0

  # -- consumer --------------------------------------------------------------------------
  def pending(self) -> bool:
    """Whether there is something to read."""
    return _U64.unpack_from(self.buf, _HEAD)[0] != self._tail

  def read(self) -> list[tuple[int, bytes]]:
    """Every frame written so far, as (kind, payload bytes) (copies: the room is freed
    for the producer)."""
    buf, cap, tail = self.buf, self.capacity, self._tail
    head = _U64.unpack_from(buf, _HEAD)[0]
    if head == tail:
      return []
    out = []
    while tail < head:   # each pass: the frames up to `head` or to this lap's end
      off = tail % cap
      end = min(cap, off + head - tail)
      frames, stop = wire.split_frames(self._view, HEADER_BYTES + off, HEADER_BYTES + end)
      out += frames
      tail += stop - HEADER_BYTES - off
      if tail < head and tail % cap:   # a wrap (marker, or under 4 bytes left)
        tail += cap - tail % cap
    self._tail = tail
    _U64.pack_into(buf, _TAIL, tail)
    return out

  def begin_wait(self) -> bool:
    """Before blocking on the doorbell: marks the consumer waiting and returns whether
    the ring is still empty (False: read instead of blocking). Call `end_wait` after."""
    _U32.pack_into(self.buf, _WAITING, 1)
    _fence()
    return not self.pending()

  def end_wait(self) -> None:
    _U32.pack_into(self.buf, _WAITING, 0)
