"""`serve.init_from`: a server starts from a launch.train run's latest checkpoint and
its co-located training continues that run (weights, optimizer state, step, data)."""

import os

import jax
import numpy as np
import pytest

from coltrain.config import ConfigError
from coltrain.data import open_dataset
from coltrain.models import get_model
from coltrain.serve import Server
from coltrain.serve.config import validate_serve, with_serve_defaults
from coltrain.serve.init_from import restore_train_state
from coltrain.serve.metrics import parse_metrics
from coltrain.serve.trainer import ChunkTrainer
from coltrain.train import make_optimizer, train_and_evaluate
from coltrain.train.checkpoint import Checkpointer
from coltrain.train.step import make_predict_step
from tests.conftest import small_config

pytestmark = pytest.mark.serial   # wall-clock timing: runs alone (pyproject's `serial`)


def run_cfg(steps):
  """launch.train config: constant learning rate, so a 3-step run is the first 3 steps
  of a 5-step run."""
  return small_config(batch_size=16, steps=steps, checkpoint_every=100,
                      **{"optimizer.schedule": "constant"})


def serve_cfg(workdir, steps=5, **kw):
  c = with_serve_defaults(run_cfg(steps))
  c.serve.init_from = workdir
  c.serve.max_batch_size = 4
  c.serve.micro_batch_size = 4
  c.serve.chunk_steps = 2
  c.serve.publish_every = 1
  c.serve.slo_ms = 1000.0
  for k, v in kw.items():
    c.serve[k] = v
  return c


@pytest.fixture(scope="module")
def runs(tfds_dir, tmp_path_factory):
  """Two launch.train runs: 3 steps (the one served) and 5 steps (the reference)."""
  base = tmp_path_factory.mktemp("runs")
  out = {}
  for steps in (3, 5):
    workdir = str(base / f"run{steps}")
    summary = train_and_evaluate(run_cfg(steps), workdir)
    assert summary["steps"] == steps
    out[steps] = workdir
  return out


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_training_continues_the_run_like_launch_train_would(runs, tfds_dir):
  c = validate_serve(serve_cfg(runs[3]))
  sources, spec = open_dataset(c.dataset, tfds_dir)
  model = get_model(c.model, spec.num_classes)
  tx, _ = make_optimizer(c.optimizer, c.steps)
  initial = restore_train_state(runs[3], model, tx, c.seed, spec.image_shape)
  assert int(initial.step) == 3
  published = []
  tr = ChunkTrainer(c, model, spec, sources["train"], None, jax.devices()[0],
                    published.append, initial=initial)
  try:
    assert tr.opt_steps == 3 and tr.published_version == 3 and tr.weights().version == 3
    saved = Checkpointer(os.path.join(runs[3], "checkpoints")).read(3)
    for a, b in zip(leaves(tr.weights().params), leaves(saved["params"])):
      np.testing.assert_array_equal(a, b)
    while tr.opt_steps < 5:           # 16-image steps of 4 micro-batches of 4
      tr.run_chunk()
    assert tr.finished and not tr.active and tr.failure is None
    assert [w.version for w in published] == [4, 5]
    # the same as launch.train's 5-step run (its batches 3 and 4, its Adam moments)
    ref = Checkpointer(os.path.join(runs[5], "checkpoints")).read(5)
    moved = max(float(np.abs(a - b).max())
                for a, b in zip(leaves(ref["params"]), leaves(saved["params"])))
    assert moved > 1e-3               # steps 4 and 5 really changed the weights
    for a, b in zip(leaves(tr.state.params), leaves(ref["params"])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    for a, b in zip(leaves(tr.state.opt_state.inner_opt_state), leaves(ref["opt_state"])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
  finally:
    tr.close()


@pytest.mark.parametrize("train", [True, False])
def test_a_server_serves_the_checkpoint_as_its_version(runs, tfds_dir, train):
  s = Server(serve_cfg(runs[3], train=train), log=lambda m: None)
  try:
    w = s.schedulers[0].weights
    assert w.version == 3
    assert parse_metrics(s.metrics.render().decode())["coltrain_model_version"] == 3
    saved = Checkpointer(os.path.join(runs[3], "checkpoints")).read(3)
    for a, b in zip(leaves(w.params), leaves(saved["params"])):
      np.testing.assert_array_equal(a, b)
    x = 255 * np.random.default_rng(0).random((3,) + s.image_shape, np.float32)
    predict = make_predict_step(get_model(s.config.model, s.spec.num_classes), s.spec)
    want = jax.jit(predict)(saved["params"], saved["model_state"], x)
    np.testing.assert_allclose(s.schedulers[0].predictor(w, x), np.asarray(want),
                               rtol=1e-5, atol=1e-5)
    if train:
      assert s.trainer.opt_steps == 3 and s.trainer.active
  finally:
    s.stop()


def test_bad_init_from_is_a_clear_config_error(runs, tfds_dir, tmp_path):
  with pytest.raises(ConfigError, match="no such directory"):
    Server(serve_cfg(str(tmp_path / "missing")), log=lambda m: None)
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ConfigError, match="no checkpoint in"):
    Server(serve_cfg(str(tmp_path / "empty")), log=lambda m: None)
  c = serve_cfg(runs[3])
  c.model = "lenet"                   # the run trained the MLP
  with pytest.raises(ConfigError, match="does not fit this config's model"):
    Server(c, log=lambda m: None)
  assert sorted(os.listdir(os.path.join(runs[3], "checkpoints"))) == ["3"]  # untouched
