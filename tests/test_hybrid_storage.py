"""Weight storage quantization (HBFP's wide weight format between steps)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from coltrain.models import ResNet
from coltrain.numerics.policy import make_policy
from coltrain.numerics.quantize import quantize
from coltrain.numerics.storage import store_weights, weight_storage


def _eq(a, b):
  return np.array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def resnet_params():
  model = ResNet(num_classes=10, stage_sizes=(1, 1), widths=(8, 16))
  x = jnp.ones((1, 8, 8, 3))
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)["params"]
  # Random values spread over many binades so that the blocks matter.
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * 0.1
                                              * np.exp(rng.standard_normal(p.shape) * 2),
                                              jnp.float32), shapes)
  return model, x, params


def test_store_weights_kernels_on_grid_others_untouched(resnet_params):
  _, _, params = resnet_params
  stored = store_weights(params, "bfp16")
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(stored)
  assert len(flat_p) == len(flat_s)
  for (path, p), s in zip(flat_p, flat_s):
    name = jax.tree_util.keystr(path)
    if p.ndim >= 2:
      axis = 0 if p.ndim == 2 else p.ndim - 2          # Dense: in-features; conv: Cin
      assert _eq(s, quantize(p, "bfp16", axis=axis)), name
      assert _eq(quantize(s, "bfp16", axis=axis), s), name   # exactly representable
      assert not _eq(s, p), name
    else:
      assert _eq(s, p), name                            # biases, BatchNorm scale/bias
  assert store_weights(params, None) is params and store_weights(params, "fp32") is params


def test_resolved_store_only_touches_quantized_layers(resnet_params):
  model, x, params = resnet_params
  everything = make_policy("hbfp8_16").resolve(model, x)
  assert jax.tree.all(jax.tree.map(_eq, everything.store(params, 0),
                                   store_weights(params, "bfp16")))
  partial = make_policy("stage*=bfp8;@storage=bfp12").resolve(model, x)
  stored = partial.store(params, 0)
  assert _eq(stored["stem"]["kernel"], params["stem"]["kernel"])
  assert _eq(stored["head"]["kernel"], params["head"]["kernel"])
  k = params["stage1_block0"]["conv0"]["kernel"]
  assert _eq(stored["stage1_block0"]["conv0"]["kernel"], quantize(k, "bfp12", axis=2))
  assert make_policy("mxfp8").resolve(model, x).store(params, 0) is params


def test_dense_general_kernel_blocks_along_flattened_in_features():
  import flax.linen as nn

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.DenseGeneral((3, 4), axis=(-2, -1), name="proj")(x)

  x = jnp.ones((2, 5, 6))
  params = jax.eval_shape(lambda x: Net().init(jax.random.PRNGKey(0), x), x)["params"]
  params = jax.tree.map(lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)
                        ** 1.5 - 20, params)
  r = make_policy("*=bfp4_b8;@storage=bfp6_b8").resolve(Net(), x)
  k = params["proj"]["kernel"]                                   # (5, 6, 3, 4)
  want = quantize(k.reshape(30, 12), "bfp6_b8", axis=0).reshape(k.shape)
  assert _eq(r.store(params, 0)["proj"]["kernel"], want)


def test_weight_storage_optax_form_on_grid_weights(resnet_params):
  """With on-grid weights and ordinary updates the optax form is bit-identical to
  store_weights(apply_updates(p, u)) (the subtraction q - p is exact; see storage.py)."""
  _, _, params = resnet_params
  p_a = p_b = store_weights(params, "bfp16")
  tx_a = optax.chain(optax.sgd(0.1, momentum=0.9), weight_storage("bfp16"))
  tx_b = optax.sgd(0.1, momentum=0.9)
  s_a, s_b = tx_a.init(p_a), tx_b.init(p_b)
  rng = np.random.default_rng(1)
  for step in range(4):
    grads = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape), jnp.float32)
                         * 10.0**step, p_a)
    u_a, s_a = tx_a.update(grads, s_a, p_a)
    p_a = optax.apply_updates(p_a, u_a)
    u_b, s_b = tx_b.update(grads, s_b, p_b)
    p_b = store_weights(optax.apply_updates(p_b, u_b), "bfp16")
    assert jax.tree.all(jax.tree.map(_eq, p_a, p_b)), step


def test_weight_storage_optax_form_can_miss_by_one_ulp():
  """The documented exception: a one-element block whose exponent jumps by 14 binades.
  q = store(p + u) = 1 - 2^-15, but p + fl(q - p) = 1 - 2^-15 - 2^-24 (off the grid);
  store_weights after apply_updates gives q exactly."""
  p = {"k": jnp.asarray([[-(2.0**-15 + 2.0**-24)]], jnp.float32)}
  assert _eq(store_weights(p, "bfp16")["k"], p["k"])              # p is on the grid
  u = {"k": jnp.ones((1, 1), jnp.float32)}
  tx = weight_storage("bfp16")
  updates, _ = tx.update(u, tx.init(p), p)
  via_optax = optax.apply_updates(p, updates)["k"]
  exact = store_weights(optax.apply_updates(p, u), "bfp16")["k"]
  assert float(exact[0, 0]) == 1 - 2.0**-15
  assert float(via_optax[0, 0]) == 1 - 2.0**-15 - 2.0**-24
  assert not _eq(quantize(via_optax, "bfp16", axis=0), via_optax)


def test_storage_errors():
  with pytest.raises(ValueError, match="rounding"):
    store_weights({"k": jnp.ones((2, 2))}, "bfp16", rounding="stochastic")
  with pytest.raises(ValueError, match="format"):
    store_weights({"k": jnp.ones((2, 2))}, "bfp1")
  tx = weight_storage("bfp16")
  with pytest.raises(ValueError, match="params"):
    tx.update({"k": jnp.ones((2, 2))}, tx.init(None))
