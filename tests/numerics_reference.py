"""Independent reference for the numerics contract (docs: /work/shared/spec/numerics.md).

Written from the contract text with Python integers and `fractions.Fraction` only (numpy
is used just to move array axes and hold uint32 bit patterns). It does not import
coltrain and shares no code with it: it decodes float32 bits to exact rationals, does
every step in exact arithmetic, and rounds to float32 with its own routine. Slow by
design; use it on small tensors.

All array inputs/outputs are numpy uint32 bit patterns of float32 values.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

NAN = 0x7FC00000
POS_INF = 0x7F800000
NEG_INF = 0xFF800000

# MX element formats from the contract (§3) and OCP MX v1.0:
# name -> (exponent bits, mantissa bits, emax_elem, max_norm)
MX = {
    "e4m3": (4, 3, 8, Fraction(448)),
    "e5m2": (5, 2, 15, Fraction(57344)),
    "e3m2": (3, 2, 4, Fraction(28)),
    "e2m3": (2, 3, 2, Fraction(15, 2)),
    "e2m1": (2, 1, 2, Fraction(6)),
}


# ----------------------------------------------------------------------------- float32

def f32_value(u: int):
  """float32 bits -> Fraction (subnormals become 0: DAZ), or 'nan', '+inf', '-inf'."""
  u = int(u)
  sign = -1 if u >> 31 else 1
  e = (u >> 23) & 0xFF
  f = u & 0x7FFFFF
  if e == 0xFF:
    return "nan" if f else ("+inf" if sign > 0 else "-inf")
  if e == 0:
    return Fraction(0)
  return sign * Fraction(0x800000 + f) * Fraction(2) ** (e - 150)


def floor_log2(a: Fraction) -> int:
  """Exact floor(log2(a)) for a > 0."""
  assert a > 0
  e = a.numerator.bit_length() - a.denominator.bit_length()
  while Fraction(2) ** e > a:
    e -= 1
  while Fraction(2) ** (e + 1) <= a:
    e += 1
  return e


def round_half_even(y: Fraction) -> int:
  n = y.numerator // y.denominator
  d = y - n
  if d > Fraction(1, 2) or (d == Fraction(1, 2) and n % 2 == 1):
    n += 1
  return n


def to_f32_bits(r) -> int:
  """Exact value -> float32 bits per contract §0: RNE at 24 significant bits with an
  unbounded exponent, then FTZ below 2^-126 and ±inf at or above 2^128. Specials pass."""
  if r == "nan":
    return NAN
  if r == "+inf":
    return POS_INF
  if r == "-inf":
    return NEG_INF
  if r == 0:
    return 0
  sign = 1 if r < 0 else 0
  a = abs(r)
  e = floor_log2(a)
  n = round_half_even(a / Fraction(2) ** (e - 23))  # in [2^23, 2^24]
  if n == 1 << 24:
    n, e = 1 << 23, e + 1
  if e < -126:
    return sign << 31  # FTZ
  if e > 127:
    return NEG_INF if sign else POS_INF
  return (sign << 31) | ((e + 127) << 23) | (n - (1 << 23))


def f32_add(u: int, v: int) -> int:
  """float32 addition (RNE, FTZ) of two bit patterns, via exact values."""
  a, b = f32_value(u), f32_value(v)
  if a == "nan" or b == "nan":
    return NAN
  if isinstance(a, str) and isinstance(b, str):
    return NAN if a != b else to_f32_bits(a)
  if isinstance(a, str):
    return to_f32_bits(a)
  if isinstance(b, str):
    return to_f32_bits(b)
  return to_f32_bits(a + b)


# ----------------------------------------------------------------------------- rounding

def round_between(y: Fraction, g0: Fraction, g1: Fraction, g0_even: bool, rounding: str,
                  bits: int) -> Fraction:
  """Rounds y in [g0, g1) to g0 or g1 per contract §4."""
  if y == g0:
    return g0
  delta = (y - g0) / (g1 - g0)
  if rounding == "toward_zero":
    return g0
  if rounding == "nearest_even":
    if delta > Fraction(1, 2) or (delta == Fraction(1, 2) and not g0_even):
      return g1
    return g0
  if rounding == "stochastic":
    r = int(bits) >> 8
    return g1 if delta * 2**24 >= 2**24 - r else g0
  raise ValueError(rounding)


# ----------------------------------------------------------------------------- blocks

def _blocks(length: int, block: int):
  return [(s, min(s + block, length)) for s in range(0, length, block)]


def _apply_blockwise(x_bits: np.ndarray, axis: int, block: int, fn, rbits=None):
  """Applies fn(list_of_bits, list_of_random_bits) -> list_of_bits to every block."""
  x = np.moveaxis(np.asarray(x_bits, np.uint32), axis, -1)
  rb = None if rbits is None else np.moveaxis(np.asarray(rbits, np.uint32), axis, -1)
  out = np.zeros_like(x)
  for idx in np.ndindex(x.shape[:-1]):
    for s, t in _blocks(x.shape[-1], block):
      r = [0] * (t - s) if rb is None else [int(v) for v in rb[idx][s:t]]
      out[idx][s:t] = fn([int(v) for v in x[idx][s:t]], r)
  return np.moveaxis(out, -1, axis)


# ----------------------------------------------------------------------------- bfp

def bfp_encode_block(block_bits, m: int, rounding: str, rbits):
  """One bfp(m) block -> (q list, E, nonfinite). §2."""
  vals = [f32_value(u) for u in block_bits]
  if any(isinstance(v, str) for v in vals):
    return [0] * len(vals), 0, True
  amax = max(abs(v) for v in vals)
  if amax == 0:
    return [0] * len(vals), 0, False
  e = floor_log2(amax)
  step = Fraction(2) ** (e - (m - 2))
  qmax = 2 ** (m - 1) - 1
  qs = []
  for v, r in zip(vals, rbits):
    y = abs(v) / step
    g0 = Fraction(y.numerator // y.denominator)
    q = int(round_between(y, g0, g0 + 1, g0 % 2 == 0, rounding, r))
    q = min(q, qmax)
    qs.append(-q if v < 0 else q)
  return qs, e, False


def bfp_quantize_block(block_bits, m, rounding, rbits):
  qs, e, nonfinite = bfp_encode_block(block_bits, m, rounding, rbits)
  if nonfinite:
    return [NAN] * len(qs)
  step = Fraction(2) ** (e - (m - 2))
  return [to_f32_bits(q * step) for q in qs]


def quantize_bfp(x_bits, m: int, block: int, axis: int = -1,
                 rounding: str = "nearest_even", random_bits=None) -> np.ndarray:
  return _apply_blockwise(
      x_bits, axis, block, lambda b, r: bfp_quantize_block(b, m, rounding, r), random_bits)


# ----------------------------------------------------------------------------- MX

def mx_grid(element: str):
  """Sorted non-negative element values up to max_norm, with 'mantissa LSB is 0' flags."""
  eb, mb, _, max_norm = MX[element]
  bias = 2 ** (eb - 1) - 1
  grid = []
  for ef in range(2**eb):
    for mf in range(2**mb):
      if ef == 0:
        v = Fraction(mf) * Fraction(2) ** (1 - bias - mb)
      else:
        v = Fraction(2**mb + mf) * Fraction(2) ** (ef - bias - mb)
      if v <= max_norm:
        grid.append((v, mf % 2 == 0))
  grid.sort()
  return grid


def mx_quantize_block(block_bits, element: str, rounding: str, rbits):
  _, _, emax_elem, max_norm = MX[element]
  vals = [f32_value(u) for u in block_bits]
  if any(isinstance(v, str) for v in vals):
    return [NAN] * len(vals)
  amax = max(abs(v) for v in vals)
  if amax == 0:
    return [0] * len(vals)
  scale = Fraction(2) ** min(max(floor_log2(amax) - emax_elem, -127), 127)
  grid = mx_grid(element)
  out = []
  for v, r in zip(vals, rbits):
    y = abs(v) / scale
    if y >= max_norm:
      q = max_norm
    else:
      i = max(k for k, (g, _) in enumerate(grid) if g <= y)
      g0, even = grid[i]
      q = round_between(y, g0, grid[i + 1][0], even, rounding, r)
    out.append(to_f32_bits(-q * scale if v < 0 else q * scale))
  return out


def quantize_mx(x_bits, element: str, block: int = 32, axis: int = -1,
                rounding: str = "nearest_even", random_bits=None) -> np.ndarray:
  return _apply_blockwise(
      x_bits, axis, block, lambda b, r: mx_quantize_block(b, element, rounding, r),
      random_bits)


# ----------------------------------------------------------------------------- dispatch

def parse(name: str):
  """Minimal independent name parser: ('fp32',) | ('bfp', m, b) | ('mx', element, b)."""
  parts = name.split("_")
  block = None
  if parts[-1].startswith("b") and parts[-1][1:].isdigit():
    block = int(parts[-1][1:])
    parts = parts[:-1]
  if parts == ["fp32"]:
    return ("fp32",)
  if len(parts) == 1 and parts[0].startswith("bfp"):
    return ("bfp", int(parts[0][3:]), block or 64)
  if parts == ["mxint8"]:
    return ("bfp", 8, block or 32)
  if len(parts) == 2 and parts[0].startswith("mxfp"):
    return ("mx", parts[1], block or 32)
  raise ValueError(name)


def quantize(x_bits, fmt: str, axis: int = -1, rounding: str = "nearest_even",
             random_bits=None) -> np.ndarray:
  p = parse(fmt)
  if p[0] == "fp32":
    x = np.asarray(x_bits, np.uint32)
    return np.where((x & 0x7F800000) == 0, x & 0x80000000, x).astype(np.uint32)
  if p[0] == "bfp":
    return quantize_bfp(x_bits, p[1], p[2], axis, rounding, random_bits)
  return quantize_mx(x_bits, p[1], p[2], axis, rounding, random_bits)


# ----------------------------------------------------------------------------- matmul

def matmul_exact(a_bits, b_bits, lhs: str, rhs: str, rounding: str = "nearest_even",
                 bits_a=None, bits_b=None) -> np.ndarray:
  """Contract §5 for a (..., M, K), b (K, N) given as float32 bits -> bits (..., M, N)."""
  _, ma, ba = parse(lhs)
  _, mb, bb = parse(rhs)
  assert ba == bb
  a = np.asarray(a_bits, np.uint32)
  b = np.asarray(b_bits, np.uint32)
  lead, (m_, k_) = a.shape[:-2], a.shape[-2:]
  a = a.reshape(-1, m_, k_)
  ra = None if bits_a is None else np.asarray(bits_a, np.uint32).reshape(a.shape)
  n_ = b.shape[1]
  blocks = _blocks(k_, ba)

  def enc_rows(mat, rb, m):  # rows of mat blocked along its last axis
    out = []
    for i in range(mat.shape[0]):
      row = []
      for s, t in blocks:
        r = [0] * (t - s) if rb is None else [int(v) for v in rb[i, s:t]]
        row.append(bfp_encode_block([int(v) for v in mat[i, s:t]], m, rounding, r))
      out.append(row)
    return out

  encb = enc_rows(b.T, None if bits_b is None else np.asarray(bits_b, np.uint32).T, mb)
  out = np.zeros((a.shape[0], m_, n_), np.uint32)
  for z in range(a.shape[0]):
    enca = enc_rows(a[z], None if ra is None else ra[z], ma)
    for i in range(m_):
      for j in range(n_):
        acc = 0
        for k in range(len(blocks)):
          qa, ea, nfa = enca[i][k]
          qb, eb, nfb = encb[j][k]
          if nfa or nfb:
            v = NAN
          else:
            p = sum(x * y for x, y in zip(qa, qb))
            v = to_f32_bits(p * Fraction(2) ** (ea + eb - (ma - 2) - (mb - 2)))
          acc = f32_add(acc, v)
        out[z, i, j] = acc
  return out.reshape(lead + (m_, n_))


# ----------------------------------------------------------------------------- equality

def contract_equal(got_bits, want_bits) -> np.ndarray:
  """Elementwise contract equality of bit patterns: +0 == -0, NaN == NaN, else bitwise."""
  g = np.asarray(got_bits, np.uint32)
  w = np.asarray(want_bits, np.uint32)
  g_nan = ((g & 0x7F800000) == 0x7F800000) & ((g & 0x7FFFFF) != 0)
  w_nan = ((w & 0x7F800000) == 0x7F800000) & ((w & 0x7FFFFF) != 0)
  zero = ((g & 0x7FFFFFFF) == 0) & ((w & 0x7FFFFFFF) == 0)
  return (g == w) | (g_nan & w_nan) | zero
