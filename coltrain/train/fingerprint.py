"""A stable fingerprint of a parameter pytree."""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import numpy as np


def params_fingerprint(params: Any) -> str:
  """sha256 (hex) over the parameters' bytes in a fixed pytree order.

  Leaves are visited in `jax.tree_util` flatten order (dict keys sorted); for each leaf
  the hash takes its key path, dtype, shape and its little-endian C-order bytes, so equal
  fingerprints mean bit-identical parameters with the same structure.
  """
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  for path, leaf in leaves:
    arr = np.asarray(jax.device_get(leaf))
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()
