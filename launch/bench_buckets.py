"""What padding a batch to its bucket costs: the served model's predict per batch size.

  python -m launch.bench_buckets [--max_batch 32] [--repeats 200] [--cpu N]
      [--out bench_buckets.json]

`launch.serve` runs a batch of n images padded to the smallest of its precompiled
buckets >= n (`serve.batch_buckets`). This benchmark compiles the default served model's
predict (LeNet, 28x28x1 images, 10 classes, fp32: `configs/serve.py`) for every batch
size 1..max_batch and times them round-robin (one call of each per round, so that the
machine's slow spells hit all alike) on one core (`--cpu`, default the last; XLA on the
calling thread, as `launch.serve` runs a one-core device). It reports the median time
per size (us), a least-squares fit time = fixed + per_image x n, and for each bucket
scheme (`pow2`, the powers of two, and `quarter_octave`, the default) the padding
overhead: time(bucket(n)) / time(n), its mean over n = 1..max_batch and its maximum.
(The normalization constants do not change the work, so the model runs with mean 0
and std 1.)
"""

from __future__ import annotations

import os
import sys

from coltrain.cpus import pin_benchmark_cpu, set_one_core_xla_flags

os.environ.setdefault("NPROC", "1")   # one core, as `launch.serve` with one device core
set_one_core_xla_flags()

import argparse  # noqa: E402
import json  # noqa: E402

from launch.bench_numerics import _median_seconds  # noqa: E402


def time_sizes(max_batch: int, repeats: int) -> dict[int, float]:
  """Median seconds of the served model's predict for every batch size 1..max_batch."""
  import jax
  import numpy as np
  from coltrain.data import DatasetSpec
  from coltrain.models import get_model
  from coltrain.train.step import make_predict_step

  spec = DatasetSpec("mnist", 10, (28, 28, 1), 1, 1, (0.0,), (1.0,))
  model = get_model("lenet", spec.num_classes)
  variables = model.init(jax.random.PRNGKey(0), np.zeros((1,) + spec.image_shape,
                                                         np.float32), train=False)
  params = variables["params"]
  state = {k: v for k, v in variables.items() if k != "params"}
  predict = jax.jit(make_predict_step(model, spec))
  rng = np.random.default_rng(0)
  fns = {}
  for n in range(1, max_batch + 1):
    x = (255 * rng.random((n,) + spec.image_shape)).astype(np.float32)
    exe = predict.lower(params, state, x).compile()
    fns[n] = lambda p, s, exe=exe, x=x: exe(p, s, x)
  t = _median_seconds(fns, params, state, repeats=repeats, warmup=10)
  return {n: t[n] for n in range(1, max_batch + 1)}


def padding_overhead(times: dict[int, float], buckets: tuple[int, ...]) -> dict:
  """time(bucket(n)) / time(n) for every n: its mean and maximum (and where)."""
  from coltrain.serve.buckets import bucket_for
  ratios = {n: times[bucket_for(n, buckets)] / times[n] for n in times}
  worst = max(ratios, key=ratios.get)
  return {"buckets": list(buckets), "mean": sum(ratios.values()) / len(ratios),
          "max": ratios[worst], "max_at": worst}


def fit_line(times: dict[int, float]) -> tuple[float, float]:
  """Least-squares (fixed, per_image) seconds of time = fixed + per_image x n."""
  import numpy as np
  n = np.array(list(times), float)
  t = np.array(list(times.values()))
  per_image, fixed = np.polyfit(n, t, 1)
  return float(fixed), float(per_image)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--max_batch", type=int, default=32, help="largest batch size (>= 2)")
  p.add_argument("--repeats", type=int, default=200, help="timed rounds")
  p.add_argument("--cpu", type=int, default=None, help="core to run on (default: the last)")
  p.add_argument("--out", default="bench_buckets.json")
  a = p.parse_args(argv)
  if a.max_batch < 2 or a.repeats < 1:
    p.error("--max_batch must be >= 2 and --repeats >= 1")
  try:
    cpu = pin_benchmark_cpu(a.cpu)   # before JAX starts: its threads inherit it
  except ValueError as e:
    p.error(str(e))
  import jax
  from coltrain.serve.buckets import buckets_up_to, quarter_octave_buckets
  times = time_sizes(a.max_batch, a.repeats)
  fixed, per_image = fit_line(times)
  schemes = {"pow2": padding_overhead(times, buckets_up_to(a.max_batch)),
             "quarter_octave": padding_overhead(times, quarter_octave_buckets(a.max_batch))}
  result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "cpu": cpu,
            "repeats": a.repeats, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "us_per_batch": {str(n): 1e6 * t for n, t in times.items()},
            "fit_us": {"fixed": 1e6 * fixed, "per_image": 1e6 * per_image},
            "schemes": schemes}
  print(f"predict: {1e6 * fixed:.0f} us + {1e6 * per_image:.1f} us per image "
        f"(least squares over n = 1..{a.max_batch})")
  print("| buckets | executables | mean time(bucket(n)) / time(n) | worst (at n) |")
  print("| --- | --- | --- | --- |")
  for name, s in schemes.items():
    print(f"| {name} | {len(s['buckets'])} | {s['mean']:.3f} | {s['max']:.3f} "
          f"({s['max_at']}) |")
  with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {a.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
