"""The stacked multi-worker train step (coltrain.comm.stacked) with a flax model:
W = 1 reproduces plain single-worker training, and W = 4 workers train with CHOCO
gossip, metrics coming back per worker."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from coltrain.comm import algorithms as algs
from coltrain.comm import stacked
from coltrain.comm import workers as wk
from coltrain.models import MLP


def preprocess(images):
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.25


class _State:
  def __init__(self, model):
    init_key, self.rng = jax.random.split(jax.random.PRNGKey(0))
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, 8, 8, 1)), train=False))
    self.params = init(init_key)["params"]
    self.model_state = {}


def create_train_state(model, tx, seed, input_shape):
  """Single-worker init (as coltrain.train.state, without its TrainState)."""
  del tx, seed, input_shape
  return _State(model)


class DropMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = MLP(num_classes=10, hidden=(32,))(x)
    return nn.Dropout(0.2, deterministic=not train)(x)


def _batches(n, b, seed=0):
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, size=(b, 8, 8, 1)).astype(np.uint8),
           "label": rng.integers(0, 10, size=(b,)).astype(np.int32)} for _ in range(n)]


def _local_grad(model):
  def local_grad(params, model_state, batch, key):
    x = preprocess(batch["image"])

    def loss_fn(p):
      logits = model.apply({"params": p, **model_state}, x, train=True,
                           rngs={"dropout": key})
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    acc = jnp.mean(jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    return grads, model_state, {"loss": loss, "accuracy": acc}

  return local_grad


def test_one_worker_matches_unstacked_training():
  """W = 1 (allreduce) equals plain single-worker training with the same local_grad and
  key schedule (key_t = fold_in(rng, t)): after 3 steps of SGD with momentum and
  dropout, within 1e-6 absolute. (Not asserted bitwise: the stacked step runs the model
  under vmap, whose batched matmuls XLA may compile differently.)"""
  model = DropMLP()
  tx = optax.sgd(0.1, momentum=0.9)
  state = create_train_state(model, tx, seed=0, input_shape=(1, 8, 8, 1))
  local_grad = _local_grad(model)

  @jax.jit
  def ref_step(params, opt_state, batch, t):
    grads, _, metrics = local_grad(params, {}, batch, jax.random.fold_in(state.rng, t))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  mesh = wk.make_mesh(1)
  alg = algs.make_algorithm({"workers": 1}, tx=tx)
  params, opt, ms, cs = stacked.init_workers(state.params, state.model_state, tx, alg, mesh)
  step_fn = jax.jit(stacked.make_stacked_step(local_grad, alg, mesh))
  rng = wk.replicate(state.rng, mesh)
  ref_params, ref_opt = state.params, tx.init(state.params)
  for t, batch in enumerate(_batches(3, 16)):
    ref_params, ref_opt, ref_metrics = ref_step(ref_params, ref_opt, batch, t)
    params, opt, ms, cs, metrics = step_fn(params, opt, ms, cs,
                                           stacked.split_batch(batch, 1, mesh),
                                           wk.replicate(jnp.int32(t), mesh), rng)
    np.testing.assert_allclose(metrics["loss"][0], ref_metrics["loss"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(wk.unstack(params)), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert float(metrics["bytes_sent"][0]) == 0.0


def test_four_workers_gossip_on_a_flax_model():
  model = DropMLP()
  tx = optax.sgd(0.05, momentum=0.9)
  w = 4
  mesh = wk.make_mesh(1)
  state = create_train_state(model, tx, seed=0, input_shape=(1, 8, 8, 1))
  alg = algs.make_algorithm({"workers": w, "algorithm": "choco", "compressor": "top_k",
                             "ratio": 0.1, "gamma": 0.5, "topology": "ring"}, tx=tx)
  params, opt, ms, cs = stacked.init_workers(state.params, state.model_state, tx, alg, mesh)
  step_fn = jax.jit(stacked.make_stacked_step(_local_grad(model), alg, mesh),
                    donate_argnums=(0, 1, 2, 3))
  batch = _batches(1, 32, seed=1)[0]  # memorise one batch
  losses = []
  for t in range(30):
    params, opt, ms, cs, metrics = step_fn(params, opt, ms, cs,
                                           stacked.split_batch(batch, w, mesh),
                                           wk.replicate(jnp.int32(t), mesh),
                                           wk.replicate(state.rng, mesh))
    losses.append(float(np.mean(metrics["loss"])))
  assert set(metrics) == {"loss", "accuracy", "bytes_sent", "consensus_distance"}
  assert all(v.shape == (w,) for v in metrics.values())
  assert losses[-1] < 0.5 * losses[0]
  # bytes: top_k(0.1) of each leaf, uint16 index offset + float32 value, to 2 ring neighbours
  n = [int(np.prod(x.shape)) for x in jax.tree.leaves(state.params)]
  k = [max(1, -(-x // 10)) for x in n]
  np.testing.assert_allclose(metrics["bytes_sent"], 2 * 6 * sum(k))  # f32 value + u16 index
  assert float(metrics["consensus_distance"][0]) > 0
  # each worker draws its own dropout mask: identical data, different local losses
  same = jax.tree.map(lambda v: np.broadcast_to(v[None, :8], (w, 8) + v.shape[1:]), batch)
  init = stacked.init_workers(state.params, state.model_state, tx, alg, mesh)
  m0 = step_fn(*init, wk.shard(jax.tree.map(jnp.asarray, same), mesh),
               wk.replicate(jnp.int32(0), mesh), wk.replicate(state.rng, mesh))[-1]
  assert len(set(np.asarray(m0["loss"]).tolist())) == w


def test_split_batch():
  b = {"x": np.arange(12).reshape(12, 1)}
  s = stacked.split_batch(b, 3)
  assert s["x"].shape == (3, 4, 1) and int(s["x"][1, 0, 0]) == 4
  try:
    stacked.split_batch(b, 5)
  except ValueError as e:
    assert "does not split" in str(e)
  else:
    raise AssertionError("expected ValueError")
