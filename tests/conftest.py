"""Shared test fixtures: one TFDS data dir per session, small fast configs."""

import mmap
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


class RecordingTransport:
  """An asyncio transport stand-in that keeps what is written (`writes`, one bytes per
  call)."""

  def __init__(self):
    self.writes = []

  def write(self, data):
    self.writes.append(bytes(data))


def shared_page():
  """(memfd, its one-page mmap): a stand-in for the front end's shared counter page."""
  fd = os.memfd_create("test-incoming", 0)
  os.ftruncate(fd, mmap.PAGESIZE)
  return fd, mmap.mmap(fd, mmap.PAGESIZE)
