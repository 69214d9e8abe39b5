"""Model shapes and sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.models import MODELS, get_model


@pytest.mark.parametrize("name,shape", [("mlp", (2, 28, 28, 1)), ("lenet", (2, 28, 28, 1)),
                                        ("resnet20", (2, 32, 32, 3))])
def test_logits_shape_and_finite(name, shape):
  model = get_model(name, 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_resnet20_has_the_published_size():
  model = get_model("resnet20", 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  n = sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert 0.26e6 < n < 0.29e6  # He et al.: 0.27M
  convs = [p for p in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
           if "kernel" in jax.tree_util.keystr(p[0]) and p[1].ndim == 4]
  assert len([c for c in convs if c[1].shape[:2] == (3, 3)]) == 19  # 19 conv + 1 dense = 20
  assert "batch_stats" in variables


def test_resnet20_train_mode_updates_batch_stats():
  model = get_model("resnet20", 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3)) + 3.0
  _, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(new["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_unknown_model_is_a_clear_error():
  with pytest.raises(ValueError, match="unknown model 'vgg'; available: " + ", ".join(sorted(MODELS))):
    get_model("vgg", 10)


@pytest.mark.parametrize("shape", [(3, 28, 28, 32), (2, 10, 10, 64), (2, 7, 9, 3)])
def test_lenet_pooling_equals_flax_max_pool_in_values_and_gradient(shape):
  """`max_pool_2x2` (for XLA CPU's speed) gives exactly `nn.max_pool`'s values and
  gradient, odd sizes included, also where a window holds its maximum more than once
  (the first one, row-major, takes the gradient), as after a ReLU."""
  from coltrain.models.lenet import flax_max_pool_2x2 as ref, max_pool_2x2
  x = jax.random.normal(jax.random.PRNGKey(3), shape)
  x = x.at[0, 0, :2, 0].set(0.5).at[0, 1, :2, 0].set(-1.0)   # window (0, 0): a tie
  x = x.at[0, 2:4, 2:4, 0].set(0.25)                         # window (1, 1): four
  x = x.at[-1, -2:, -2:, -1].set(-0.0)                       # -0.0 and +0.0 tie
  x = x.at[-1, -1, -1, -1].set(0.0)
  relu = jax.nn.relu(x)                                       # many zeros tie
  w = jax.random.normal(jax.random.PRNGKey(4), ref(x).shape)
  for inp in (x, relu):
    np.testing.assert_array_equal(np.asarray(max_pool_2x2(inp)), np.asarray(ref(inp)))
    grad = lambda f: jax.grad(lambda v: jnp.sum(f(v) * w))(inp)  # noqa: E731
    g, g_ref = np.asarray(grad(max_pool_2x2)), np.asarray(grad(ref))
    assert g.shape == inp.shape
    np.testing.assert_array_equal(g.view(np.uint32), g_ref.view(np.uint32))
    assert np.count_nonzero(g) == np.count_nonzero(w)        # one element per window
  g = np.asarray(jax.grad(lambda v: jnp.sum(max_pool_2x2(v) * w))(x))
  np.testing.assert_array_equal(g[0, 0, :2, 0], [w[0, 0, 0, 0], 0.0])
  np.testing.assert_array_equal(g[0, 2:4, 2:4, 0], [[w[0, 1, 1, 0], 0.0], [0.0, 0.0]])
  jit_g = jax.jit(jax.grad(lambda v: jnp.sum(max_pool_2x2(v) * w)))(x)
  np.testing.assert_array_equal(np.asarray(jit_g), g)


def test_lenet_trains_the_same_with_either_pooling():
  """One SGD step of LeNet on MNIST-like images (blank borders, positive conv biases:
  the pooled outputs tie there): the same loss and bit-identical weights whether it
  pools with `max_pool_2x2` (the default) or with `nn.max_pool`, under jit."""
  import optax
  from coltrain.models.lenet import LeNet, flax_max_pool_2x2
  model = get_model("lenet", 10)
  x = jax.random.uniform(jax.random.PRNGKey(5), (8, 28, 28, 1))
  x = x.at[:, :8].set(0.0).at[:, :, -6:].set(0.0)     # blank borders, as MNIST's
  y = jnp.arange(8) % 10
  params = model.init(jax.random.PRNGKey(0), x[:1])
  for conv in ("conv0", "conv1"):   # positive biases: the blank background's outputs tie
    params["params"][conv]["bias"] = jnp.full_like(params["params"][conv]["bias"], 0.1)

  def step(model):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        model.apply(p, x), y).mean()
    value, g = jax.value_and_grad(loss)(params)
    return value, jax.tree.map(lambda p, g: p - 0.1 * g, params, g)

  jitted = jax.jit(step, static_argnums=0)
  ours, ref = jitted(model), jitted(LeNet(10, pool=flax_max_pool_2x2))
  assert float(ours[0]) == float(ref[0])
  for a, b in zip(jax.tree.leaves(ours[1]), jax.tree.leaves(ref[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
