"""HBFP training of linear layers: a quantized drop-in for `lax.dot_general` (contract §6).

A linear layer Y = X · W has three GEMMs, each with its own operand formats and rounding
(`DotSpec` holds one `GemmSpec` per role), and each quantizes its two operands **from
their float32 values** along *that GEMM's* contraction axis:

  role   GEMM            A (lhs operand)                B (rhs operand)
  ----   -------------   ----------------------------   ---------------------------
  fwd    Y  = X · W      X (M, K) blocked along K       W (K, N) blocked along K
  dlhs   dX = dY · Wᵀ    dY (M, N) blocked along N      Wᵀ (N, K) blocked along N
  drhs   dW = Xᵀ · dY    Xᵀ (K, M) blocked along M      dY (M, N) blocked along M

Shapes: for `dot_general(lhs, rhs, (((lc...), (rc...)), ((), ())))`, X is lhs with its
non-contracting dims (in order) flattened into M and its contracting dims (in the order
given) flattened into K; W is rhs with its contracting dims (same order) flattened into K
and its other dims into N. So for flax `Dense` on (B, T, K) inputs, M = B·T (the drhs
blocks run along the batch/token axis) and the blocks of `fwd` run along the in-features.
The output is reshaped back to lhs-free dims + rhs-free dims, as `lax.dot_general` does.

Datapaths (`DotSpec.datapath`):
  - "fake": quantize-dequantize both operands (`coltrain.numerics.quantize.quantize`), then
    a float32 GEMM at Precision.HIGHEST (`jnp.matmul`, bit-identical on CPU to the
    equivalent `lax.dot_general`). Same quantized values as the contract, XLA's
    summation order: fast, never bit-exact to §5.
  - "exact": the §5 datapath via `coltrain.numerics.matmul.matmul(..., datapath="exact")`,
    bit-exact. (Both operands are first quantized with their own rounding, because
    `matmul` takes one rounding mode for both operands; bfp quantization is idempotent,
    so the datapath's own re-encoding with nearest_even leaves them unchanged. This is
    tested.) Every role with a non-fp32 operand must then use bfp formats with equal block
    sizes (checked when the spec is built).

`fp32` operand formats mean "not quantized" (the float32 value is used as is, not even
DAZ); a role with both operands fp32 is a plain float32 GEMM on either datapath, so an
all-fp32 `DotSpec` reproduces `lax.dot_general` and its gradients.

Quantization uses `coltrain.numerics.fakeq.fake_quantize`, which gives exactly the values
of `coltrain.numerics.quantize.quantize` (tested) without transposing for leading block
axes.

Stochastic rounding bits (contract §4 explicit-bits form; the bits are ours to choose):
  bits(role r, operand o) = hash_bits(fold_in(fold_in(key, r), o), SHAPE)
(`coltrain.numerics.srbits.hash_bits`: uint32 from a counter hash seeded by the key, a fast
stand-in for jax.random.bits) with r = 0 fwd, 1 dlhs, 2 drhs; o = 0 for the GEMM's A
operand, 1 for its B operand; and SHAPE the 2-D layout in which the operand is quantized:
fwd X (M, K), W (K, N); dlhs dY (M, N), W (K, N) (i.e. Wᵀ's bits transposed); drhs
X (M, K), dY (M, N). So the forward and the two backward GEMMs use independent bits, and
bits are only drawn for operands whose rounding is "stochastic".
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from coltrain.numerics.fakeq import fake_quantize
from coltrain.numerics.formats import Format, parse_format
from coltrain.numerics.matmul import BACKENDS, check_exact_config, matmul
from coltrain.numerics.rounding import check_rounding
from coltrain.numerics.srbits import hash_bits

ROLES = ("fwd", "dlhs", "drhs")
DATAPATHS = ("fake", "exact")
HIGHEST = lax.Precision.HIGHEST


@dataclasses.dataclass(frozen=True)
class GemmSpec:
  """Operand formats and rounding of one GEMM role (strings are parsed on construction;
  the rounding of an fp32 operand is normalized to nearest_even: it is never used)."""

  lhs: Format
  rhs: Format
  lhs_rounding: str = "nearest_even"
  rhs_rounding: str = "nearest_even"

  def __post_init__(self):
    object.__setattr__(self, "lhs", parse_format(self.lhs))
    object.__setattr__(self, "rhs", parse_format(self.rhs))
    check_rounding(self.lhs_rounding)
    check_rounding(self.rhs_rounding)
    # Rounding is meaningless for an unquantized operand: normalize it (equality/hash).
    for side in ("lhs", "rhs"):
      if getattr(self, side).kind == "fp32":
        object.__setattr__(self, f"{side}_rounding", "nearest_even")

  @property
  def is_fp32(self) -> bool:
    """True if neither operand is quantized (a plain float32 GEMM)."""
    return self.lhs.kind == "fp32" and self.rhs.kind == "fp32"

  @property
  def stochastic(self) -> bool:
    """True if some quantized operand uses stochastic rounding (needs a key)."""
    return ((self.lhs.kind != "fp32" and self.lhs_rounding == "stochastic")
            or (self.rhs.kind != "fp32" and self.rhs_rounding == "stochastic"))

  def __str__(self) -> str:
    def op(f, r):
      return "fp32" if f.kind == "fp32" else f"{f}~{r}"
    return f"{op(self.lhs, self.lhs_rounding)}/{op(self.rhs, self.rhs_rounding)}"


FP32_GEMM = GemmSpec("fp32", "fp32")


@dataclasses.dataclass(frozen=True)
class DotSpec:
  """The three GEMM roles of a layer plus the datapath; hashable (a static jit argument).

  Raises ValueError on construction for an unknown datapath/backend or (exact datapath) a
  role whose operands are not a valid §5 configuration.
  """

  fwd: GemmSpec = FP32_GEMM
  dlhs: GemmSpec = FP32_GEMM
  drhs: GemmSpec = FP32_GEMM
  datapath: str = "fake"
  backend: str = "jax"
  hw_plugin: str = ""  # backend "hw": plugin library ("" = $COLTRAIN_HW_PLUGIN or built-in)

  def __post_init__(self):
    for role in ROLES:
      if not isinstance(getattr(self, role), GemmSpec):
        raise ValueError(f"DotSpec.{role} must be a GemmSpec, got {getattr(self, role)!r}")
    if self.datapath not in DATAPATHS:
      raise ValueError(f"unknown datapath {self.datapath!r}; expected 'fake' "
                       f"(quantize-dequantize + float32 GEMM) or 'exact' (contract §5)")
    if self.backend not in BACKENDS:
      raise ValueError(f"unknown backend {self.backend!r}; available: {', '.join(BACKENDS)}")
    if self.datapath == "exact":
      for role in ROLES:
        g = getattr(self, role)
        if g.is_fp32:
          continue
        try:
          check_exact_config(g.lhs, g.rhs)
        except ValueError as e:
          raise ValueError(f"role {role} ({g}) cannot run on the exact datapath: {e}. "
                           f"(A role is either fp32/fp32 or a valid bfp pair.)") from None
    if self.backend == "hw":
      self._check_hw()

  def _check_hw(self) -> None:
    """backend "hw": exact datapath only, and the plugin must do every format/rounding."""
    if self.datapath != "exact":
      raise ValueError("backend 'hw' runs the exact datapath (its GEMMs and quantizers are "
                       "the plugin's custom calls); set datapath 'exact' (numerics.datapath"
                       "=exact), or use backend 'jax' for the fake-quant path")
    from coltrain.numerics.hw.plugin import load_plugin  # loads the library once
    plugin = load_plugin(self.hw_plugin or None)
    plugin.require_op("quantize")
    for role in ROLES:
      g = getattr(self, role)
      if g.is_fp32:
        continue
      plugin.check_format(g.lhs, f"{role} lhs", g.lhs_rounding)
      plugin.check_format(g.rhs, f"{role} rhs", g.rhs_rounding)
      plugin.check_gemm(g.lhs, g.rhs, 1, 1, 1, "nearest_even")

  @property
  def is_fp32(self) -> bool:
    return all(getattr(self, r).is_fp32 for r in ROLES)

  @property
  def needs_key(self) -> bool:
    """True if some role rounds stochastically: calls then need `key=`."""
    return any(getattr(self, r).stochastic for r in ROLES)

  def role(self, name: str) -> GemmSpec:
    return getattr(self, name)

  def __str__(self) -> str:
    return (f"fwd={self.fwd} dlhs={self.dlhs} drhs={self.drhs} [{self.datapath}]")


# ---------------------------------------------------------------------------------------
# Shared helpers (also used by conv.py)

def operand_bits(key, role: int, operand: int, shape) -> jax.Array:
  """The uint32 stochastic-rounding bits of one operand of one role (see module doc)."""
  k = jax.random.fold_in(jax.random.fold_in(key, role), operand)
  return hash_bits(k, shape)


def quantize_operand(x, fmt: Format, rounding: str, axis: int, key, role: int,
                     operand: int, bits_shape=None, spec: "DotSpec | None" = None) -> jax.Array:
  """Quantize-dequantize one GEMM operand along `axis`; fp32 returns x untouched.

  Stochastic bits are drawn with `operand_bits` in `bits_shape` (default x.shape) and
  reshaped to x.shape (bits_shape must have x's size and the same row-major order).
  With `spec.backend == "hw"` the plugin's quantizer runs it (a custom call; same values).
  """
  if fmt.kind == "fp32":
    return x
  bits = None
  if rounding == "stochastic":
    bits = operand_bits(key, role, operand, x.shape if bits_shape is None else bits_shape)
    bits = bits.reshape(x.shape)
  if spec is not None and spec.backend == "hw":
    from coltrain.numerics.hw import ops as hw_ops
    axis = axis % x.ndim
    moved = None if bits is None else jnp.moveaxis(bits, axis, -1)
    q = hw_ops.quantize(jnp.moveaxis(x, axis, -1), fmt, rounding=rounding,
                        random_bits=moved, plugin=spec.hw_plugin or None)
    return jnp.moveaxis(q, -1, axis)
  return fake_quantize(x, fmt, axis, rounding, bits)


def gemm(a, b, g: GemmSpec, datapath: str, backend: str, hw_plugin: str = "") -> jax.Array:
  """C = a @ b for already quantized a (..., M, K), b (K, N) (blocks along K)."""
  if datapath == "fake" or g.is_fp32:
    return jnp.matmul(a, b, precision=HIGHEST)
  # Exact §5 datapath. a and b hold values already quantized with their own rounding;
  # re-encoding them (nearest_even) is the identity, so this is the contract's GEMM.
  return matmul(a, b, lhs=g.lhs, rhs=g.rhs, datapath="exact", backend=backend,
                rounding="nearest_even", hw_plugin=hw_plugin or None)


def check_key(spec: DotSpec, key, what: str):
  """Returns a usable key (a dummy one when no role needs it); clear error if missing."""
  if key is None:
    if spec.needs_key:
      raise ValueError(
          f"{what}: the spec rounds stochastically ({spec}); pass key=<PRNG key> "
          f"(numerics_context does this per layer)")
    return jnp.zeros((2,), jnp.uint32)
  return key


def check_float32(x, what: str) -> jax.Array:
  dtype = getattr(x, "dtype", None)
  if dtype != jnp.float32:
    raise ValueError(f"{what} must be float32 for quantized GEMMs, got {dtype} (keep the "
                     f"layer's dtype/param_dtype float32)")
  return x


def check_out_dtype(preferred_element_type, what: str):
  if preferred_element_type is not None and jnp.dtype(preferred_element_type) != jnp.float32:
    raise ValueError(f"{what}: quantized GEMMs produce float32; preferred_element_type="
                     f"{preferred_element_type} is not supported")


# ---------------------------------------------------------------------------------------
# The 2-D quantized GEMM with its custom VJP.

def check_operands(lhs, rhs, preferred_element_type, out_sharding, what: str):
  """The shared argument checks of the quantized lax replacements: float32 operands
  (returned as arrays), float32 output, no out_sharding."""
  if out_sharding is not None:
    raise ValueError(f"quantized {what}: out_sharding is not supported")
  check_out_dtype(preferred_element_type, f"quantized {what}")
  return check_float32(lhs, f"{what} lhs"), check_float32(rhs, f"{what} rhs")


def _fwd(spec: DotSpec, x, w, key):
  g = spec.fwd
  qx = quantize_operand(x, g.lhs, g.lhs_rounding, 1, key, 0, 0, spec=spec)   # X (M, K) along K
  qw = quantize_operand(w, g.rhs, g.rhs_rounding, 0, key, 0, 1, spec=spec)   # W (K, N) along K
  return gemm(qx, qw, g, spec.datapath, spec.backend, spec.hw_plugin)


def _dlhs(spec: DotSpec, w, dy, key):
  g = spec.dlhs
  qdy = quantize_operand(dy, g.lhs, g.lhs_rounding, 1, key, 1, 0, spec=spec)  # dY (M, N) along N
  qw = quantize_operand(w, g.rhs, g.rhs_rounding, 1, key, 1, 1, spec=spec)    # W (K, N) along N
  return gemm(qdy, qw.T, g, spec.datapath, spec.backend, spec.hw_plugin)           # (M, K)


def _drhs(spec: DotSpec, x, dy, key):
  g = spec.drhs
  qx = quantize_operand(x, g.lhs, g.lhs_rounding, 0, key, 2, 0, spec=spec)    # X (M, K) along M
  qdy = quantize_operand(dy, g.rhs, g.rhs_rounding, 0, key, 2, 1, spec=spec)  # dY (M, N) along M
  return gemm(qx.T, qdy, g, spec.datapath, spec.backend, spec.hw_plugin)           # (K, N)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qgemm(spec: DotSpec, x, w, key):
  return _fwd(spec, x, w, key)


def _qgemm_fwd(spec, x, w, key):
  return _fwd(spec, x, w, key), (x, w, key)


def _qgemm_bwd(spec, res, dy):
  x, w, key = res
  return _dlhs(spec, w, dy, key), _drhs(spec, x, dy, key), None


_qgemm.defvjp(_qgemm_fwd, _qgemm_bwd)


def quantized_gemm(spec: DotSpec, x, w, key=None) -> jax.Array:
  """Y = X · W for X (M, K), W (K, N) with the three HBFP roles of `spec` (custom VJP)."""
  x, w = check_float32(x, "lhs"), check_float32(w, "rhs")
  if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
    raise ValueError(f"quantized_gemm needs X (M, K) and W (K, N); got {x.shape}, {w.shape}")
  return _qgemm(spec, x, w, check_key(spec, key, "quantized_gemm"))


def _norm_dims(dims, ndim: int, what: str) -> tuple[int, ...]:
  out = []
  for d in dims:
    if not -ndim <= int(d) < ndim:
      raise ValueError(f"{what}: dimension {d} out of range for rank {ndim}")
    out.append(int(d) % ndim)
  if len(set(out)) != len(out):
    raise ValueError(f"{what}: repeated dimensions {tuple(dims)}")
  return tuple(out)


def quantized_dot_general(spec: DotSpec):
  """A drop-in for `lax.dot_general` whose three GEMMs follow `spec` (see module doc).

  Returns `dot_general(lhs, rhs, dimension_numbers, precision=None,
  preferred_element_type=None, *, key=None)`. Supported dimension numbers: any
  contracting dims, no batch dims (what flax `Dense` and `DenseGeneral` without
  `batch_dims` use). `precision` is ignored (quantized GEMMs are always float32 at
  HIGHEST); operands must be float32. `key` is a PRNG key for stochastic rounding,
  required iff `spec.needs_key`.
  """
  if not isinstance(spec, DotSpec):
    raise ValueError(f"quantized_dot_general needs a DotSpec, got {spec!r}")

  def dot_general(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, *, key=None, out_sharding=None):
    del precision
    lhs, rhs = check_operands(lhs, rhs, preferred_element_type, out_sharding, "dot_general")
    try:
      (lc, rc), (lb, rb) = dimension_numbers
    except (TypeError, ValueError):
      raise ValueError(f"malformed dimension_numbers {dimension_numbers!r}") from None
    if tuple(lb) or tuple(rb):
      raise ValueError(
          f"quantized dot_general supports no batch dimensions (flax Dense / DenseGeneral "
          f"without batch_dims); got batch dims {tuple(lb)}, {tuple(rb)}")
    lc = _norm_dims(lc, lhs.ndim, "lhs contracting dims")
    rc = _norm_dims(rc, rhs.ndim, "rhs contracting dims")
    if not lc or len(lc) != len(rc):
      raise ValueError(f"quantized dot_general needs >= 1 contracting dim, equally many "
                       f"on both sides; got {lc}, {rc}")
    if any(lhs.shape[a] != rhs.shape[b] for a, b in zip(lc, rc)):
      raise ValueError(f"contracting dims differ in size: lhs {lhs.shape} dims {lc}, "
                       f"rhs {rhs.shape} dims {rc}")
    lfree = tuple(d for d in range(lhs.ndim) if d not in lc)
    rfree = tuple(d for d in range(rhs.ndim) if d not in rc)
    lfree_shape = tuple(lhs.shape[d] for d in lfree)
    rfree_shape = tuple(rhs.shape[d] for d in rfree)
    k = 1
    for d in lc:
      k *= lhs.shape[d]
    x2 = jnp.transpose(lhs, lfree + lc).reshape(-1, k)
    w2 = jnp.transpose(rhs, rc + rfree).reshape(k, -1)
    y2 = _qgemm(spec, x2, w2, check_key(spec, key, "quantized dot_general"))
    return y2.reshape(lfree_shape + rfree_shape)

  dot_general.spec = spec
  return dot_general
