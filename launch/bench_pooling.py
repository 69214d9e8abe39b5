"""LeNet's training gradient with its pooling (`max_pool_2x2`) against flax's max pool.

  python -m launch.bench_pooling [--batches 1,8,64] [--repeats 300] [--cpu N]
      [--out bench_pooling.json]

`coltrain.models.lenet.max_pool_2x2` computes LeNet's 2x2 max pooling as a max over a
reshape, because the gradient of `nn.max_pool` (`select_and_scatter_add`) is slow on
XLA's CPU backend. This benchmark times the jitted gradient of LeNet's cross-entropy
(fp32, the MNIST shape) with each pooling, per batch size: both compiled in one process,
timed round-robin (one call of each per round, so that the machine's slow spells hit
both alike), on one core (`--cpu`, default the last; XLA on the calling thread, as
`launch.serve` runs a one-core device), medians in microseconds and the ratio
max_pool_2x2 / nn.max_pool. Before timing it checks that both give bit-identical
gradients on the (random, tie-free) batch.
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


def bench(batches: list[int], repeats: int) -> list[dict]:
  """Per batch size: the median gradient time of each pooling (us) and their ratio."""
  import jax
  import numpy as np
  import optax
  from coltrain.models.lenet import LeNet, flax_max_pool_2x2, max_pool_2x2

  models = {"max_pool_2x2": LeNet(10, pool=max_pool_2x2),
            "nn_max_pool": LeNet(10, pool=flax_max_pool_2x2)}
  params = models["max_pool_2x2"].init(jax.random.PRNGKey(0), np.zeros((1, 28, 28, 1)))

  def grad_fn(model):
    def loss(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    return jax.jit(jax.grad(loss))

  grads = {name: grad_fn(m) for name, m in models.items()}
  rng = np.random.default_rng(0)
  rows = []
  for b in batches:
    x = rng.random((b, 28, 28, 1), dtype=np.float32)
    y = rng.integers(0, 10, b).astype(np.int32)
    ours, ref = (jax.tree.leaves(grads[n](params, x, y)) for n in models)
    identical = all(np.array_equal(np.asarray(a), np.asarray(r)) for a, r in zip(ours, ref))
    if not identical:
      raise AssertionError(f"batch {b}: the two poolings gave different gradients")
    t = _median_seconds(grads, params, x, y, repeats=repeats, warmup=10)
    rows.append({"batch": b, "max_pool_2x2_us": 1e6 * t["max_pool_2x2"],
                 "nn_max_pool_us": 1e6 * t["nn_max_pool"],
                 "ratio": t["max_pool_2x2"] / t["nn_max_pool"],
                 "gradients_identical": identical})
  return rows


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
  p.add_argument("--repeats", type=int, default=300, help="timed rounds per batch size")
  p.add_argument("--cpu", type=int, default=None, help="core to run on (default: the last)")
  p.add_argument("--out", default="bench_pooling.json")
  a = p.parse_args(argv)
  try:
    batches = [int(v) for v in a.batches.split(",")]
  except ValueError:
    p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
  if any(b < 1 for b in batches) or a.repeats < 1:
    p.error("batch sizes and --repeats must be >= 1")
  try:
    cpu = pin_benchmark_cpu(a.cpu)   # before JAX starts: its threads inherit it
  except ValueError as e:
    p.error(str(e))
  import jax
  rows = bench(batches, a.repeats)
  result = {"jax": jax.__version__, "device": str(jax.devices()[0]), "cpu": cpu,
            "repeats": a.repeats, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "rows": rows}
  print("| batch | max_pool_2x2 (us) | nn.max_pool (us) | ratio |")
  print("| --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['batch']} | {r['max_pool_2x2_us']:,.0f} | {r['nn_max_pool_us']:,.0f} | "
          f"{r['ratio']:.3f} |")
  with open(a.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {a.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
