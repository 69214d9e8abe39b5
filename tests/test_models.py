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
