"""Batch-size buckets: the sizes an inference batch is padded to (one precompiled
executable each, `coltrain.serve.model.Predictor`). Pure Python, no JAX (the config
checks use it)."""

from __future__ import annotations

import bisect
from typing import Sequence


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
  """Powers of two 1, 2, 4, ... below `max_batch`, then `max_batch` (itself a power
  of two for a server, whose config requires one)."""
  out, b = [], 1
  while b < max_batch:
    out.append(b)
    b *= 2
  out.append(max_batch)
  return tuple(out)


def quarter_octave_buckets(max_batch: int) -> tuple[int, ...]:
  """Every size up to 8, then four per octave (10, 12, 14, 16, 20, 24, 28, 32, 40,
  ...), and `max_batch`: a batch is padded by less than a quarter of its size (powers
  of two pad a batch of 17 to 32)."""
  out, b = [], 1
  while b < max_batch:
    out.append(b)
    b += 1 << max(0, b.bit_length() - 3)
  out.append(max_batch)
  return tuple(out)


def parse_buckets(spec: str, max_batch: int) -> tuple[int, ...]:
  """The batch-size buckets for `serve.batch_buckets`: "" -> `quarter_octave_buckets`;
  "pow2" -> the powers of two up to `max_batch` (`buckets_up_to`); "1,2,3,4,6,8,..."
  -> those sizes, sorted, with `max_batch` added if missing (a full batch always has a
  bucket). ValueError, naming the problem, for a size that is not an integer in [1,
  max_batch] or given twice."""
  if not spec.strip():
    return quarter_octave_buckets(max_batch)
  if spec.strip() == "pow2":
    return buckets_up_to(max_batch)
  sizes = []
  for part in spec.split(","):
    part = part.strip()
    try:
      b = int(part)
    except ValueError:
      raise ValueError(f"bucket {part!r} is not an integer") from None
    if not 1 <= b <= max_batch:
      raise ValueError(f"bucket {b} is outside [1, max_batch_size={max_batch}]")
    if b in sizes:
      raise ValueError(f"bucket {b} is given twice")
    sizes.append(b)
  if max_batch not in sizes:
    sizes.append(max_batch)
  return tuple(sorted(sizes))


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= n, `buckets` sorted ascending (n in [1, buckets[-1]])."""
  if not 1 <= n <= buckets[-1]:
    raise ValueError(f"batch of {n} images is outside [1, {buckets[-1]}]")
  return buckets[bisect.bisect_left(buckets, n)]
