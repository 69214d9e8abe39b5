"""coltrain.numerics: bit-exact block floating point / MX numerics (the numerics contract).

Public API:
  parse_format(s) -> Format             formats.py   (FP32Format, BFPFormat, MXFormat)
  quantize(x, fmt, *, axis, rounding, random_bits, key) -> float32
  bfp_encode(x, fmt, *, axis, rounding, random_bits, key) -> BFPBlocks
  bfp_decode(blocks, fmt, *, axis, length) -> float32
  matmul(a, b, *, lhs, rhs, datapath, backend, rounding, random_bits, key) -> float32

Hybrid (HBFP) training:
  quantized_dot_general(spec) / quantized_conv_general_dilated(spec)   custom_vjp GEMMs
  make_policy(name_or_rules, *, datapath, backend) -> Policy; policy.resolve(model, x)
  numerics_context(resolved, phase, key)   injects the quantized GEMMs into flax models
  store_weights(params, fmt) / weight_storage(fmt)   weight storage format

Modules: formats (names), bits (exact float32 bit helpers), blocking (block layout),
rounding (rounding modes as integer ops), bfp / mx (blocked encoders), quantize (public
quantizers), matmul (exact HBFP GEMM datapath and the fake-quantized path), hw (the
hardware backend: plugins from hw/ and their XLA custom calls, backend="hw").
"""

from coltrain.numerics.bfp import BFPBlocks
from coltrain.numerics.formats import (ACCEPTED_FORMS, BFPFormat, Format, FP32Format,
                                       MXFormat, parse_format)
from coltrain.numerics.matmul import check_exact_config, matmul
from coltrain.numerics.quantize import bfp_decode, bfp_encode, quantize
from coltrain.numerics.rounding import ROUNDING_MODES
from coltrain.numerics.dot import DotSpec, GemmSpec, quantized_dot_general
from coltrain.numerics.conv import quantized_conv_general_dilated
from coltrain.numerics.policy import PRESETS, Policy, ResolvedPolicy, make_policy
from coltrain.numerics.inject import numerics_context
from coltrain.numerics.storage import store_weights, weight_storage

__all__ = [
    "DotSpec", "GemmSpec", "PRESETS", "Policy", "ResolvedPolicy", "make_policy",
    "numerics_context", "quantized_conv_general_dilated", "quantized_dot_general",
    "store_weights", "weight_storage",
    "ACCEPTED_FORMS", "BFPBlocks", "BFPFormat", "FP32Format", "Format", "MXFormat",
    "ROUNDING_MODES", "bfp_decode", "bfp_encode", "check_exact_config", "matmul",
    "parse_format", "quantize",
]
