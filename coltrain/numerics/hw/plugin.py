"""Loading hardware plugins (hw/include/coltrain/hw_plugin.h) and checking what they can do.

A plugin is a shared library exporting `coltrain_hw_abi_version`,
`coltrain_hw_get_capabilities` and `coltrain_hw_get_handler`. `load_plugin(path)` opens it,
checks the ABI version, reads the capabilities and registers every handler it provides as
the XLA custom-call target `coltrain_hw.<name>.<op>` (platform "cpu"). Plugins are cached
by path: loading one twice returns the same `HwPlugin`.

Which plugin runs (`resolve_plugin_path`): an explicit path (config `numerics.hw_plugin`),
else the COLTRAIN_HW_PLUGIN environment variable, else the CPU datapath model built from
`hw/` when coltrain was installed (`coltrain/numerics/hw/_cpu_datapath*.so`).
"""

from __future__ import annotations

import ctypes
import dataclasses
import glob
import os
import threading
from typing import Optional

import jax

from coltrain.numerics.formats import BFPFormat

ABI_VERSION = 1
OPS = ("gemm", "quantize", "pack", "unpack", "top_k")
ROUNDING_CODES = {"nearest_even": 0, "stochastic": 1, "toward_zero": 2}
ENV_VAR = "COLTRAIN_HW_PLUGIN"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class HwPluginError(ValueError):
  """A plugin cannot be loaded, or cannot do what was asked (format, op, shape)."""


class _Capabilities(ctypes.Structure):
  _fields_ = [
      ("struct_size", ctypes.c_uint32),
      ("abi_version", ctypes.c_uint32),
      ("name", ctypes.c_char_p),
      ("description", ctypes.c_char_p),
      ("ops", ctypes.c_uint32),
      ("mantissa_bits_mask", ctypes.c_uint32),
      ("rounding_mask", ctypes.c_uint32),
      ("num_block_sizes", ctypes.c_uint32),
      ("block_sizes", ctypes.POINTER(ctypes.c_uint32)),
      ("max_block_size", ctypes.c_uint32),
      ("max_gemm_m", ctypes.c_int64),
      ("max_gemm_k", ctypes.c_int64),
      ("max_gemm_n", ctypes.c_int64),
      ("max_elements", ctypes.c_int64),
  ]


@dataclasses.dataclass(frozen=True)
class HwPlugin:
  """A loaded plugin and its capabilities (limits of 0 mean unlimited)."""

  path: str
  name: str
  description: str
  ops: frozenset
  mantissa_bits: frozenset
  roundings: frozenset
  block_sizes: Optional[frozenset]  # None: any block size up to max_block_size
  max_block_size: int
  max_gemm_m: int
  max_gemm_k: int
  max_gemm_n: int
  max_elements: int

  def target(self, op: str) -> str:
    """The XLA custom-call target name of `op`."""
    self.require_op(op)
    return f"coltrain_hw.{self.name}.{op}"

  def require_op(self, op: str) -> None:
    if op not in self.ops:
      raise HwPluginError(f"hw plugin '{self.name}' ({self.path}) does not provide the "
                          f"'{op}' operation; it provides: {', '.join(sorted(self.ops))}")

  def check_format(self, fmt, what: str = "operand", rounding: str = "nearest_even") -> None:
    """Raises HwPluginError unless the plugin can quantize `fmt` with `rounding`."""
    if not isinstance(fmt, BFPFormat):
      raise HwPluginError(f"hw plugin '{self.name}': {what} format {fmt} is not a bfp format "
                          f"(the hw datapath runs bfp{{m}}_b{{block}} / mxint8 only)")
    m, b = fmt.mantissa_bits, fmt.block_size
    if m not in self.mantissa_bits:
      raise HwPluginError(f"hw plugin '{self.name}' cannot do {what} format {fmt}: "
                          f"{m}-bit mantissas unsupported (supported: "
                          f"{_ranges(self.mantissa_bits)})")
    if b > self.max_block_size or (self.block_sizes is not None and b not in self.block_sizes):
      allowed = (sorted(self.block_sizes) if self.block_sizes is not None
                 else f"1..{self.max_block_size}")
      raise HwPluginError(f"hw plugin '{self.name}' cannot do {what} format {fmt}: block "
                          f"size {b} unsupported (supported: {allowed})")
    if rounding not in self.roundings:
      raise HwPluginError(f"hw plugin '{self.name}' cannot round {what} with {rounding!r} "
                          f"(supported: {', '.join(sorted(self.roundings))})")

  def check_gemm(self, lhs, rhs, m: int, k: int, n: int, rounding: str) -> None:
    """Raises HwPluginError unless the plugin can run this GEMM."""
    self.require_op("gemm")
    self.check_format(lhs, "lhs", rounding)
    self.check_format(rhs, "rhs", rounding)
    for dim, size, limit in (("M", m, self.max_gemm_m), ("K", k, self.max_gemm_k),
                             ("N", n, self.max_gemm_n)):
      if limit and size > limit:
        raise HwPluginError(f"hw plugin '{self.name}': GEMM {dim} = {size} exceeds its "
                            f"limit {limit} (shape M={m}, K={k}, N={n})")

  def check_elements(self, op: str, count: int) -> None:
    self.require_op(op)
    if self.max_elements and count > self.max_elements:
      raise HwPluginError(f"hw plugin '{self.name}': {op} on {count} elements exceeds its "
                          f"limit of {self.max_elements}")


