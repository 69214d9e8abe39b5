"""The served model: published weight versions and precompiled predict executables.

`Weights` is one immutable published version. `Predictor` holds, for one device, an
ahead-of-time compiled `make_predict_step` executable per (policy phase, batch-size
bucket), buckets being the powers of two up to the maximum batch: a batch of n images is
padded to the next bucket, so nothing is ever compiled on the latency path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from coltrain.data import DatasetSpec
from coltrain.numerics.policy import ResolvedPolicy
from coltrain.train.step import make_predict_step


@dataclasses.dataclass(frozen=True)
class Weights:
  """One published model version: `version` = optimizer steps that produced it; `phase`
  = the precision-policy phase whose forward numerics serve it."""
  version: int
  params: Any
  model_state: Any
  phase: int = 0

  def on_device(self, device) -> bool:
    """Whether every array already lives (only) on `device`."""
    return all(getattr(x, "devices", lambda: None)() == {device}
               for x in jax.tree.leaves((self.params, self.model_state)))

  def to_device(self, device) -> "Weights":
    """A copy whose arrays live on `device` (fresh buffers: safe from donation)."""
    put = lambda x: jax.device_put(jnp.copy(x), device)  # noqa: E731
    return dataclasses.replace(self, params=jax.tree.map(put, self.params),
                               model_state=jax.tree.map(put, self.model_state))


def buckets_up_to(max_batch: int) -> tuple[int, ...]:
  """Powers of two 1, 2, 4, ..., max_batch (a power of two)."""
  out, b = [], 1
  while b <= max_batch:
    out.append(b)
    b *= 2
  return tuple(out)


def bucket_for(n: int, max_batch: int) -> int:
  """The smallest power of two >= n (n in [1, max_batch])."""
  if not 1 <= n <= max_batch:
    raise ValueError(f"batch of {n} images is outside [1, {max_batch}]")
  return 1 << (n - 1).bit_length()


class Predictor:
  """Precompiled `predict` executables for one device.

  `__call__(weights, images)` runs the bucket executable for `images` (n, H, W, C)
  float32 under `weights.phase` and returns float32 logits (n, K) as numpy (blocking).
  """

  def __init__(self, model, spec: DatasetSpec, numerics: Optional[ResolvedPolicy],
               device, max_batch: int, weights: Weights):
    self.device = device
    self.max_batch = max_batch
    self.buckets = buckets_up_to(max_batch)
    self.image_shape = tuple(spec.image_shape)
    num_phases = numerics.num_phases if numerics is not None else 1
    w = weights.to_device(device)
    sharding = jax.sharding.SingleDeviceSharding(device)
    self._exe = {}
    for phase in range(num_phases):
      fn = jax.jit(make_predict_step(model, spec, numerics, phase))
      for b in self.buckets:
        x = jax.ShapeDtypeStruct((b,) + self.image_shape, np.float32, sharding=sharding)
        self._exe[(phase, b)] = fn.lower(w.params, w.model_state, x).compile()

  def __call__(self, weights: Weights, images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    b = bucket_for(n, self.max_batch)
    if n < b:
      images = np.concatenate(
          [images, np.zeros((b - n,) + images.shape[1:], np.float32)])
    if self.device != jax.devices()[0]:  # numpy goes to the default device by itself
      images = jax.device_put(images, self.device)
    logits = self._exe[(weights.phase, b)](weights.params, weights.model_state, images)
    return np.asarray(logits)[:n]
