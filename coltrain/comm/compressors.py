"""Stateful, pure compressors over pytrees (optax style).

A `Compressor` works on ONE worker's pytree (algorithms `jax.vmap` it over the stacked
local workers):

  state = c.init(params_like)
  payload, decoded, state = c.compress(x, state, key)
  decoded == c.decode(payload, like, key)          (bit for bit: compress calls decode)
  nbytes = c.payload_bytes(payload)                 (a Python int, static)

Every leaf is compressed on its own, flattened (powersgd: reshaped to a matrix). The
payload is a tuple with one dict of arrays per leaf (in `jax.tree.leaves` order) holding
exactly what a sender puts on the wire, at its real dtypes: `payload_bytes` is the sum of
`size * itemsize` over the payload arrays, computed from shapes and dtypes only, so it is
exact and works on tracers and `jax.ShapeDtypeStruct`s. Leaves are float32 (other float
dtypes are widened to float32 for compression and `decoded` is cast back).

Compressors (n = leaf size):
  none          payload: the float32 values. 4n bytes.
  top_k(ratio)  the k = max(1, ceil(ratio * n)) entries of largest magnitude: int32
                indices + float32 values, 8k bytes. Exactly k non-zeros when x has at
                least k non-zero entries. Biased (use error feedback).
  rand_k(ratio) k uniformly random entries without replacement, scaled by n/k: unbiased.
                The indices come from the key, which sender and receivers derive from a
                shared seed, so only the k float32 values are sent: 4k bytes
                (`send_indices=True` also sends/counts the int32 indices: 8k).
  qsgd(levels)  QSGD (Alistarh et al. 2017), s = levels: per leaf the float32 2-norm,
                and per element a sign bit and a level l in {0..s} with
                E[l] = s|x_i|/||x|| (stochastic rounding): unbiased. Codes of
                1 + ceil(log2(s + 1)) bits are bit-packed into uint8:
                4 + ceil(n (1 + ceil(log2(s+1))) / 8) bytes.
  sign          scaled sign (EF-SignSGD, Karimireddy et al. 2019): ||x||_1 / n * sign(x),
                zeros sent as +; one bit per element (packed uint8) + one float32 scale:
                4 + ceil(n / 8) bytes. Biased (use error feedback).
  powersgd(rank) rank-r PowerSGD (Vogels et al. 2019) of one worker's tensor: a leaf of
                rank >= 2 is the matrix (prod(shape[:-1]), shape[-1]) (flax kernels keep
                the output features last), r' = min(r, rows, cols); P = M Q,
                P_hat = orth(P) (QR), Q <- M^T P_hat; decoded = P_hat Q^T; Q is the state
                (warm start, initialised N(0, 1) from `seed`). Payload P_hat and Q,
                4 r' (rows + cols) bytes; rank-0/1 leaves are sent uncompressed (4n).
  bfp(fmt)      block floating point wire format of any coltrain bfp format
                (`bfp{m}_b{b}`, `mxint8`): blocks along each leaf's last axis (as
                `coltrain.numerics.quantize(x, fmt)` does; 0-d leaves as shape (1,)).
                Payload: mantissas as int8 (m <= 8), int16 (m <= 16) or int32, one per
                element (the zero padding of a short last block is not sent), and one
                int8 shared exponent per block (-128 marks a NaN/inf block). Decoding the
                packed bytes equals `quantize(x, fmt)` bit for bit. n * itemsize +
                nblocks bytes.

`with_error_feedback(c)`: memory e (float32, like x); compresses v = x + e and keeps
e' = v - decoded. Invariant: decoded + e' == x + e up to float rounding of the two
subtractions/additions (exactly where decoded is v or 0 elementwise: none, top_k).
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from coltrain.numerics.formats import BFPFormat, parse_format
from coltrain.numerics.bfp import BFPBlocks, mantissa_dtype
from coltrain.numerics.quantize import bfp_decode, bfp_encode

PyTree = Any
COMPRESSORS = ("none", "top_k", "rand_k", "qsgd", "sign", "powersgd")  # + bfp formats

_HIGHEST = lax.Precision.HIGHEST


class Compressor(NamedTuple):
  """A pure, stateful compressor of one worker's pytree (see module doc).

  name: e.g. "top_k(0.01)", "bfp8_b64", "ef(sign)".
  init(params_like) -> state.
  compress(x, state, key) -> (payload, decoded, new_state).
  decode(payload, like, key) -> decoded (receiver side; `like`: pytree of arrays or
    ShapeDtypeStructs with x's structure, shapes and dtypes; `key`: the sender's key).
  payload_bytes(payload) -> int: bytes on the wire (static).
  unbiased: E[decoded] == x.
  linear: decode(sum of payloads) == sum of decodes (payloads may be summed by an
    allreduce): only `none`.
  """

  name: str
  init: Callable[[PyTree], PyTree]
  compress: Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree, PyTree]]
  decode: Callable[[PyTree, PyTree, jax.Array], PyTree]
  payload_bytes: Callable[[PyTree], int]
  unbiased: bool
  linear: bool = False


def tree_nbytes(tree: PyTree) -> int:
  """Sum of size * itemsize over the leaves (arrays, tracers or ShapeDtypeStructs)."""
  return int(sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


def ratio_to_k(ratio: float, n: int) -> int:
  """k = max(1, ceil(ratio * n)), clipped to n; ratio * n is rounded to 6 decimals first
  so that float noise does not add one (0.07 * 100 -> 7, not 8)."""
  return int(min(n, max(1, math.ceil(round(ratio * n, 6)))))


# --------------------------------------------------------------------------------------
# Per-leaf codecs and the pytree wrapper
# --------------------------------------------------------------------------------------

class _Leaf(NamedTuple):
  init: Callable[[Any, int], Any]                          # (like, leaf_index) -> state
  encode: Callable[[jax.Array, Any, jax.Array], tuple[dict, Any]]  # -> (payload, state)
  decode: Callable[[dict, tuple, jax.Array], jax.Array]    # (payload, shape, key) -> f32


def _f32(x) -> jax.Array:
  x = jnp.asarray(x)
  return x if x.dtype == jnp.float32 else x.astype(jnp.float32)


def _leaf_key(key: Optional[jax.Array], i: int) -> Optional[jax.Array]:
  return None if key is None else jax.random.fold_in(key, i)


def _per_leaf(name: str, leaf: _Leaf, unbiased: bool, linear: bool = False) -> Compressor:

  def init(params_like):
    leaves = jax.tree.leaves(params_like)
    return tuple(leaf.init(x, i) for i, x in enumerate(leaves))

  def decode(payload, like, key):
    leaves, treedef = jax.tree.flatten(like)
    out = [leaf.decode(p, tuple(x.shape), _leaf_key(key, i)).astype(x.dtype)
           for i, (p, x) in enumerate(zip(payload, leaves))]
    return jax.tree.unflatten(treedef, out)

  def compress(x, state, key):
    leaves, treedef = jax.tree.flatten(x)
    payload, new_state, decoded = [], [], []
    for i, (v, s) in enumerate(zip(leaves, state)):
      k = _leaf_key(key, i)
      p, ns = leaf.encode(_f32(v), s, k)
      payload.append(p)
      new_state.append(ns)
      decoded.append(leaf.decode(p, tuple(v.shape), k).astype(v.dtype))
    return tuple(payload), jax.tree.unflatten(treedef, decoded), tuple(new_state)

  return Compressor(name, init, compress, decode, tree_nbytes, unbiased, linear)


def _no_state(like, i):
  return None


# none -------------------------------------------------------------------------------

def none() -> Compressor:
  """The identity: the payload is the float32 tensor itself."""
  return _per_leaf("none", _Leaf(
      _no_state,
      lambda x, s, k: ({"values": x}, s),
      lambda p, shape, k: p["values"].reshape(shape)), unbiased=True, linear=True)


# top_k ------------------------------------------------------------------------------

SEGMENT = 1 << 16  # top_k indices travel as 16-bit offsets within 65536-entry segments


def _index_dtype(limit: int):
  return jnp.uint16 if limit < SEGMENT else jnp.int32


def top_k_indices(flat: jax.Array, k: int) -> jax.Array:
  """Indices (int32, ascending) of the k entries of largest magnitude of float32 `flat`.

  Magnitudes are compared as the integer bit patterns |x| (monotone in the value for
  non-negative floats, NaN above inf, -0 == +0, subnormals kept distinct even where the
  CPU flushes them in float compares); ties go to the lower index (`lax.top_k` is
  stable). This is also exactly what the hw plugin's top_k custom call selects.
  """
  mag = lax.bitcast_convert_type(flat, jnp.int32) & jnp.int32(0x7FFFFFFF)
  _, idx = lax.top_k(mag, k)
  return jnp.sort(idx.astype(jnp.int32))


def top_k(ratio: float, backend: str = "jax", hw_plugin: str = "") -> Compressor:
  """Keeps the k = max(1, ceil(ratio n)) largest-magnitude entries of each leaf.

  Wire format per leaf: `values` float32 (k,) in ascending index order; `index_low`
  uint16 (k,), each index modulo 65536; and, for leaves of more than 65536 entries,
  `segment_counts` (uint16 if k < 65536, else int32) of shape (ceil(n / 65536),): how many
  of the sorted indices fall in each 65536-entry segment. This encodes the sorted index
  set losslessly in 2 bytes per index plus a few bytes per segment (instead of 4 bytes
  per int32 index).

  backend "hw": the selection runs as the hardware plugin's top_k custom call
  (`coltrain.numerics.hw.top_k`, the same indices as `top_k_indices`).
  """
  if not 0 < ratio <= 1:
    raise ValueError(f"top_k ratio must be in (0, 1], got {ratio}")
  check_compressor_backend(backend, hw_plugin, "top_k")

  def encode(x, s, key):
    flat = x.reshape(-1)
    n = flat.size
    k = ratio_to_k(ratio, n)
    if backend == "hw":
      from coltrain.numerics.hw import ops as hw_ops
      idx = hw_ops.top_k(flat, k, plugin=hw_plugin or None)[0]
    else:
      idx = top_k_indices(flat, k)
    payload = {"values": flat[idx], "index_low": (idx & (SEGMENT - 1)).astype(jnp.uint16)}
    if n > SEGMENT:
      segments = -(-n // SEGMENT)
      counts = jnp.zeros((segments,), jnp.int32).at[idx >> 16].add(1)
      payload["segment_counts"] = counts.astype(_index_dtype(k))
    return payload, s

  def decode(p, shape, key):
    n = int(np.prod(shape))
    k = p["values"].shape[0]
    idx = p["index_low"].astype(jnp.int32)
    if "segment_counts" in p:
      counts = p["segment_counts"].astype(jnp.int32)
      segment = jnp.repeat(jnp.arange(counts.shape[0], dtype=jnp.int32), counts,
                           total_repeat_length=k)
      idx = idx + segment * SEGMENT
    return jnp.zeros((n,), jnp.float32).at[idx].set(p["values"]).reshape(shape)

  return _per_leaf(f"top_k({ratio})", _Leaf(_no_state, encode, decode), unbiased=False)


# rand_k -----------------------------------------------------------------------------

def _rand_indices(key, n, k):
  return jax.random.choice(key, n, (k,), replace=False).astype(jnp.int32)


def rand_k(ratio: float, send_indices: bool = False) -> Compressor:
  """k random entries of each leaf scaled by n/k (unbiased); indices from the key."""
  if not 0 < ratio <= 1:
    raise ValueError(f"rand_k ratio must be in (0, 1], got {ratio}")

  def encode(x, s, key):
    flat = x.reshape(-1)
    k = ratio_to_k(ratio, flat.size)
    idx = _rand_indices(key, flat.size, k)
    p = {"values": flat[idx]}
    if send_indices:
      p["indices"] = idx
    return p, s

  def decode(p, shape, key):
    n = int(np.prod(shape))
    k = p["values"].shape[0]
    idx = p["indices"] if send_indices else _rand_indices(key, n, k)
    scale = jnp.float32(n / k)
    return jnp.zeros((n,), jnp.float32).at[idx].set(p["values"] * scale).reshape(shape)

  return _per_leaf(f"rand_k({ratio})", _Leaf(_no_state, encode, decode), unbiased=True)


# bit packing --------------------------------------------------------------------------

def pack_bits(codes: jax.Array, width: int) -> jax.Array:
  """Unsigned codes (n,) of `width` bits each -> uint8 (ceil(n * width / 8),), MSB first."""
  shifts = jnp.arange(width - 1, -1, -1, dtype=jnp.uint32)
  bits = ((codes.astype(jnp.uint32)[:, None] >> shifts) & 1).astype(jnp.uint8)
  return jnp.packbits(bits.reshape(-1))


def unpack_bits(packed: jax.Array, n: int, width: int) -> jax.Array:
  """Inverse of `pack_bits`: uint32 (n,)."""
  bits = jnp.unpackbits(packed, count=n * width).reshape(n, width).astype(jnp.uint32)
  shifts = jnp.arange(width - 1, -1, -1, dtype=jnp.uint32)
  return jnp.sum(bits << shifts, axis=1, dtype=jnp.uint32)


# qsgd -------------------------------------------------------------------------------

def qsgd(levels: int) -> Compressor:
  """QSGD with s = levels quantization levels per sign (unbiased, stochastic)."""
  if not isinstance(levels, (int, np.integer)) or levels < 1:
    raise ValueError(f"qsgd levels must be an int >= 1, got {levels!r}")
  s = int(levels)
  lbits = max(1, math.ceil(math.log2(s + 1)))
  width = 1 + lbits

  def encode(x, st, key):
    flat = x.reshape(-1)
    norm = jnp.sqrt(jnp.sum(flat * flat))
    safe = jnp.where(norm > 0, norm, 1.0)
    xi = jnp.abs(flat) / safe * s
    lo = jnp.floor(xi)
    u = jax.random.uniform(key, flat.shape, jnp.float32)
    lvl = jnp.minimum(lo + (u < xi - lo).astype(jnp.float32), s).astype(jnp.uint32)
    lvl = jnp.where(norm > 0, lvl, 0)
    codes = ((flat < 0).astype(jnp.uint32) << lbits) | lvl
    return {"norm": norm.astype(jnp.float32), "codes": pack_bits(codes, width)}, st

  def decode(p, shape, key):
    n = int(np.prod(shape))
    codes = unpack_bits(p["codes"], n, width)
    lvl = (codes & ((1 << lbits) - 1)).astype(jnp.float32)
    sgn = jnp.where((codes >> lbits) == 1, -1.0, 1.0).astype(jnp.float32)
    return (p["norm"] * (sgn * lvl) / jnp.float32(s)).reshape(shape)

  return _per_leaf(f"qsgd({s})", _Leaf(_no_state, encode, decode), unbiased=True)


# sign -------------------------------------------------------------------------------

def sign() -> Compressor:
  """Scaled sign ||x||_1 / n * sign(x) (zeros as +): 1 bit per element + a float32."""

  def encode(x, st, key):
    flat = x.reshape(-1)
    scale = jnp.sum(jnp.abs(flat)) / jnp.float32(flat.size)
    return {"scale": scale.astype(jnp.float32),
            "signs": jnp.packbits((flat < 0).astype(jnp.uint8))}, st

  def decode(p, shape, key):
    n = int(np.prod(shape))
    neg = jnp.unpackbits(p["signs"], count=n).astype(bool)
    return jnp.where(neg, -p["scale"], p["scale"]).reshape(shape)

  return _per_leaf("sign", _Leaf(_no_state, encode, decode), unbiased=False)


# powersgd ---------------------------------------------------------------------------

def matrix_shape(shape: tuple[int, ...]) -> Optional[tuple[int, int]]:
  """The 2-D view PowerSGD uses for a leaf: (prod(shape[:-1]), shape[-1]), or None for
  rank-0/1 leaves (sent uncompressed)."""
  if len(shape) < 2:
    return None
  return int(np.prod(shape[:-1])), int(shape[-1])


def powersgd_rank(shape: tuple[int, ...], rank: int) -> int:
  ms = matrix_shape(shape)
  return 0 if ms is None else min(rank, *ms)


def orthogonalize(p: jax.Array) -> jax.Array:
  """Orthonormal basis of P's columns (reduced QR; a zero P gives some orthonormal
  basis, never NaN)."""
  q, _ = jnp.linalg.qr(p, mode="reduced")
  return q


def init_q(shape: tuple[int, ...], rank: int, seed: int, leaf_index: int) -> jax.Array:
  """PowerSGD's initial Q (cols, r') ~ N(0, 1), the same on every worker for a seed."""
  ms = matrix_shape(shape)
  r = powersgd_rank(shape, rank)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), leaf_index)
  return jax.random.normal(key, (ms[1], r), jnp.float32)


def powersgd(rank: int, seed: int = 0) -> Compressor:
  """Single-worker rank-`rank` PowerSGD with warm start (see module doc)."""
  if not isinstance(rank, (int, np.integer)) or rank < 1:
    raise ValueError(f"powersgd rank must be an int >= 1, got {rank!r}")

  def init(like, i):
    if matrix_shape(tuple(like.shape)) is None:
      return None
    return init_q(tuple(like.shape), rank, seed, i)

  def encode(x, q, key):
    ms = matrix_shape(x.shape)
    if ms is None:
      return {"values": x.reshape(-1)}, q
    m = x.reshape(ms)
    p = orthogonalize(jnp.matmul(m, q, precision=_HIGHEST))
    q_new = jnp.matmul(m.T, p, precision=_HIGHEST)
    return {"p": p, "q": q_new}, q_new

  def decode(p, shape, key):
    if "values" in p:
      return p["values"].reshape(shape)
    return jnp.matmul(p["p"], p["q"].T, precision=_HIGHEST).reshape(shape)

  return _per_leaf(f"powersgd({rank})", _Leaf(init, encode, decode), unbiased=False)


# bfp ----------------------------------------------------------------------------------

NONFINITE_EXPONENT = -128


def bfp_pack(x: jax.Array, fmt, *, rounding: str = "nearest_even",
             key: Optional[jax.Array] = None, backend: str = "jax",
             hw_plugin: str = "") -> dict:
  """x (float32, any shape) -> the bfp wire format, blocked along the last axis.

  {"mantissas": int8/int16/int32 of x's shape (0-d: (1,)),
   "exponents": int8 (..., nblocks), NONFINITE_EXPONENT for NaN/inf blocks}.
  backend "hw": packed by the hardware plugin's "pack" custom call (identical bytes).
  """
  fmt = parse_format(fmt)
  if not isinstance(fmt, BFPFormat):
    raise ValueError(f"bfp compressor needs a bfp format (bfp{{m}}_b{{b}}, mxint8), got {fmt}")
  x1 = _f32(x)
  x1 = x1.reshape(1) if x1.ndim == 0 else x1
  if backend == "hw":
    from coltrain.numerics.hw import ops as hw_ops
    bits = jax.random.bits(key, x1.shape, jnp.uint32) if rounding == "stochastic" else None
    mant, exps = hw_ops.pack(x1, fmt, rounding=rounding, random_bits=bits,
                             plugin=hw_plugin or None)
    return {"mantissas": mant, "exponents": exps}
  length = x1.shape[-1]
  blocks = bfp_encode(x1, fmt, axis=-1, rounding=rounding,
                      key=key if rounding == "stochastic" else None)
  mant = blocks.mantissas.reshape(blocks.mantissas.shape[:-2] + (-1,))[..., :length]
  exps = jnp.where(blocks.nonfinite, NONFINITE_EXPONENT, blocks.exponents)
  return {"mantissas": mant.astype(mantissa_dtype(fmt)), "exponents": exps.astype(jnp.int8)}


def bfp_unpack(payload: dict, fmt, shape: tuple[int, ...], backend: str = "jax",
               hw_plugin: str = "") -> jax.Array:
  """The bfp wire format -> float32 of `shape`; equals `quantize(x, fmt)` bit for bit.
  backend "hw": unpacked by the hardware plugin's "unpack" custom call."""
  fmt = parse_format(fmt)
  if backend == "hw":
    from coltrain.numerics.hw import ops as hw_ops
    return hw_ops.unpack(payload["mantissas"], payload["exponents"], fmt,
                         plugin=hw_plugin or None).reshape(shape)
  mant = payload["mantissas"].astype(jnp.int32)
  exps = payload["exponents"].astype(jnp.int32)
  length = mant.shape[-1]
  nb = exps.shape[-1]
  pad = nb * fmt.block_size - length
  if pad:
    mant = jnp.pad(mant, [(0, 0)] * (mant.ndim - 1) + [(0, pad)])
  mant = mant.reshape(mant.shape[:-1] + (nb, fmt.block_size))
  nonfinite = exps == NONFINITE_EXPONENT
  blocks = BFPBlocks(mant, jnp.where(nonfinite, 0, exps), nonfinite)
  return bfp_decode(blocks, fmt, axis=-1, length=length).reshape(shape)


