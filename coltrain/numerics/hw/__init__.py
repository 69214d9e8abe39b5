"""coltrain.numerics.hw: the hardware backend (numerics.backend = "hw").

The accelerator's datapath lives in C++ under `hw/` (a bit-exact CPU model built at
install time); this package loads hardware plugins (`plugin.py`: ABI check, capabilities,
custom-call registration) and calls their XLA custom calls from JAX (`ops.py`).

  from coltrain.numerics import hw
  p = hw.load_plugin()                # $COLTRAIN_HW_PLUGIN or the built-in CPU model
  c = hw.gemm(a, b, "bfp8_b64", "bfp8_b64")           # == matmul(..., backend="jax")
  c = coltrain.numerics.matmul(a, b, lhs="bfp8", rhs="bfp8", datapath="exact",
                               backend="hw")
"""

from coltrain.numerics.hw.ops import gemm, get_plugin, pack, quantize, top_k, unpack
from coltrain.numerics.hw.plugin import (ABI_VERSION, ENV_VAR, HwPlugin, HwPluginError,
                                         cpu_kernel, default_plugin_path, load_plugin,
                                         resolve_plugin_path)

__all__ = ["ABI_VERSION", "ENV_VAR", "HwPlugin", "HwPluginError", "cpu_kernel",
           "default_plugin_path", "gemm", "get_plugin", "load_plugin", "pack", "quantize",
           "resolve_plugin_path", "top_k", "unpack"]