def _ranges(values) -> str:
  v = sorted(values)
  return f"{v[0]}..{v[-1]}" if v == list(range(v[0], v[-1] + 1)) else ", ".join(map(str, v))


def default_plugin_path() -> str:
  """The CPU datapath model built at install time (HwPluginError if it was not built)."""
  found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_cpu_datapath*.so")))
  if not found:
    raise HwPluginError(
        "the hw CPU datapath library (coltrain/numerics/hw/_cpu_datapath*.so) is not built: "
        "reinstall coltrain with `pip install -e .` (needs a C++20 compiler such as g++ "
        f">= 10), or point {ENV_VAR} / numerics.hw_plugin at a plugin library")
  return found[0]


def resolve_plugin_path(path: Optional[str] = None) -> str:
  """path, else $COLTRAIN_HW_PLUGIN, else the built-in CPU datapath model."""
  path = path or os.environ.get(ENV_VAR) or default_plugin_path()
  return os.path.realpath(os.path.expanduser(path))


_LOCK = threading.Lock()
_LOADED: dict[str, HwPlugin] = {}
_LIBS: dict[str, ctypes.CDLL] = {}  # keep libraries loaded for the process lifetime


def load_plugin(path: Optional[str] = None) -> HwPlugin:
  """Loads (once) and registers the plugin at `path` (see `resolve_plugin_path`).

  Raises HwPluginError for a missing file, a library that is not a coltrain plugin, an
  ABI version mismatch, or malformed capabilities.
  """
  path = resolve_plugin_path(path)
  with _LOCK:
    if path in _LOADED:
      return _LOADED[path]
    if not os.path.isfile(path):
      raise HwPluginError(f"hw plugin library {path} does not exist")
    try:
      lib = ctypes.CDLL(path)
    except OSError as e:
      raise HwPluginError(f"cannot load hw plugin {path}: {e}") from None
    try:
      abi = lib.coltrain_hw_abi_version
      get_caps = lib.coltrain_hw_get_capabilities
      get_handler = lib.coltrain_hw_get_handler
    except AttributeError as e:
      raise HwPluginError(f"{path} is not a coltrain hw plugin (missing symbol: {e}); see "
                          f"hw/include/coltrain/hw_plugin.h") from None
    abi.restype = ctypes.c_uint32
    version = abi()
    if version != ABI_VERSION:
      raise HwPluginError(f"hw plugin {path} implements plugin ABI version {version}, but "
                          f"this coltrain needs version {ABI_VERSION}: rebuild the plugin "
                          f"against coltrain's hw/include/coltrain/hw_plugin.h")
    get_caps.restype = ctypes.POINTER(_Capabilities)
    caps_ptr = get_caps()
    if not caps_ptr:
      raise HwPluginError(f"hw plugin {path} returned no capabilities")
    caps = caps_ptr.contents
    if caps.struct_size < ctypes.sizeof(_Capabilities) or caps.abi_version != ABI_VERSION:
      raise HwPluginError(f"hw plugin {path}: capabilities struct has size "
                          f"{caps.struct_size} / ABI {caps.abi_version}; expected size >= "
                          f"{ctypes.sizeof(_Capabilities)} and ABI {ABI_VERSION}")
    name = (caps.name or b"").decode()
    if not name or not all(c.isalnum() or c == "_" for c in name) or name != name.lower():
      raise HwPluginError(f"hw plugin {path}: invalid name {name!r} (need [a-z0-9_]+)")
    for other in _LOADED.values():
      if other.name == name:
        raise HwPluginError(f"hw plugin {path} is named '{name}' like the already loaded "
                            f"{other.path}; plugin names must be unique in a process")
    get_handler.restype = ctypes.c_void_p
    get_handler.argtypes = [ctypes.c_char_p]
    ops = []
    for bit, op in enumerate(OPS):
      if caps.ops & (1 << bit):
        fn = get_handler(op.encode())
        if not fn:
          raise HwPluginError(f"hw plugin {path} advertises '{op}' but returns no handler")
        jax.ffi.register_ffi_target(f"coltrain_hw.{name}.{op}", jax.ffi.pycapsule(fn),
                                    platform="cpu")
        ops.append(op)
    blocks = None
    if caps.num_block_sizes:
      blocks = frozenset(int(caps.block_sizes[i]) for i in range(caps.num_block_sizes))
    plugin = HwPlugin(
        path=path, name=name, description=(caps.description or b"").decode(),
        ops=frozenset(ops),
        mantissa_bits=frozenset(m for m in range(2, 25) if caps.mantissa_bits_mask & (1 << m)),
        roundings=frozenset(r for r, code in ROUNDING_CODES.items()
                            if caps.rounding_mask & (1 << code)),
        block_sizes=blocks, max_block_size=int(caps.max_block_size),
        max_gemm_m=int(caps.max_gemm_m), max_gemm_k=int(caps.max_gemm_k),
        max_gemm_n=int(caps.max_gemm_n), max_elements=int(caps.max_elements))
    _LIBS[path] = lib
    _LOADED[path] = plugin
    return plugin


def cpu_kernel(plugin: Optional[HwPlugin] = None) -> str:
  """The GEMM kernel the built-in CPU model runs on this CPU ("avx512", "avx2",
  "reference"), or "" for other plugins."""
  plugin = plugin or load_plugin()
  fn = getattr(_LIBS[plugin.path], "coltrain_hw_cpu_kernel", None)
  if fn is None:
    return ""
  fn.restype = ctypes.c_char_p
  return fn().decode()