def bfp(fmt, rounding: str = "nearest_even", backend: str = "jax",
        hw_plugin: str = "") -> Compressor:
  """Block floating point in its packed wire format (see module doc). `rounding`:
  nearest_even (default) or stochastic (uses the key) / toward_zero. backend "hw": the
  hardware plugin packs and unpacks (the same bytes)."""
  fmt = parse_format(fmt)
  if not isinstance(fmt, BFPFormat):
    raise ValueError(f"bfp compressor needs a bfp format (bfp{{m}}_b{{b}}, mxint8), got {fmt}")
  check_compressor_backend(backend, hw_plugin, "bfp", fmt, rounding)

  def encode(x, s, key):
    return bfp_pack(x, fmt, rounding=rounding, key=key, backend=backend,
                    hw_plugin=hw_plugin), s

  def decode(p, shape, key):
    return bfp_unpack(p, fmt, shape, backend=backend, hw_plugin=hw_plugin)

  name = fmt.name if rounding == "nearest_even" else f"{fmt.name}({rounding})"
  return _per_leaf(name, _Leaf(_no_state, encode, decode),
                   unbiased=rounding == "stochastic")


# error feedback -----------------------------------------------------------------------

def with_error_feedback(c: Compressor) -> Compressor:
  """Error feedback (EF-SGD, Karimireddy et al. 2019; Stich et al. 2018).

  state = {"error": e (float32 like x, starts at 0), "inner": c's state}.
  compress(x): v = x + e; (payload, decoded) = c(v); e' = v - decoded.
  """

  def init(params_like):
    return {"error": jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params_like),
            "inner": c.init(params_like)}

  def compress(x, state, key):
    v = jax.tree.map(lambda a, e: _f32(a) + e, x, state["error"])
    payload, decoded, inner = c.compress(v, state["inner"], key)
    err = jax.tree.map(lambda a, d: a - _f32(d), v, decoded)
    decoded = jax.tree.map(lambda d, a: d.astype(jnp.asarray(a).dtype), decoded, x)
    return payload, decoded, {"error": err, "inner": inner}

  return Compressor(f"ef({c.name})", init, compress, c.decode, c.payload_bytes,
                    unbiased=False, linear=c.linear)


