"""The serving config: the experiment config tree plus a `serve` group.

A serving config is a training config (`coltrain.config.base_config()`, validated by
`coltrain.config.validate`: the served model is the one being trained) with one extra
group, `serve`, holding the keys below. `validate_serve(config)` checks both parts once,
before anything starts, and raises one `ConfigError` listing every problem.
"""

from __future__ import annotations

import difflib
from typing import Any

import ml_collections

from coltrain.cpus import check_device_cpus
from coltrain.serve.buckets import parse_buckets
from coltrain.config import (ConfigError, _type_ok, base_config,
                             unknown_override_keys, validate)

SERVE_DEFAULTS: dict[str, Any] = {
    "model_name": "",           # served name ("" = the config's `model`)
    "host": "127.0.0.1",        # bind address
    "port": 0,                  # 0 = any free port (printed at start)
    "slo_ms": 0.0,              # latency objective and default deadline; 0 = auto:
                                #   5 x the standalone batch-1 median latency over
                                #   HTTP, measured at startup
    "max_queue_delay_ms": 1.0,  # dynamic batching: longest wait for a fuller batch
    "max_batch_size": 32,       # images per inference batch (a power of two)
    "batch_buckets": "",        # batch sizes compiled at start, a batch padded to the
                                #   smallest >= its images: "" = every size to 8, then
                                #   four per octave (10, 12, 14, 16, 20, ...); "pow2" =
                                #   the powers of two; or sizes "1,2,4,6,8,..."
                                #   (max_batch_size added if missing)
    "max_queue": 4096,          # queued requests per replica before shedding (hard cap)
    "margin_ms": 1.0,           # safety margin in deadline/slack predictions (HTTP, jitter)
    "shed_holdoff_ms": 250.0,   # training pause after a shed, x min(1, shed fraction / 5%)
    "late_quantile": 0.0,       # while recent responses miss the SLO, admission keeps
                                #   in reserve this quantile of how much later than
                                #   predicted they were sent (none under 0.2% missed,
                                #   all of it from 1%): admitted requests finish with
                                #   slack for what predictions cannot see (0 = off)
    "overload_headroom": 0.3,   # and this fraction of the deadline budget, none under
                                #   5% recent sheds, all of it from 25%
    "drop_late": True,          # a request whose response would be sent after its
                                #   deadline even though its batch runs now is answered
                                #   503 + Retry-After at dispatch, not computed late
                                #   (at least one request of each batch runs)
    "replicas": 1,              # scheduler threads, one per (simulated) device
    "init_from": "",            # a launch.train workdir (or its checkpoints/): serve and
                                #   keep training its latest checkpoint (weights,
                                #   optimizer, step, data position); "" = fresh from `seed`
    "train": True,              # co-located training in idle cycles
    "train_replica": 0,         # the replica whose device trains
    "micro_batch_size": 1,      # training micro-batch; batch_size / it micro-batches
                                #   accumulate into one optimizer step
    "chunk_steps": 1,           # micro-batches per training chunk (between decisions)
    "max_chunk_ms": 0.0,        # cap on the predicted chunk time (0: only the SLO slack)
    "chunk_overrun": 1.0,       # with training on, a chunk may run while a batch forms
                                #   if it starts within the batching wait and ends at
                                #   most this many chunk times past it (0..1)
    "train_queue_delay_cap": 0.3,  # with training on, the batching wait grows with the
                                #   device's load: max_queue_delay_ms / (1 - U), U its
                                #   recent inference busy fraction, up to this fraction
                                #   of the SLO (0: max_queue_delay_ms, as with training off)
    "publish_every": 10,        # publish new weights every K optimizer steps
    "request_ring": True,       # requests reach the device process through shared
                                #   memory (x86-64; elsewhere, or false: the socket)
    "device_cpus": "",          # CPU-only machines: cores reserved for the emulated
                                #   device ("1", "2-3"): XLA and the schedulers run
                                #   there, the HTTP front end on the other cores ("" =
                                #   no split; see coltrain/cpus.py)
}


