"""The one config tree: schema, defaults and validation.

`base_config()` returns an `ml_collections.ConfigDict` holding every key coltrain knows,
with library defaults; experiment files in `configs/` start from it and change values.
`validate(config)` is called once, before any work starts: it rejects unknown keys,
wrong types and out-of-range values with one `ConfigError` listing every problem.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from coltrain.comm.config import COMM_DEFAULTS, validate_comm

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "warmup_cosine")


class ConfigError(ValueError):
  """The experiment config is invalid; the message lists every problem found."""


def base_config() -> ml_collections.ConfigDict:
  """Every config key with its library default (see README 'Config keys')."""
  c = ml_collections.ConfigDict()
  c.seed = 0                  # model init, data order, dropout/stochastic rounding
  c.dataset = "mnist5k"       # embedded dataset, or a TFDS name prepared in data_dir
  c.data_dir = ""             # TFDS data dir; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.model = "lenet"           # mlp | lenet | resnet20
  c.steps = 1000              # optimizer steps in the whole run
  c.batch_size = 64           # global batch (all processes and workers together)
  c.eval_batch_size = 500     # per-process evaluation batch
  c.eval_every = 0            # evaluate on the test split every N steps (0: only at the end)
  c.checkpoint_every = 500    # checkpoint every N steps (and at the end / on SIGINT/SIGTERM)
  c.keep_checkpoints = 2      # how many recent checkpoints to keep
  c.log_every = 50            # write train metrics every N steps

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "sgd"    # sgd (with momentum) | adam | adamw
  c.optimizer.learning_rate = 0.05  # peak learning rate
  c.optimizer.schedule = "warmup_cosine"  # constant | cosine | warmup_cosine
  c.optimizer.warmup_steps = 50
  c.optimizer.momentum = 0.9  # sgd
  c.optimizer.nesterov = True  # sgd
  c.optimizer.b1 = 0.9        # adam/adamw
  c.optimizer.b2 = 0.999      # adam/adamw
  c.optimizer.eps = 1e-8      # adam/adamw
  c.optimizer.weight_decay = 5e-4  # sgd/adam: L2 added to the gradient; adamw: decoupled
  c.optimizer.grad_clip_norm = 0.0  # global-norm clipping; 0 disables

  c.numerics = ml_collections.ConfigDict()
  c.numerics.policy = "fp32"  # preset (fp32, hbfp8_16, ...) or rules (coltrain.numerics.policy)
  c.numerics.datapath = "fake"  # fake (quantize-dequantize) | exact
  c.numerics.backend = "jax"  # jax | hw (a hardware plugin's custom calls; needs exact)
  c.numerics.hw_plugin = ""  # hw plugin library; "" = $COLTRAIN_HW_PLUGIN or the built-in

  c.comm = ml_collections.ConfigDict(dict(COMM_DEFAULTS))  # see coltrain.comm.config
  return c


def _flatten(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in cfg.items():
    key = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def unknown_override_keys(argv: list[str], flag: str = "config",
                          extra_keys: tuple[str, ...] = ()) -> list[str]:
  """Problems with `--config.KEY=VALUE` command-line overrides naming unknown keys (keys
  of `base_config()`, plus `extra_keys` for schemas that extend it)."""
  schema = set(_flatten(base_config())) | set(extra_keys)
  problems = []
  prefix = f"--{flag}."
  for arg in argv:
    if arg.startswith(prefix):
      key = arg[len(prefix):].split("=", 1)[0]
      if key not in schema:
        hint = difflib.get_close_matches(key, schema, n=1, cutoff=0.75)
        problems.append(f"unknown config key '{key}' in '{arg}'" +
                        (f" (did you mean '{hint[0]}'?)" if hint else ""))
  return problems


def _type_ok(value: Any, default: Any) -> bool:
  if isinstance(default, bool):
    return isinstance(value, bool)
  if isinstance(default, int):
    return isinstance(value, int) and not isinstance(value, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks `config` against the schema; returns it (with every key present) or raises.

  Keys missing from `config` take their `base_config()` defaults, so small configs stay
  small; unknown keys are an error (with a did-you-mean hint).
  """
  schema = _flatten(base_config())
  given = _flatten(config)
  problems: list[str] = []
  for key, value in given.items():
    if key not in schema:
      hint = difflib.get_close_matches(key, schema, n=1, cutoff=0.75)
      problems.append(f"unknown key '{key}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""))
    elif not _type_ok(value, schema[key]):
      problems.append(f"'{key}' must be {type(schema[key]).__name__}, got {value!r}")
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))

  merged = base_config()
  merged.update_from_flattened_dict(given)
  c = merged

  def need(cond: bool, msg: str):
    if not cond:
      problems.append(msg)

  need(c.steps > 0, f"'steps' must be > 0, got {c.steps}")
  need(c.batch_size > 0, f"'batch_size' must be > 0, got {c.batch_size}")
  need(c.eval_batch_size > 0, f"'eval_batch_size' must be > 0, got {c.eval_batch_size}")
  for key in ("eval_every", "checkpoint_every", "log_every"):
    need(c[key] >= 0, f"'{key}' must be >= 0, got {c[key]}")
  need(c.keep_checkpoints >= 1, f"'keep_checkpoints' must be >= 1, got {c.keep_checkpoints}")
  need(bool(c.dataset), "'dataset' must name a dataset")

  from coltrain.models import MODELS  # local import keeps this module light
  need(c.model in MODELS, f"'model' must be one of {sorted(MODELS)}, got '{c.model}'")

  o = c.optimizer
  need(o.name in OPTIMIZERS, f"'optimizer.name' must be one of {OPTIMIZERS}, got '{o.name}'")
  need(o.schedule in SCHEDULES,
       f"'optimizer.schedule' must be one of {SCHEDULES}, got '{o.schedule}'")
  need(o.learning_rate > 0, f"'optimizer.learning_rate' must be > 0, got {o.learning_rate}")
  need(0 <= o.warmup_steps < c.steps or o.schedule != "warmup_cosine",
       f"'optimizer.warmup_steps' must be in [0, steps), got {o.warmup_steps}")
  need(0 <= o.momentum < 1, f"'optimizer.momentum' must be in [0, 1), got {o.momentum}")
  need(0 <= o.b1 < 1 and 0 <= o.b2 < 1, "'optimizer.b1' and 'optimizer.b2' must be in [0, 1)")
  need(o.eps > 0, f"'optimizer.eps' must be > 0, got {o.eps}")
  need(o.weight_decay >= 0, f"'optimizer.weight_decay' must be >= 0, got {o.weight_decay}")
  need(o.grad_clip_norm >= 0, f"'optimizer.grad_clip_norm' must be >= 0, got {o.grad_clip_norm}")

  need(c.numerics.datapath in ("fake", "exact"),
       f"'numerics.datapath' must be 'fake' or 'exact', got '{c.numerics.datapath}'")
  need(c.numerics.backend in ("jax", "hw"),
       f"'numerics.backend' must be 'jax' or 'hw', got '{c.numerics.backend}'")
  hw_ok = True
  if c.numerics.backend == "hw":
    hw_ok = _check_hw_backend(c, problems)
  if (c.numerics.datapath in ("fake", "exact") and c.numerics.backend in ("jax", "hw")
      and hw_ok):
    from coltrain.numerics.policy import make_policy
    try:
      make_policy(c.numerics.policy, datapath=c.numerics.datapath, backend=c.numerics.backend,
                  hw_plugin=c.numerics.hw_plugin)
    except ValueError as e:
      problems.append(f"'numerics.policy': {e}")
  problems.extend(validate_comm(c.comm))
  need(c.comm.workers < 1 or c.batch_size % c.comm.workers == 0,
       f"'batch_size' {c.batch_size} must be divisible by 'comm.workers' {c.comm.workers}")

  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
  return c


def _check_hw_backend(c: ml_collections.ConfigDict, problems: list[str]) -> bool:
  """numerics.backend == "hw": the datapath must be exact and the plugin must load and do
  what the comm compressor needs. Appends problems; returns True if the plugin loaded."""
  if c.numerics.datapath != "exact":
    problems.append("'numerics.backend' 'hw' runs the exact datapath (the plugin's custom "
                    "calls); set 'numerics.datapath' to 'exact'")
  from coltrain.numerics.hw.plugin import HwPluginError, load_plugin
  try:
    load_plugin(c.numerics.hw_plugin or None)
  except HwPluginError as e:
    problems.append(f"'numerics.hw_plugin': {e}")
    return False
  from coltrain.comm.compressors import check_compressor_backend, is_bfp_name
  from coltrain.numerics.formats import parse_format
  name = c.comm.compressor
  try:
    if name == "top_k":
      check_compressor_backend("hw", c.numerics.hw_plugin, "top_k")
    elif is_bfp_name(name):
      check_compressor_backend("hw", c.numerics.hw_plugin, "bfp", parse_format(name))
  except ValueError as e:
    problems.append(f"'comm.compressor' on the hw backend: {e}")
  return True