# construction -------------------------------------------------------------------------

def is_bfp_name(name: str) -> bool:
  try:
    return isinstance(parse_format(name), BFPFormat)
  except ValueError:
    return False


def check_compressor_backend(backend: str, hw_plugin: str, what: str, fmt=None,
                   rounding: str = "nearest_even") -> None:
  """Validates a compressor backend; "hw" loads the plugin and checks it can do `what`."""
  if backend not in ("jax", "hw"):
    raise ValueError(f"unknown compressor backend {backend!r}; expected 'jax' or 'hw'")
  if backend == "hw":
    from coltrain.numerics.hw.plugin import load_plugin
    plugin = load_plugin(hw_plugin or None)
    if fmt is None:
      plugin.require_op(what)
    else:
      plugin.require_op("pack")
      plugin.require_op("unpack")
      plugin.check_format(fmt, f"{what} compressor", rounding)


def make_compressor(name: str, *, ratio: float = 0.01, levels: int = 16, rank: int = 2,
                    error_feedback: bool = False, seed: int = 0, backend: str = "jax",
                    hw_plugin: str = "") -> Compressor:
  """A compressor by config name: one of COMPRESSORS or a bfp format string
  ("bfp8_b64", "bfp4", "mxint8", ...). backend "hw" runs top_k selection and bfp
  packing/unpacking as the hardware plugin's custom calls (identical payloads); the other
  compressors have no hw kernels and run in JAX on either backend."""
  if name == "none":
    c = none()
  elif name == "top_k":
    c = top_k(ratio, backend, hw_plugin)
  elif name == "rand_k":
    c = rand_k(ratio)
  elif name == "qsgd":
    c = qsgd(levels)
  elif name == "sign":
    c = sign()
  elif name == "powersgd":
    c = powersgd(rank, seed)
  elif is_bfp_name(name):
    c = bfp(name, backend=backend, hw_plugin=hw_plugin)
  else:
    raise ValueError(f"unknown compressor '{name}'; known: {', '.join(COMPRESSORS)} or a "
                     f"bfp format (bfp{{m}}_b{{block}}, mxint8)")
  return with_error_feedback(c) if error_feedback else c
