"""Injection: unmodified flax models (MLP, LeNet, ResNet) run their Dense/Conv GEMMs
through the quantized path inside `numerics_context`."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax

from coltrain.models import LeNet, MLP, ResNet, ResNet20
from coltrain.numerics.dot import quantized_dot_general
from coltrain.numerics.inject import layer_key, numerics_context
from coltrain.numerics.policy import make_policy
from coltrain.numerics.quantize import quantize

HI = lax.Precision.HIGHEST


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _init(model, seed, x):
  """Variables of model's shapes with random values (flax's init compiles slowly on CPU):
  kernels N(0, 1/fan_in), biases small, BatchNorm scale 1 / bias 0, mean 0 / var 1."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return jnp.asarray(rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)
    if name in ("scale", "var"):
      return jnp.ones(leaf.shape, jnp.float32)
    if name == "mean":
      return jnp.zeros(leaf.shape, jnp.float32)
    return jnp.asarray(rng.standard_normal(leaf.shape) * 0.1, jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, x, resolved, phase=0, key=None, calls=None, **kw):
  with numerics_context(resolved, phase, key, calls=calls):
    return model.apply(variables, x, **kw)


def test_mlp_forward_is_the_manual_quantized_computation():
  model, x = MLP(10), _images((4, 28, 28, 1))
  params = _init(model, 0, x)["params"]
  resolved = make_policy("dense0=bfp4~ne;head=mxfp8_e4m3~ne").resolve(model, x)
  calls = {}
  got = jax.jit(lambda p, x: _apply(model, {"params": p}, x, resolved, calls=calls))(params, x)
  assert calls == {"dense0": 1, "head": 1}                # dense1 has no rule: untouched

  def dense(h, layer, fmt):
    w, b = params[layer]["kernel"], params[layer]["bias"]
    if fmt:
      h, w = quantize(h, fmt, axis=1), quantize(w, fmt, axis=0)
    return jnp.matmul(h, w, precision=HI) + b

  @jax.jit
  def manual(x):
    h = x.reshape(4, -1)
    h = nn.relu(dense(h, "dense0", "bfp4"))
    h = nn.relu(dense(h, "dense1", None))
    return dense(h, "head", "mxfp8_e4m3")

  want = manual(x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fp32 = model.apply({"params": params}, x)
  assert not np.allclose(np.asarray(got), np.asarray(fp32), rtol=1e-3)


def test_lenet_forward_is_the_manual_quantized_computation():
  model, x = LeNet(10), _images((2, 28, 28, 1))
  params = _init(model, 1, x)["params"]
  resolved = make_policy("*=bfp6_b16~ne").resolve(model, x)
  calls = {}
  got = jax.jit(lambda p, x: _apply(model, {"params": p}, x, resolved, calls=calls))(params, x)
  assert calls == {k: 1 for k in ("conv0", "conv1", "dense0", "dense1", "head")}
  f = "bfp6_b16"

  def conv(h, layer, padding):
    w, b = params[layer]["kernel"], params[layer]["bias"]
    y = lax.conv_general_dilated(quantize(h, f, axis=-1), quantize(w, f, axis=2), (1, 1),
                                 padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=HI)
    return y + b

  def dense(h, layer):
    w, b = params[layer]["kernel"], params[layer]["bias"]
    return jnp.matmul(quantize(h, f, axis=1), quantize(w, f, axis=0), precision=HI) + b

  pool = lambda h: nn.max_pool(h, (2, 2), strides=(2, 2))

  @jax.jit
  def manual(x):
    h = pool(nn.relu(conv(x, "conv0", "SAME")))
    h = pool(nn.relu(conv(h, "conv1", "VALID"))).reshape(2, -1)
    h = nn.relu(dense(nn.relu(dense(h, "dense0")), "dense1"))
    return dense(h, "head")

  want = manual(x)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_mlp_gradients_under_jit_match_explicit_quantized_layers():
  """jit(grad) through the context = a hand-written MLP calling quantized_dot_general
  with the documented per-layer keys (stochastic rounding in dlhs/drhs)."""
  model, x = MLP(10, hidden=(32,)), _images((8, 6, 6, 1))
  labels = jnp.arange(8) % 10
  params = _init(model, 2, x)["params"]
  resolved = make_policy("hbfp8_16").resolve(model, x)
  key = jax.random.PRNGKey(9)

  def loss_injected(p, key):
    logits = _apply(model, {"params": p}, x, resolved, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  specs = resolved.specs(0)
  dn = (((1,), (0,)), ((), ()))

  def loss_manual(p, key):
    h = x.reshape(8, -1)
    for layer in ("dense0", "head"):
      dot = quantized_dot_general(specs[layer])
      h = dot(h, p[layer]["kernel"], dn, key=layer_key(key, layer)) + p[layer]["bias"]
      if layer != "head":
        h = nn.relu(h)
    return optax.softmax_cross_entropy_with_integer_labels(h, labels).mean()

  g1 = jax.jit(jax.grad(loss_injected))(params, key)
  g2 = jax.jit(jax.grad(loss_manual))(params, key)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  g3 = jax.jit(jax.grad(loss_injected))(params, jax.random.PRNGKey(10))
  assert not np.array_equal(np.asarray(g1["dense0"]["kernel"]),
                            np.asarray(g3["dense0"]["kernel"]))


def test_resnet20_every_gemm_is_quantized():
  """Tracing value_and_grad of ResNet-20 (no compile) routes all 22 GEMM layers through
  the quantized path, and init works inside the context too."""
  model, x = ResNet20(10), jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  resolved = make_policy("hbfp4_booster").resolve(model, x)
  variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  calls = {}

  def loss(params, batch_stats, x, key):
    out, _ = _apply(model, {"params": params, "batch_stats": batch_stats}, x, resolved, 1,
                    key, calls, train=True, mutable=["batch_stats"])
    return out.sum()

  jax.eval_shape(jax.value_and_grad(loss), variables["params"], variables["batch_stats"], x,
                 jax.random.PRNGKey(0))
  assert len(calls) == 22 and set(calls) == {l.path for l in resolved.layers}
  assert all(n == 1 for n in calls.values())
  with numerics_context(resolved, 0, jax.random.PRNGKey(0)):
    init_shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  assert jax.tree.map(lambda a: a.shape, init_shapes) == jax.tree.map(lambda a: a.shape,
                                                                      variables)


def test_resnet_jit_grad_and_batch_stats():
  model = ResNet(num_classes=10, stage_sizes=(1, 1), widths=(4, 8))   # small: compile time
  x = _images((4, 8, 8, 3), 3)
  labels = jnp.arange(4)
  variables = _init(model, 0, x)
  resolved = make_policy("hbfp8_16").resolve(model, x)

  @jax.jit
  def step(params, batch_stats, key):
    def loss(params):
      logits, new_state = _apply(model, {"params": params, "batch_stats": batch_stats}, x,
                                 resolved, 0, key, train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state
    (l, new_state), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return l, grads, new_state["batch_stats"]

  l, grads, stats = step(variables["params"], variables["batch_stats"], jax.random.PRNGKey(1))
  assert np.isfinite(float(l))
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(stats)
  assert len(old) == len(new) and all(not np.array_equal(a, b) for a, b in zip(old, new))
  # Quantization changes the computation; the fp32 step would give other numbers.
  def fp32_loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                            train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  assert float(l) != float(jax.jit(fp32_loss)(variables["params"]))


def test_context_needs_a_key_for_stochastic_phases():
  model, x = MLP(10), _images((2, 4, 4, 1))
  resolved = make_policy("hbfp8_16").resolve(model, x)
  with pytest.raises(ValueError, match="key"):
    with numerics_context(resolved, 0, None):
      pass
  with numerics_context(make_policy("mxint8").resolve(model, x), 0, None):  # RNE only
    jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), x)
  # The module fields are restored after every call: later plain applies are fp32.
  params = _init(model, 0, x)
  calls = {}
  jax.eval_shape(lambda p, k: _apply(model, p, x, resolved, key=k, calls=calls), params,
                 jax.random.PRNGKey(0))
  assert calls == {"dense0": 1, "dense1": 1, "head": 1}
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply(p, x))(params))
  assert "custom_vjp" not in jaxpr and "bitcast" not in jaxpr
