"""coltrain.numerics: bit-exact block floating point / MX numerics (the numerics contract).

Public API:
  parse_format(s) -> Format             formats.py   (FP32Format, BFPFormat, MXFormat)
  quantize(x, fmt, *, axis, rounding, random_bits, key) -> float32
  bfp_encode(x, fmt, *, axis, rounding, random_bits, key) -> BFPBlocks
  bfp_decode(blocks, fmt, *, axis, length) -> float32
  matmul(a, b, *, lhs, rhs, datapath, backend, rounding, random_bits, key) -> float32

Modules: formats (names), bits (exact float32 bit helpers), blocking (block layout),
rounding (rounding modes as integer ops), bfp / mx (blocked encoders), quantize (public
quantizers), matmul (exact HBFP GEMM datapath and the fake-quantized path).
"""

from coltrain.numerics.bfp import BFPBlocks
from coltrain.numerics.formats import (ACCEPTED_FORMS, BFPFormat, Format, FP32Format,
                                       MXFormat, parse_format)
from coltrain.numerics.matmul import check_exact_config, matmul
from coltrain.numerics.quantize import bfp_decode, bfp_encode, quantize
from coltrain.numerics.rounding import ROUNDING_MODES

__all__ = [
    "ACCEPTED_FORMS", "BFPBlocks", "BFPFormat", "FP32Format", "Format", "MXFormat",
    "ROUNDING_MODES", "bfp_decode", "bfp_encode", "check_exact_config", "matmul",
    "parse_format", "quantize",
]
