"""Numerics benchmarks, as ratios against a baseline measured in the same run.

  python -m launch.bench_numerics [--quick] [--out bench_numerics.json]

Measures (medians over repeats, jitted, after warm-up):
  * exact HBFP matmul (contract §5, bfp8 block 64) at 512x512x512 vs jnp.dot float32;
  * the fake-quant matmul at the same size vs jnp.dot float32;
  * quantization throughput in GB/s of float32 input (bfp8_b64 nearest/stochastic,
    mxfp8_e4m3), 16M elements;
  * the default config's jitted train step (LeNet, batch 64) under policy fp32 vs
    hbfp8_16 (fake datapath), timed round-robin on the same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def _median_seconds(fns: dict, *args, repeats: int, warmup: int = 2) -> dict:
  """Median wall seconds of each jitted fn(*args), measured round-robin (one call of
  each per round) so that load changes on a shared machine hit all of them alike."""
  import jax
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn(*args))
  times: dict = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - t)
  return {name: statistics.median(t) for name, t in times.items()}


def bench_matmul(n: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from coltrain.numerics import matmul
  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (n, n), jnp.float32)
  b = jax.random.normal(kb, (n, n), jnp.float32)
  dot = jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST))
  exact = jax.jit(lambda x, y: matmul(x, y, lhs="bfp8_b64", rhs="bfp8_b64", datapath="exact"))
  fake = jax.jit(lambda x, y: matmul(x, y, lhs="bfp8_b64", rhs="bfp8_b64", datapath="fake"))
  t = _median_seconds({"dot": dot, "exact": exact, "fake": fake}, a, b, repeats=repeats)
  t_dot, t_exact, t_fake = t["dot"], t["exact"], t["fake"]
  return {"shape": [n, n, n], "jnp_dot_ms": 1e3 * t_dot, "exact_bfp8_b64_ms": 1e3 * t_exact,
          "fake_bfp8_b64_ms": 1e3 * t_fake, "exact_over_dot": t_exact / t_dot,
          "fake_over_dot": t_fake / t_dot}


def bench_quantize(n: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  from coltrain.numerics import quantize
  x = jax.random.normal(jax.random.PRNGKey(1), (n // 1024, 1024), jnp.float32)
  bits = jax.random.bits(jax.random.PRNGKey(2), x.shape, jnp.uint32)
  cases = {
      "bfp8_b64_nearest_even": jax.jit(lambda v: quantize(v, "bfp8_b64")),
      "bfp8_b64_stochastic": jax.jit(lambda v: quantize(v, "bfp8_b64", rounding="stochastic",
                                                        random_bits=bits)),
      "mxfp8_e4m3_nearest_even": jax.jit(lambda v: quantize(v, "mxfp8_e4m3")),
  }
  cases["elementwise_baseline"] = jax.jit(lambda v: v * 2.0)
  t = _median_seconds(cases, x, repeats=repeats)
  out = {"elements": n}
  out.update({f"{name}_GBps": x.nbytes / sec / 1e9 for name, sec in t.items()})
  return out


def bench_train_step(repeats: int) -> dict:
  """Jitted train step of the default config (LeNet, batch 64) under policy fp32 and
  hbfp8_16 (fake datapath), timed round-robin on the same batch and state."""
  import jax
  import jax.numpy as jnp
  from configs.default import get_config
  from coltrain.data import open_dataset, train_batches
  from coltrain.models import get_model
  from coltrain.train import create_train_state, make_optimizer, make_train_step
  from coltrain.train.loop import resolve_numerics
  config = get_config()
  sources, spec = open_dataset(config.dataset, config.data_dir or None)
  model = get_model(config.model, spec.num_classes)
  tx, schedule = make_optimizer(config.optimizer, config.steps)
  shape = (1,) + spec.image_shape
  state = create_train_state(model, tx, config.seed, shape)
  state = state.replace(step=jnp.asarray(100, jnp.int32))  # past warmup
  batch = jax.device_put(next(train_batches(sources["train"],
                                            global_batch_size=config.batch_size, seed=0)))
  steps = {}
  for policy in ("fp32", "hbfp8_16"):
    config.numerics.policy = policy
    numerics = resolve_numerics(config.numerics, model, shape)
    steps[policy] = jax.jit(make_train_step(model, tx, schedule, spec, numerics))
  t = _median_seconds(steps, state, batch, repeats=repeats)
  return {"fp32_step_ms": 1e3 * t["fp32"], "hbfp8_16_step_ms": 1e3 * t["hbfp8_16"],
          "hbfp8_16_step_time_over_fp32": t["hbfp8_16"] / t["fp32"]}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--quick", action="store_true", help="fewer repeats and steps")
  p.add_argument("--out", default="bench_numerics.json")
  p.add_argument("--skip_train", action="store_true")
  args = p.parse_args(argv)
  import jax
  repeats = 5 if args.quick else 20
  results = {"jax": jax.__version__, "device": str(jax.devices()[0]),
             "cpu_count": os.cpu_count()}
  results["matmul"] = bench_matmul(512, repeats)
  print(json.dumps(results["matmul"], indent=1), flush=True)
  results["quantize"] = bench_quantize(1 << 24, repeats)
  print(json.dumps(results["quantize"], indent=1), flush=True)
  if not args.skip_train:
    results["train_step"] = bench_train_step(repeats * 2)
    print(json.dumps(results["train_step"], indent=1), flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
