"""The serving config group and its validation (coltrain.serve.config)."""

import pytest

from coltrain.config import ConfigError
from coltrain.serve.config import (SERVE_DEFAULTS, unknown_serve_override_keys,
                                   validate_serve)


def cfg(**serve):
  from configs.serve import get_config
  c = get_config()
  for k, v in serve.items():
    if "." in k:
      group, key = k.split(".")
      c[group][key] = v
    else:
      c.serve[k] = v
  return c


def test_default_serving_config_is_valid_and_complete():
  c = validate_serve(cfg())
  assert set(c.serve.keys()) == set(SERVE_DEFAULTS)
  assert c.model == "lenet" and c.dataset == "mnist5k"


def test_serving_an_experiment_config_keeps_its_training_part():
  from configs.default import get_config as experiment
  from configs.serve import get_config
  c = get_config("default")
  assert c.serve.to_dict() == SERVE_DEFAULTS
  del c.serve
  assert c.to_dict() == experiment().to_dict()   # what launch.train ran: init_from fits
  assert get_config().optimizer.schedule == "constant"   # the long-running default
  with pytest.raises(ValueError, match="no experiment config configs/nosuch.py"):
    get_config("nosuch")


def test_missing_serve_keys_take_defaults():
  from configs.default import get_config
  c = validate_serve(get_config())
  assert dict(c.serve) == SERVE_DEFAULTS


@pytest.mark.parametrize("kw,needle", [
    (dict(max_batch_size=24), "power of two"),
    (dict(max_batch_size=0), "power of two"),
    (dict(batch_buckets="1,2,64"), r"'serve.batch_buckets' '1,2,64': bucket 64 is outside"),
    (dict(batch_buckets="4,four"), "'serve.batch_buckets'.*not an integer"),
    (dict(slo_ms=-1.0), "slo_ms"),
    (dict(port=70000), "port"),
    (dict(replicas=0), "replicas"),
    (dict(replicas=2, train_replica=2), "train_replica"),
    (dict(micro_batch_size=5), "divisible by 'serve.micro_batch_size'"),
    (dict(chunk_steps=0), "chunk_steps"),
    (dict(chunk_overrun=1.5), "chunk_overrun"),
    (dict(chunk_overrun=-0.1), "chunk_overrun"),
    (dict(train_queue_delay_cap=1.5), "train_queue_delay_cap"),
    (dict(train_queue_delay_cap=-0.1), "train_queue_delay_cap"),
    (dict(publish_every=0), "publish_every"),
    (dict(max_queue_delay_ms=-0.5), "max_queue_delay_ms"),
    (dict(slo_msec=3.0), "did you mean 'serve.slo_ms'"),
    (dict(**{"comm.workers": 2}), "'comm.workers' must be 1"),
    (dict(**{"optimizer.name": "lion"}), "optimizer.name"),
])
def test_bad_values_are_clear_errors(kw, needle):
  with pytest.raises(ConfigError, match=needle):
    validate_serve(cfg(**kw))


def test_wrong_types_are_clear_errors():
  import ml_collections
  c = cfg()
  c.serve = ml_collections.ConfigDict({"slo_ms": "fast", "train": 1})
  with pytest.raises(ConfigError) as e:
    validate_serve(c)
  assert "'serve.slo_ms' must be float" in str(e.value)
  assert "'serve.train' must be bool" in str(e.value)


def test_all_problems_are_reported_at_once():
  with pytest.raises(ConfigError) as e:
    validate_serve(cfg(max_batch_size=3, publish_every=0))
  assert "power of two" in str(e.value) and "publish_every" in str(e.value)


def test_unknown_command_line_override_keys():
  assert unknown_serve_override_keys(["--config.serve.slo_ms=5", "--config.steps=3"]) == []
  (p,) = unknown_serve_override_keys(["--config.serve.max_batch=8"])
  assert "serve.max_batch" in p and "did you mean 'serve.max_batch_size'" in p