def with_serve_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` (an experiment config) plus the `serve` group with its defaults."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.serve = ml_collections.ConfigDict(dict(SERVE_DEFAULTS))
  return c


def validate_serve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates the training part (`coltrain.config.validate`) and the `serve` group.

  Returns a new config with every key present; raises `ConfigError` otherwise.
  """
  train_part = ml_collections.ConfigDict(
      {k: v for k, v in config.items() if k != "serve"})
  problems: list[str] = []
  try:
    train_cfg = validate(train_part)
  except ConfigError as e:
    problems.extend(line.strip()[2:] for line in str(e).splitlines()[1:])
    train_cfg = None

  given = dict(config.serve.items()) if "serve" in config else {}
  merged = dict(SERVE_DEFAULTS)
  for key, value in given.items():
    if key not in SERVE_DEFAULTS:
      hint = difflib.get_close_matches(key, SERVE_DEFAULTS, n=1, cutoff=0.75)
      problems.append(f"unknown key 'serve.{key}'" +
                      (f" (did you mean 'serve.{hint[0]}'?)" if hint else ""))
    elif not _type_ok(value, SERVE_DEFAULTS[key]):
      problems.append(f"'serve.{key}' must be {type(SERVE_DEFAULTS[key]).__name__}, "
                      f"got {value!r}")
    else:
      merged[key] = value
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))

  s = merged

  def need(cond: bool, msg: str):
    if not cond:
      problems.append(msg)

  need(0 <= s["port"] <= 65535, f"'serve.port' must be in [0, 65535], got {s['port']}")
  need(bool(s["host"]), "'serve.host' must be an address")
  need(s["slo_ms"] >= 0, f"'serve.slo_ms' must be >= 0 (0 = auto), got {s['slo_ms']}")
  need(s["max_queue_delay_ms"] >= 0,
       f"'serve.max_queue_delay_ms' must be >= 0, got {s['max_queue_delay_ms']}")
  b = s["max_batch_size"]
  need(b >= 1 and (b & (b - 1)) == 0,
       f"'serve.max_batch_size' must be a power of two >= 1, got {b}")
  if b >= 1:
    try:
      parse_buckets(s["batch_buckets"], b)
    except ValueError as e:
      problems.append(f"'serve.batch_buckets' {s['batch_buckets']!r}: {e}")
  need(s["max_queue"] >= 1, f"'serve.max_queue' must be >= 1, got {s['max_queue']}")
  need(s["margin_ms"] >= 0, f"'serve.margin_ms' must be >= 0, got {s['margin_ms']}")
  need(s["shed_holdoff_ms"] >= 0,
       f"'serve.shed_holdoff_ms' must be >= 0, got {s['shed_holdoff_ms']}")
  need(0 <= s["overload_headroom"] < 1,
       f"'serve.overload_headroom' must be in [0, 1), got {s['overload_headroom']}")
  need(0 <= s["late_quantile"] < 1,
       f"'serve.late_quantile' must be in [0, 1) (0 = off), got {s['late_quantile']}")
  need(s["replicas"] >= 1, f"'serve.replicas' must be >= 1, got {s['replicas']}")
  need(0 <= s["train_replica"] < max(s["replicas"], 1),
       f"'serve.train_replica' must be in [0, replicas={s['replicas']}), "
       f"got {s['train_replica']}")
  m = s["micro_batch_size"]
  need(m >= 1, f"'serve.micro_batch_size' must be >= 1, got {m}")
  if train_cfg is not None and m >= 1:
    need(train_cfg.batch_size % m == 0,
         f"'batch_size' {train_cfg.batch_size} must be divisible by "
         f"'serve.micro_batch_size' {m} (micro-batches accumulate into one step)")
    need(train_cfg.comm.workers == 1,
         f"serving trains one worker; 'comm.workers' must be 1, got {train_cfg.comm.workers}")
  need(s["chunk_steps"] >= 1, f"'serve.chunk_steps' must be >= 1, got {s['chunk_steps']}")
  need(0 <= s["chunk_overrun"] <= 1,
       f"'serve.chunk_overrun' must be in [0, 1], got {s['chunk_overrun']}")
  need(0 <= s["train_queue_delay_cap"] <= 1,
       f"'serve.train_queue_delay_cap' must be in [0, 1], got {s['train_queue_delay_cap']}")
  need(s["max_chunk_ms"] >= 0, f"'serve.max_chunk_ms' must be >= 0, got {s['max_chunk_ms']}")
  need(s["publish_every"] >= 1,
       f"'serve.publish_every' must be >= 1, got {s['publish_every']}")
  cpu_problem = check_device_cpus(s["device_cpus"])
  need(cpu_problem is None, cpu_problem or "")
  if problems:
    raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
  out = train_cfg
  out.serve = ml_collections.ConfigDict(s)
  return out


def unknown_serve_override_keys(argv: list[str], flag: str = "config") -> list[str]:
  """Problems with `--config.KEY=VALUE` overrides naming keys outside the serving schema."""
  return unknown_override_keys(argv, flag, tuple(f"serve.{k}" for k in SERVE_DEFAULTS))
