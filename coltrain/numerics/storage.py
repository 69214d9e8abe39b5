"""Weight storage quantization for HBFP training (contract §6: "weights are kept in a wide
storage format between steps", e.g. hbfp8_16 re-quantizes weights to bfp16 after every
optimizer update).

Which parameters: every parameter leaf with ndim >= 2 (the GEMM kernels) is quantized;
leaves with ndim <= 1 (biases, BatchNorm scale/bias, scalars) stay float32: they never
enter a GEMM, and HBFP keeps everything outside the GEMMs in float32.

Block axis = the kernel's forward contraction axis, so the stored blocks line up with the
`fwd` GEMM's weight blocks: a 2-D Dense kernel (in, out) along axis 0 (in-features); an
N-D conv kernel (spatial..., Cin, Cout) along axis ndim-2 (Cin, blocks per tap and output
channel). `store_weights` decides by rank alone (a >= 3-D DenseGeneral kernel would be
treated as a conv kernel); `store_layer_weights` (used by `ResolvedPolicy.store`) knows
each layer's kind from the model trace and blocks DenseGeneral kernels along their
flattened in-feature dims.

Rounding: nearest_even by default (toward_zero allowed; stochastic storage is not offered:
it would need a key per step and the contract does not ask for it).

Two forms:
  - `store_weights(params, fmt)`: apply after `optax.apply_updates`. This is the
    recommended form: the stored weights are exactly `quantize(p + u)`.
  - `weight_storage(fmt)`: an optax transform, last in the chain, returning
    updates' = store(p + u) - p, so that `optax.apply_updates(p, updates')` computes
    p + updates' in float32. **This is not always bit-identical to store(p + u).** With
    q = store(p + u), fl(p + fl(q - p)) = q whenever q - p is exact in float32. If p is
    itself on the storage grid (initial params stored too) with block exponent E_p and
    q has block exponent E_q, q - p is an integer multiple of 2^(min(E) - (m - 2)) below
    2^(max(E) + 2), hence exact whenever |E_q - E_p| <= 24 - m (8 for bfp16) and it is not
    below 2^-126 (FTZ). When a block's exponent jumps further in one step (or p is off
    the grid) the subtraction can round and the sum miss q by one ulp, landing off the
    grid: e.g. bfp16, one-element block p = -(2^-15 + 2^-24), u = 1 gives
    q = 1 - 2^-15 but p + fl(q - p) = 1 - 2^-15 - 2^-24 (tested, with a random check that
    ordinary updates of on-grid weights match bit for bit). So train steps should use
    `store_weights` after `apply_updates` (exact by construction); `weight_storage` is for
    optax pipelines that accept that rare deviation.
"""

from __future__ import annotations

from typing import Any, Optional, Union

import flax
import flax.core
import flax.traverse_util
import jax
import jax.numpy as jnp
import optax

from coltrain.numerics.formats import Format, parse_format
from coltrain.numerics.fakeq import fake_quantize
from coltrain.numerics.quantize import as_float32

_ROUNDINGS = ("nearest_even", "toward_zero")


def _storage_format(fmt) -> Optional[Format]:
  if fmt is None:
    return None
  fmt = parse_format(fmt)
  return None if fmt.kind == "fp32" else fmt


def _check_rounding(rounding: str):
  if rounding not in _ROUNDINGS:
    raise ValueError(f"weight storage rounding must be one of {', '.join(_ROUNDINGS)}, got "
                     f"{rounding!r}")


def kernel_storage_axis(ndim: int) -> Optional[int]:
  """Block axis of a kernel of rank `ndim` (None: not quantized). See module doc."""
  if ndim < 2:
    return None
  return 0 if ndim == 2 else ndim - 2


def quantize_kernel(w: jax.Array, fmt: Format, axis: int, rounding: str = "nearest_even"):
  """quantize(w, fmt, axis=axis, rounding=rounding) (via the equal, faster fake_quantize)."""
  return fake_quantize(as_float32(w, "kernel"), fmt, axis, rounding)


def store_weights(params: Any, fmt: Union[str, Format, None], *,
                  rounding: str = "nearest_even") -> Any:
  """Quantizes every kernel (ndim >= 2 leaf) of `params` to `fmt` along its forward
  contraction axis (2-D: axis 0; N-D: axis ndim-2); other leaves unchanged.

  fmt None or "fp32" returns params unchanged. Leaves must be float32.
  """
  fmt = _storage_format(fmt)
  _check_rounding(rounding)
  if fmt is None:
    return params

  def one(w):
    axis = kernel_storage_axis(jnp.ndim(w))
    return w if axis is None else quantize_kernel(w, fmt, axis, rounding)

  return jax.tree_util.tree_map(one, params)


def store_layer_weights(params: Any, resolved, phase: int, *,
                        rounding: str = "nearest_even") -> Any:
  """Like `store_weights` with phase `phase`'s storage format of `resolved`, but only for
  the kernels of that phase's quantized layers, with each layer's own block axis (Dense:
  flattened in-feature dims; Conv: Cin). Layers that run fp32 keep fp32 weights."""
  fmt = _storage_format(resolved.storage[phase])
  _check_rounding(rounding)
  if fmt is None:
    return params
  info = {l.path: l for l in resolved.layers}
  frozen = isinstance(params, flax.core.FrozenDict)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params) if frozen else params)
  for path in resolved.specs(phase):
    layer = info[path]
    key = (tuple(path.split("/")) if path else ()) + ("kernel",)
    if key not in flat:
      raise ValueError(f"params have no kernel for layer {path!r}")
    w = flat[key]
    if layer.kind == "conv":
      flat[key] = quantize_kernel(w, fmt, w.ndim - 2, rounding)
    else:  # Dense / DenseGeneral: blocks along the flattened in-feature dims
      k = 1
      for d in w.shape[:layer.kernel_in_dims]:
        k *= d
      flat[key] = quantize_kernel(w.reshape(k, -1), fmt, 0, rounding).reshape(w.shape)
  out = flax.traverse_util.unflatten_dict(flat)
  return flax.core.freeze(out) if frozen else out


def weight_storage(fmt: Union[str, Format, None], *,
                   rounding: str = "nearest_even") -> optax.GradientTransformation:
  """optax form of `store_weights` (chain it last): updates' = store(p + u) - p.

  See the module doc: `apply_updates(p, updates')` equals `store_weights(p + u)` bit for
  bit when p is on the storage grid and no block exponent moves by more than 24 - m in
  one step; otherwise it can miss by one ulp. Prefer `store_weights` after
  `apply_updates`.
  """
  fmt = _storage_format(fmt)
  _check_rounding(rounding)

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if fmt is None:
      return updates, state
    if params is None:
      raise ValueError("weight_storage needs params: call tx.update(grads, state, params)")
    new = store_weights(jax.tree_util.tree_map(lambda p, u: p + u, params, updates), fmt,
                        rounding=rounding)
    return jax.tree_util.tree_map(lambda q, p: q - p, new, params), state

  return optax.GradientTransformation(init_fn, update_fn)
