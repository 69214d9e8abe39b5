"""Number formats and their names (numerics contract §7).

A format is a frozen, hashable dataclass, so it can be a static argument of `jax.jit`.
`parse_format` turns a name into a format; `str(fmt)` / `fmt.name` gives the canonical
name, and `parse_format(str(fmt)) == fmt` for every format.

Families and names:

- `FP32Format`: `fp32`. Plain float32 (quantizing to it only applies DAZ).
- `BFPFormat`: `bfp{m}` or `bfp{m}_b{block}`, 2 <= m <= 24 mantissa bits *including the
  sign*, default block 64; canonical name always carries the block: `bfp8_b64`.
  `mxint8` / `mxint8_b{block}` (default block 32) is OCP MXINT8, which is exactly
  `bfp(8, block)` arithmetic; it parses to a `BFPFormat` with `mx_name=True` so that its
  name round-trips, and it is accepted wherever a bfp format is.
- `MXFormat`: `mxfp8_e4m3`, `mxfp8_e5m2`, `mxfp6_e3m2`, `mxfp6_e2m3`, `mxfp4_e2m1`, optional
  `_b{block}` (default 32); the canonical name omits `_b32`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Union

ACCEPTED_FORMS = (
    "fp32, bfp{m} or bfp{m}_b{block} (2 <= m <= 24, block >= 1, default block 64), "
    "mxint8, mxfp8_e4m3, mxfp8_e5m2, mxfp6_e3m2, mxfp6_e2m3, mxfp4_e2m1 "
    "(each optionally with _b{block}, default block 32)")

BFP_DEFAULT_BLOCK = 64
MX_DEFAULT_BLOCK = 32


@dataclasses.dataclass(frozen=True)
class FP32Format:
  """IEEE float32; quantization to it is the identity except DAZ (see `quantize`)."""

  kind = "fp32"

  @property
  def name(self) -> str:
    return "fp32"

  def __str__(self) -> str:
    return self.name


@dataclasses.dataclass(frozen=True)
class BFPFormat:
  """Block floating point `bfp(m, b)` (contract §2).

  Attributes:
    mantissa_bits: m, bits per mantissa *including the sign*, 2 <= m <= 24.
    block_size: b, elements per block (>= 1).
    mx_name: True for the `mxint8` spelling (same arithmetic as bfp(8, b)).
  """

  mantissa_bits: int
  block_size: int = BFP_DEFAULT_BLOCK
  mx_name: bool = False

  kind = "bfp"

  def __post_init__(self):
    m, b = self.mantissa_bits, self.block_size
    if not isinstance(m, int) or not 2 <= m <= 24:
      raise ValueError(f"bfp mantissa bits must be an int in [2, 24], got {m!r}")
    if not isinstance(b, int) or b < 1:
      raise ValueError(f"block size must be an int >= 1, got {b!r}")
    if self.mx_name and m != 8:
      raise ValueError("mx_name=True is only valid for 8-bit mantissas (mxint8)")

  @property
  def qmax(self) -> int:
    """Largest mantissa magnitude, 2^(m-1) - 1 (the mantissa range is symmetric)."""
    return (1 << (self.mantissa_bits - 1)) - 1

  @property
  def step_shift(self) -> int:
    """m - 2: the step of a block with shared exponent E is 2^(E - step_shift)."""
    return self.mantissa_bits - 2

  @property
  def storage_bits(self) -> int:
    """Smallest two's-complement integer width (8, 16 or 32) that holds a mantissa."""
    m = self.mantissa_bits
    return 8 if m <= 8 else 16 if m <= 16 else 32

  @property
  def name(self) -> str:
    if self.mx_name:
      return "mxint8" if self.block_size == MX_DEFAULT_BLOCK else f"mxint8_b{self.block_size}"
    return f"bfp{self.mantissa_bits}_b{self.block_size}"

  def __str__(self) -> str:
    return self.name


# element name -> (exponent bits, mantissa bits, emax_elem, max_norm)
MX_ELEMENTS = {
    "e4m3": (4, 3, 8, 448.0),
    "e5m2": (5, 2, 15, 57344.0),
    "e3m2": (3, 2, 4, 28.0),
    "e2m3": (2, 3, 2, 7.5),
    "e2m1": (2, 1, 2, 6.0),
}
_MX_TOTAL_BITS = {"e4m3": 8, "e5m2": 8, "e3m2": 6, "e2m3": 6, "e2m1": 4}


