"""The C++ datapath (backend="hw") against jnp.dot and the pure-JAX exact datapath.

  python -m launch.bench_hw [--size 512] [--repeats 30] [--out bench_hw.json]

Times, as medians of round-robin repeats in one process (so load changes hit every
candidate alike), the exact bfp8 (block 64) GEMM at size^3 on:
  * backend "hw", for each GEMM kernel this CPU can run (avx512 = AVX-512 VNNI int16
    multiply-add, avx2 = vpmaddwd; chosen at run time, forced with COLTRAIN_HW_KERNEL);
  * backend "jax" (the lax.scan formulation of contract §5);
  * the baseline jnp.dot in float32 (precision HIGHEST),
and reports each as a ratio to jnp.dot. Run twice: multi-threaded (XLA's default thread
pool for jnp.dot, XLA's intra-op pool for the plugin) and single-threaded (a child
process with XLA's Eigen threading off, NPROC=1 and COLTRAIN_HW_THREADS=1). Also checks
that every candidate returns the same bits as the JAX exact datapath.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SINGLE_THREAD_ENV = {"COLTRAIN_HW_THREADS": "1", "NPROC": "1",
                     "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}


def measure(size: int, repeats: int) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from coltrain.numerics import hw, matmul
  from launch.bench_numerics import _median_seconds

  ka, kb = jax.random.split(jax.random.PRNGKey(0))
  a = jax.random.normal(ka, (size, size), jnp.float32)
  b = jax.random.normal(kb, (size, size), jnp.float32)
  fmt = "bfp8_b64"
  fns = {
      "jnp_dot": jax.jit(lambda x, y: jnp.dot(x, y, precision=jax.lax.Precision.HIGHEST)),
      "jax_exact": jax.jit(lambda x, y: matmul(x, y, lhs=fmt, rhs=fmt, datapath="exact")),
      "hw": jax.jit(lambda x, y: matmul(x, y, lhs=fmt, rhs=fmt, datapath="exact",
                                        backend="hw")),
  }
  want = np.asarray(fns["jax_exact"](a, b)).view(np.uint32)
  native = hw.cpu_kernel()
  kernels = ["avx512", "avx2"] if native == "avx512" else [native]
  times, identical = {}, {}
  for kernel in kernels:  # the kernel is read from the environment at every call
    os.environ["COLTRAIN_HW_KERNEL"] = kernel
    t = _median_seconds(fns, a, b, repeats=repeats)
    times[f"hw_{kernel}"] = t["hw"]
    times["jnp_dot"] = min(times.get("jnp_dot", t["jnp_dot"]), t["jnp_dot"])
    times["jax_exact"] = min(times.get("jax_exact", t["jax_exact"]), t["jax_exact"])
    identical[f"hw_{kernel}"] = bool(np.array_equal(
        np.asarray(fns["hw"](a, b)).view(np.uint32), want))
  os.environ.pop("COLTRAIN_HW_KERNEL", None)
  out = {"shape": [size] * 3, "format": fmt, "native_kernel": native,
         "ms": {k: 1e3 * v for k, v in times.items()},
         "over_jnp_dot": {k: v / times["jnp_dot"] for k, v in times.items()},
         "bit_identical_to_jax_exact": identical}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=512)
  p.add_argument("--repeats", type=int, default=30)
  p.add_argument("--out", default="bench_hw.json")
  p.add_argument("--single_thread_child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.single_thread_child:
    print(json.dumps(measure(args.size, args.repeats)))
    return 0
  results = {"cpu_count": os.cpu_count(), "multi_thread": measure(args.size, args.repeats)}
  print("multi-thread:", json.dumps(results["multi_thread"], indent=1), flush=True)
  child = subprocess.run(
      [sys.executable, "-m", "launch.bench_hw", "--single_thread_child",
       "--size", str(args.size), "--repeats", str(args.repeats)],
      env=dict(os.environ, **SINGLE_THREAD_ENV), capture_output=True, text=True, check=True)
  results["single_thread"] = json.loads(child.stdout.strip().splitlines()[-1])
  results["single_thread"]["env"] = SINGLE_THREAD_ENV
  print("single-thread:", json.dumps(results["single_thread"], indent=1), flush=True)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print(f"wrote {args.out}", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
