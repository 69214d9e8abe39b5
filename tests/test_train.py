"""Training end to end: the pure step, outputs, determinism, resume, signals, crashes."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from coltrain.config import ConfigError
from coltrain.data import train_batches
from coltrain.models import get_model
from coltrain.train import (Checkpointer, create_train_state, make_optimizer,
                            make_train_step, params_fingerprint, train_and_evaluate)
from tests.conftest import REPO, small_config

class StopAfter:
  """Stands in for the signal handler's Event: 'set' after `n` completed steps."""

  def __init__(self, n):
    self.n = n

  def is_set(self):
    self.n -= 1
    return self.n <= 0


TINY_CLI = ["--config", "configs/default.py", "--config.model=mlp", "--config.batch_size=32",
            "--config.eval_every=0", "--config.log_every=5"]


def test_train_step_is_a_pure_function(mnist5k):
  sources, spec = mnist5k
  c = small_config(**{"optimizer.schedule": "constant"})
  model = get_model(c.model, spec.num_classes)
  tx, schedule = make_optimizer(c.optimizer, c.steps)
  state = create_train_state(model, tx, 0, (1,) + spec.image_shape)
  batch = next(train_batches(sources["train"], global_batch_size=32, seed=0))
  step = jax.jit(make_train_step(model, tx, schedule, spec))
  s1, m1 = step(state, batch)
  s2, m2 = step(state, batch)
  assert params_fingerprint(s1.params) == params_fingerprint(s2.params)
  assert params_fingerprint(s1.params) != params_fingerprint(state.params)
  assert int(s1.step) == 1 and int(state.step) == 0
  assert set(m1) == {"loss", "accuracy", "learning_rate"}
  assert np.isfinite(m1["loss"]) and 0 <= m1["accuracy"] <= 1
  assert float(m1["learning_rate"]) == pytest.approx(float(schedule(0)))
  # A few steps on one batch reduce its loss: gradients point the right way.
  s = state
  for _ in range(5):
    s, m = step(s, batch)
  assert float(m["loss"]) < float(m1["loss"])


