"""Numerics benchmarks, as ratios against a baseline measured in the same run.

  python -m launch.bench_numerics [--quick] [--out bench_numerics.json]

Measures (medians over repeats, jitted, after warm-up):
  * exact HBFP matmul (contract §5, bfp8 block 64) at 512x512x512 vs jnp.dot float32;
  * the fake-quant matmul at the same size vs jnp.dot float32;
  * quantization throughput in GB/s of float32 input (bfp8_b64 nearest/stochastic,
    mxfp8_e4m3), 16M elements;
  * train steps/s of the default config under policy fp32 vs hbfp8_16 (fake datapath),
    from summary.json's `train_steps_per_second` of two short runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time


def _median_seconds(fn, *args, repeats: int, warmup: int = 2) -> float:
  import jax
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


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
  t_dot = _median_seconds(dot, a, b, repeats=repeats)
  t_exact = _median_seconds(exact, a, b, repeats=repeats)
  t_fake = _median_seconds(fake, a, b, repeats=repeats)
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
  out = {"elements": n}
  for name, fn in cases.items():
    out[f"{name}_GBps"] = x.nbytes / _median_seconds(fn, x, repeats=repeats) / 1e9
  copy = jax.jit(lambda v: v * 1.0 + 0.0)
  out["elementwise_baseline_GBps"] = x.nbytes / _median_seconds(copy, x, repeats=repeats) / 1e9
  return out


def bench_train_step(steps: int) -> dict:
  from configs.default import get_config
  from coltrain.train import train_and_evaluate
  out = {}
  for policy in ("fp32", "hbfp8_16"):
    config = get_config()
    config.steps = steps
    config.eval_every = 0
    config.checkpoint_every = 0
    config.numerics.policy = policy
    with tempfile.TemporaryDirectory() as workdir:
      summary = train_and_evaluate(config, workdir)
    out[f"{policy}_train_steps_per_second"] = summary["train_steps_per_second"]
  out["hbfp8_16_step_time_over_fp32"] = (out["fp32_train_steps_per_second"] /
                                         out["hbfp8_16_train_steps_per_second"])
  return out


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
    results["train_step"] = bench_train_step(150 if args.quick else 400)
    print(json.dumps(results["train_step"], indent=1), flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