@dataclasses.dataclass(frozen=True)
class MXFormat:
  """OCP Microscaling floating-point element format with an E8M0 block scale (contract §3).

  Attributes:
    element: one of "e4m3", "e5m2", "e3m2", "e2m3", "e2m1".
    block_size: elements per block (>= 1), default 32.
  Derived: exp_bits, man_bits, bits (element width incl. sign), bias, emax_elem, emin_elem
  (exponent of the smallest normal), precision (man_bits + 1), max_norm, and the integer
  forms used by the quantizer (top_shift, max_norm_units).
  """

  element: str
  block_size: int = MX_DEFAULT_BLOCK

  kind = "mx"

  def __post_init__(self):
    if self.element not in MX_ELEMENTS:
      raise ValueError(f"unknown MX element type {self.element!r}; "
                       f"known: {', '.join(MX_ELEMENTS)}")
    if not isinstance(self.block_size, int) or self.block_size < 1:
      raise ValueError(f"block size must be an int >= 1, got {self.block_size!r}")

  @property
  def exp_bits(self) -> int:
    return MX_ELEMENTS[self.element][0]

  @property
  def man_bits(self) -> int:
    return MX_ELEMENTS[self.element][1]

  @property
  def bits(self) -> int:
    return _MX_TOTAL_BITS[self.element]

  @property
  def precision(self) -> int:
    return self.man_bits + 1

  @property
  def bias(self) -> int:
    return (1 << (self.exp_bits - 1)) - 1

  @property
  def emax_elem(self) -> int:
    return MX_ELEMENTS[self.element][2]

  @property
  def emin_elem(self) -> int:
    """Exponent of the smallest normal element value."""
    return 1 - self.bias

  @property
  def max_norm(self) -> float:
    return MX_ELEMENTS[self.element][3]

  @property
  def top_shift(self) -> int:
    """Exponent of the element grid spacing in the top binade: emax_elem - man_bits."""
    return self.emax_elem - self.man_bits

  @property
  def max_norm_units(self) -> int:
    """max_norm / 2^top_shift, an integer (e4m3: 14, e5m2: 7, e3m2: 7, e2m3: 15, e2m1: 3)."""
    return int(self.max_norm / 2.0**self.top_shift)

  @property
  def name(self) -> str:
    base = f"mxfp{self.bits}_{self.element}"
    return base if self.block_size == MX_DEFAULT_BLOCK else f"{base}_b{self.block_size}"

  def __str__(self) -> str:
    return self.name


Format = Union[FP32Format, BFPFormat, MXFormat]

_BLOCK = r"(?:_b(?P<block>[1-9][0-9]*))?"
_BFP_RE = re.compile(r"bfp(?P<m>[1-9][0-9]*)" + _BLOCK)
_MXINT_RE = re.compile(r"mxint8" + _BLOCK)
_MXFP_RE = re.compile(r"mxfp(?P<bits>[468])_(?P<el>e[0-9]m[0-9])" + _BLOCK)


def _bad(s: object, why: str = "") -> ValueError:
  extra = f" ({why})" if why else ""
  return ValueError(f"unknown or malformed number format {s!r}{extra}; "
                    f"accepted forms: {ACCEPTED_FORMS}")


def parse_format(s: Union[str, Format]) -> Format:
  """Parses a format name (contract §7); a Format object is returned unchanged.

  Raises:
    ValueError: unknown or malformed name (the message lists the accepted forms).
  """
  if isinstance(s, (FP32Format, BFPFormat, MXFormat)):
    return s
  if not isinstance(s, str):
    raise _bad(s, "not a string")
  if s == "fp32":
    return FP32Format()
  if mt := _BFP_RE.fullmatch(s):
    m = int(mt["m"])
    if not 2 <= m <= 24:
      raise _bad(s, "bfp mantissa bits must be in [2, 24]")
    return BFPFormat(m, int(mt["block"] or BFP_DEFAULT_BLOCK))
  if mt := _MXINT_RE.fullmatch(s):
    return BFPFormat(8, int(mt["block"] or MX_DEFAULT_BLOCK), mx_name=True)
  if mt := _MXFP_RE.fullmatch(s):
    el = mt["el"]
    if el not in MX_ELEMENTS or _MX_TOTAL_BITS[el] != int(mt["bits"]):
      raise _bad(s, f"no MX element type mxfp{mt['bits']}_{el}")
    return MXFormat(el, int(mt["block"] or MX_DEFAULT_BLOCK))
  raise _bad(s)
