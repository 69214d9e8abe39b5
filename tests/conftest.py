"""Shared test fixtures: one TFDS data dir per session, small fast configs."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  """A fresh TFDS data dir for the session, also exported for subprocesses."""
  path = str(tmp_path_factory.mktemp("tfds"))
  old = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = path
  yield path
  if old is None:
    os.environ.pop("TFDS_DATA_DIR", None)
  else:
    os.environ["TFDS_DATA_DIR"] = old


@pytest.fixture(scope="session")
def mnist5k(tfds_dir):
  from coltrain.data import open_dataset
  return open_dataset("mnist5k", tfds_dir)


def small_config(**overrides):
  """A config that trains the MLP for a few dozen steps (seconds on a CPU)."""
  from configs.default import get_config
  c = get_config()
  c.model = "mlp"
  c.steps = 40
  c.batch_size = 32
  c.eval_every = 0
  c.checkpoint_every = 10
  c.log_every = 10
  c.optimizer.warmup_steps = 2
  for k, v in overrides.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return c


def run_train_cli(args, timeout=300, **kw):
  """Runs `python -m launch.train ARGS` in the repo; returns the CompletedProcess."""
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout, **kw)


# Modules whose tests measure or depend on wall-clock time on a loaded machine: servers
# under open-loop load, SLO and shedding checks, the scheduler's timing, and the
# multi-process runs (their own processes already use every core). They carry the
# `serial` mark, so the README's test command runs them alone, after the other tests
# (which it spreads over the cores with pytest-xdist).
SERIAL_MODULES = frozenset({
    "test_multiprocess", "test_serve_bridge", "test_serve_cpus", "test_serve_http",
    "test_serve_init_from", "test_serve_loadgen", "test_serve_scheduler",
    "test_serve_server", "test_serve_system"})
assert all(os.path.exists(os.path.join(REPO, "tests", m + ".py")) for m in SERIAL_MODULES), \
    "tests/conftest.py: SERIAL_MODULES names a module that does not exist"


def pytest_collection_modifyitems(config, items):
  for item in items:
    if item.path.stem in SERIAL_MODULES:
      item.add_marker(pytest.mark.serial)
