"""Runs any flax model with HBFP GEMMs, without rewriting it.

flax `nn.Dense` / `nn.DenseGeneral` call `self.dot_general` and `nn.Conv` calls
`self.conv_general_dilated` (dataclass fields, None -> lax.*). `numerics_context`
installs a `flax.linen.intercept_methods` interceptor that, for each call of such a layer
whose module path has a DotSpec in the resolved policy's phase, sets that bound module's
field to the quantized function (`quantized_dot_general` / `quantized_conv_general_dilated`
with the layer's key bound) for the duration of the call and restores it afterwards.
Layers without a spec (and every other module) run unchanged.

Keys: layer key = fold_in(key, zlib.crc32(path)) — stable across processes and runs; the
roles and operands then fold in their own indices (see `dot.py`). A layer called several
times in one step (weight sharing) gets the same bits each time. `key` may be None when
the phase has no stochastic rounding.

Works under jit, grad/vjp, model.init and model.apply (with mutable collections, e.g.
ResNet batch_stats): the context only has to be active while the model is *traced*, i.e.
around `model.apply` inside the function being jitted/differentiated.

Train-step sketch (one jitted step per phase; the phase is a static Python int):

  resolved = make_policy("hbfp4_booster").resolve(model, jnp.zeros((1, 28, 28, 1)),
                                                  train=False)
  params = resolved.store(params, 0)                  # weights on the storage grid

  def make_step(phase):
    def step(state, x, y):
      key = jax.random.fold_in(state.rng, state.step)
      def loss_fn(params):
        with numerics_context(resolved, phase,
                              key if resolved.needs_key(phase) else None):
          logits = model.apply({"params": params}, x)
        return cross_entropy(logits, y)
      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = resolved.store(optax.apply_updates(state.params, updates), phase)
      ...
    return jax.jit(step)

  steps = {}
  for s in range(total):
    phase = resolved.phase_at(s, total)
    state = steps.setdefault(phase, make_step(phase))(state, *batch)
"""

from __future__ import annotations

import contextlib
import functools
import zlib
from typing import Iterator, Optional

import flax.linen as nn
import jax

from coltrain.numerics.conv import quantized_conv_general_dilated
from coltrain.numerics.dot import DotSpec, quantized_dot_general
from coltrain.numerics.policy import ResolvedPolicy, module_kind

_FIELDS = {"dense": ("dot_general", "dot_general_cls", quantized_dot_general),
           "conv": ("conv_general_dilated", "conv_general_dilated_cls",
                    quantized_conv_general_dilated)}


def path_hash(path: str) -> int:
  """Stable 32-bit hash of a '/'-joined module path (zlib.crc32)."""
  return zlib.crc32(path.encode("utf-8")) & 0xFFFFFFFF


def layer_key(key, path: str):
  """The PRNG key of layer `path`: fold_in(key, crc32(path))."""
  return jax.random.fold_in(key, path_hash(path))


@functools.lru_cache(maxsize=None)
def _quantized_fn(kind: str, spec: DotSpec):
  return _FIELDS[kind][2](spec)


@contextlib.contextmanager
def numerics_context(resolved: ResolvedPolicy, phase: int, key=None,
                     calls: Optional[dict] = None) -> Iterator[None]:
  """Within this context every Dense/DenseGeneral/Conv layer with a spec in `phase` of
  `resolved` runs its GEMMs quantized (see module doc).

  Args:
    resolved: `Policy.resolve(model, sample_input)`.
    phase: the phase index (a Python int: one jitted step per phase).
    key: PRNG key for stochastic rounding (e.g. fold_in(step_rng, some tag)); required
      iff the phase rounds stochastically.
    calls: optional dict; if given, counts quantized calls per layer path (for tests and
      logging; counts trace-time calls).
  """
  specs = resolved.specs(phase)
  if key is None and resolved.needs_key(phase):
    raise ValueError(f"policy {resolved.policy.name!r} phase {phase} rounds "
                     f"stochastically: numerics_context needs key=<PRNG key>")

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    kind = module_kind(module)
    if kind is None:
      return next_fun(*args, **kwargs)
    path = "/".join(module.path)
    spec = specs.get(path)
    if spec is None:
      return next_fun(*args, **kwargs)
    field, cls_field, _ = _FIELDS[kind]
    fn = _quantized_fn(kind, spec)
    k = layer_key(key, path) if spec.needs_key else None
    saved = (getattr(module, field), getattr(module, cls_field))
    object.__setattr__(module, field, functools.partial(fn, key=k))
    object.__setattr__(module, cls_field, None)
    if calls is not None:
      calls[path] = calls.get(path, 0) + 1
    try:
      return next_fun(*args, **kwargs)
    finally:
      object.__setattr__(module, field, saved[0])
      object.__setattr__(module, cls_field, saved[1])

  with nn.intercept_methods(interceptor):
    yield
