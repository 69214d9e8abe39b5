"""The served model: published weight versions and precompiled predict executables.

`Weights` is one immutable published version. `Predictor` holds, for one device, an
ahead-of-time compiled `make_predict_step` executable per (policy phase, batch-size
bucket): a batch of n images is padded to the smallest bucket >= n, so nothing is ever
compiled on the latency path. The server gives the buckets (`serve.batch_buckets`, see
`coltrain.serve.buckets`: by default every size up to 8, then four per octave); a
`Predictor` made without them uses the powers of two. Finer buckets pad less (a batch
of 17 images padded to 32 costs nearly twice its own time) for more executables to
compile at start.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from coltrain.data import DatasetSpec
from coltrain.numerics.policy import ResolvedPolicy
from coltrain.serve.buckets import bucket_for, buckets_up_to
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


class Predictor:
  """Precompiled `predict` executables for one device.

  `__call__(weights, images)` runs the bucket executable for `images` (n, H, W, C)
  float32 under `weights.phase` and returns float32 logits (n, K) as numpy (blocking).
  `buckets`: sorted sizes ending at `max_batch` (default: the powers of two).
  """

  def __init__(self, model, spec: DatasetSpec, numerics: Optional[ResolvedPolicy],
               device, max_batch: int, weights: Weights,
               buckets: Optional[Sequence[int]] = None):
    self.device = device
    self.max_batch = max_batch
    self.buckets = tuple(buckets) if buckets is not None else buckets_up_to(max_batch)
    b = self.buckets
    if not b or b[0] < 1 or b[-1] != max_batch or any(x >= y for x, y in zip(b, b[1:])):
      raise ValueError(f"buckets {self.buckets} must be distinct sizes >= 1, sorted, "
                       f"ending at max_batch {max_batch}")
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

  def bucket_for(self, n: int) -> int:
    """The bucket a batch of n images (1 <= n <= max_batch) runs in."""
    return bucket_for(n, self.buckets)

  def __call__(self, weights: Weights, images: np.ndarray) -> np.ndarray:
    n = images.shape[0]
    b = self.bucket_for(n)
    if n < b:
      images = np.concatenate(
          [images, np.zeros((b - n,) + images.shape[1:], np.float32)])
    if self.device != jax.devices()[0]:  # numpy goes to the default device by itself
      images = jax.device_put(images, self.device)
    logits = self._exe[(weights.phase, b)](weights.params, weights.model_state, images)
    return np.asarray(logits)[:n]
