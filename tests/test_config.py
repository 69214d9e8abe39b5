"""Config schema and validation, in the library and through the CLI."""

import pytest

from coltrain.config import ConfigError, base_config, validate
from tests.conftest import run_train_cli


def test_default_config_is_valid():
  from configs.default import get_config
  c = validate(get_config())
  assert c.numerics.policy == "fp32"
  assert c.comm.workers == 1
  assert c.dataset == "mnist5k"


def test_missing_keys_take_defaults():
  import ml_collections
  c = validate(ml_collections.ConfigDict({"steps": 700}))
  assert c.steps == 700
  assert c.optimizer.name == base_config().optimizer.name


def test_unknown_key_suggests_the_right_one():
  c = base_config()
  c.optimizer.learnig_rate = 0.1
  with pytest.raises(ConfigError, match=r"unknown key 'optimizer.learnig_rate'.*did you mean "
                     r"'optimizer.learning_rate'"):
    validate(c)


@pytest.mark.parametrize("key,value,match", [
    ("steps", 0, "'steps' must be > 0"),
    ("batch_size", -4, "'batch_size' must be > 0"),
    ("model", "vgg", "'model' must be one of"),
    ("optimizer.name", "lamb", "'optimizer.name' must be one of"),
    ("optimizer.schedule", "step", "'optimizer.schedule' must be one of"),
    ("optimizer.momentum", 1.5, "'optimizer.momentum' must be in"),
    ("numerics.datapath", "approx", "'numerics.datapath'"),
    ("comm.workers", 0, "'comm.workers'"),
])
def test_bad_values_are_rejected(key, value, match):
  c = base_config()
  group, _, leaf = key.rpartition(".")
  (c[group] if group else c)[leaf] = value
  with pytest.raises(ConfigError, match=match):
    validate(c)


def test_all_problems_reported_at_once():
  c = base_config()
  c.steps = -1
  c.batch_size = 0
  with pytest.raises(ConfigError) as e:
    validate(c)
  assert "'steps'" in str(e.value) and "'batch_size'" in str(e.value)


def test_wrong_type_is_rejected():
  import ml_collections
  with pytest.raises(ConfigError, match="'steps' must be int"):
    validate(ml_collections.ConfigDict({"steps": "ten"}))


@pytest.mark.parametrize("override,needle", [
    ("--config.no_such_key=1", "no_such_key"),
    ("--config.steps=ten", "steps"),
    ("--config.model=vgg", "'model' must be one of"),
])
def test_cli_rejects_bad_config_before_work(tmp_path, override, needle):
  workdir = tmp_path / "w"
  r = run_train_cli(["--config", "configs/default.py", override, "--workdir", str(workdir)],
                    timeout=120)
  assert r.returncode != 0
  assert needle in r.stderr
  assert "Traceback" not in r.stderr
  assert not (workdir / "checkpoints").exists()  # no work started