def test_end_to_end_on_embedded_mnist(tfds_dir, tmp_path):
  workdir = str(tmp_path / "run")
  summary = train_and_evaluate(small_config(steps=300, batch_size=64, eval_every=100,
                                            checkpoint_every=100), workdir)
  assert summary["test_accuracy"] >= 0.90, summary  # MLP, 300 steps on 4k digits
  assert summary["steps"] == 300 and not summary["interrupted"]
  assert summary["train_steps_per_second"] > 0 and summary["wall_seconds"] > 0
  with open(os.path.join(workdir, "summary.json")) as f:
    on_disk = json.load(f)
  for key in ("test_accuracy", "test_loss", "steps", "wall_seconds", "train_steps_per_second",
              "params_fingerprint"):
    assert key in on_disk
  assert on_disk["params_fingerprint"] == summary["params_fingerprint"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [l for l in lines if "loss" in l]
  test_lines = [l for l in lines if "test_accuracy" in l]
  assert [l["step"] for l in train_lines] == list(range(10, 301, 10))
  assert {"loss", "accuracy", "learning_rate", "steps_per_second"} <= set(train_lines[0])
  assert [l["step"] for l in test_lines] == [100, 200, 300]
  assert train_lines[-1]["loss"] < train_lines[0]["loss"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["steps"] == 300
  assert Checkpointer(os.path.join(workdir, "checkpoints")).latest_step() == 300
  # Rerunning a finished run reports the same summary without training again.
  again = train_and_evaluate(small_config(steps=300, batch_size=64, eval_every=100,
                                          checkpoint_every=100), workdir)
  assert again == on_disk


def test_same_seed_same_fingerprint_other_seed_differs(tfds_dir, tmp_path):
  a = train_and_evaluate(small_config(), str(tmp_path / "a"))
  b = train_and_evaluate(small_config(), str(tmp_path / "b"))
  c = train_and_evaluate(small_config(seed=1), str(tmp_path / "c"))
  assert a["params_fingerprint"] == b["params_fingerprint"]
  assert a["params_fingerprint"] != c["params_fingerprint"]


@pytest.mark.parametrize("model", ["mlp", "resnet20"])
def test_resume_matches_uninterrupted(tfds_dir, tmp_path, model):
  steps = 40 if model == "mlp" else 6
  every = 10 if model == "mlp" else 2
  base = dict(model=model, steps=steps, checkpoint_every=every, batch_size=16)
  whole = train_and_evaluate(small_config(**base), str(tmp_path / "whole"))
  part = str(tmp_path / "part")
  first = train_and_evaluate(small_config(**base), part, stop=StopAfter(steps // 2))
  assert first["steps"] == steps // 2 and first["interrupted"]
  assert "params_fingerprint" not in first
  assert not os.path.exists(os.path.join(part, "summary.json"))
  resumed = train_and_evaluate(small_config(**base), part)
  assert resumed["resumed_from_step"] == steps // 2
  assert resumed["params_fingerprint"] == whole["params_fingerprint"]


def test_resume_with_a_different_config_is_refused(tfds_dir, tmp_path):
  workdir = str(tmp_path / "w")
  train_and_evaluate(small_config(steps=10), workdir, stop=StopAfter(5))
  with pytest.raises(ConfigError, match="different config.*optimizer.learning_rate"):
    train_and_evaluate(small_config(steps=10, **{"optimizer.learning_rate": 0.5}), workdir)
  with pytest.raises(ConfigError, match="different config.*steps"):
    train_and_evaluate(small_config(steps=20), workdir)
  # Logging/eval cadence may change on resume.
  resumed = train_and_evaluate(small_config(steps=10, log_every=2), workdir)
  assert resumed["resumed_from_step"] == 5


def test_incomplete_checkpoint_is_ignored(tfds_dir, tmp_path):
  workdir = tmp_path / "w"
  done = train_and_evaluate(small_config(steps=40), str(workdir), stop=StopAfter(20))
  # What a crash during the write of checkpoint 30 leaves behind: orbax's temp dir.
  junk = workdir / "checkpoints" / "30.orbax-checkpoint-tmp"
  junk.mkdir()
  (junk / "garbage").write_bytes(os.urandom(64))
  assert Checkpointer(str(workdir / "checkpoints")).latest_step() == 20
  resumed = train_and_evaluate(small_config(steps=40), str(workdir))
  assert resumed["resumed_from_step"] == 20
  again = train_and_evaluate(small_config(steps=40), str(tmp_path / "fresh"))
  assert resumed["params_fingerprint"] == again["params_fingerprint"]
  assert done["steps"] == 20


def _start_cli(workdir, steps, extra=()):
  return subprocess.Popen(
      [sys.executable, "-m", "launch.train", *TINY_CLI, f"--config.steps={steps}",
       *extra, "--workdir", str(workdir)],
      cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_metrics(workdir, proc, timeout=180):
  deadline = time.time() + timeout
  path = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"training exited early: {proc.communicate()}")
    if os.path.exists(path) and os.path.getsize(path) > 0:
      return
    time.sleep(0.05)
  proc.kill()
  raise AssertionError("no metrics written in time")


def _finish_cli(workdir, steps, extra=()):
  p = _start_cli(workdir, steps, extra)
  out, err = p.communicate(timeout=300)
  assert p.returncode == 0, err
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f)


CLI_STEPS = 500


@pytest.fixture(scope="module")
def cli_reference(tfds_dir, tmp_path_factory):
  """Summary of an uninterrupted CLI run of CLI_STEPS steps (checkpoint cadence does not
  change the result, so every interruption test compares against this one run)."""
  return _finish_cli(tmp_path_factory.mktemp("whole"), CLI_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_checkpoint_and_resume_is_exact(cli_reference, tmp_path, signum):
  steps = CLI_STEPS
  extra = ["--config.checkpoint_every=100000"]  # only the signal writes a checkpoint
  workdir = tmp_path / "w"
  p = _start_cli(workdir, steps, extra)
  try:
    _wait_for_metrics(str(workdir), p)
    p.send_signal(signum)
    _, err = p.communicate(timeout=120)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 128 + signum, err
  assert "Traceback" not in err
  assert "checkpoint saved" in err
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  stopped_at = ckpt.latest_step()
  assert stopped_at is not None and 0 < stopped_at < steps
  assert not (workdir / "summary.json").exists()
  resumed = _finish_cli(workdir, steps, extra)
  assert resumed["resumed_from_step"] == stopped_at
  assert resumed["params_fingerprint"] == cli_reference["params_fingerprint"]


@pytest.mark.slow
def test_crash_mid_run_then_resume_is_exact(cli_reference, tmp_path):
  """SIGKILL (no handler runs) at an arbitrary moment while checkpoints are being
  written every few steps; the rerun must load a good checkpoint and end identically."""
  steps = CLI_STEPS
  extra = ["--config.checkpoint_every=3"]
  workdir = tmp_path / "w"
  p = _start_cli(workdir, steps, extra)
  try:
    _wait_for_metrics(str(workdir), p)
    time.sleep(0.5)
    p.kill()
    p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == -signal.SIGKILL
  resumed = _finish_cli(workdir, steps, extra)
  assert 0 < resumed["resumed_from_step"] < steps
  assert resumed["params_fingerprint"] == cli_reference["params_fingerprint"]
