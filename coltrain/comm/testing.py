"""A toy decentralized problem and a driver, for tests and quick studies.

`simulate(comm_cfg, ...)` trains W workers on heterogeneous least squares with any
algorithm, all inside one jitted `shard_map` step per iteration, and returns numpy
histories; `run_in_subprocess(code, devices)` runs Python code in a fresh interpreter
with D simulated CPU devices (and the thread pool XLA's CPU collectives need).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from coltrain.comm import algorithms as algs
from coltrain.comm import stacked
from coltrain.comm import workers as wk
from coltrain.comm.config import resolve

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def linreg_problem(num_workers: int, *, dim: int = 16, outputs: int = 4, samples: int = 32,
                   heterogeneity: float = 1.0, seed: int = 0):
  """Worker i: f_i(K, c) = 0.5 * mean_n ||x_n K + c - y_n||^2 on its own data, with
  y = x K_i* + c_i* + noise and K_i* = K* + heterogeneity * delta_i.

  Returns (X float32 (W, samples, dim), Y float32 (W, samples, outputs), optimum) where
  optimum = (K, c) minimising the average of the f_i (float64 least squares)."""
  rng = np.random.default_rng(seed)
  k_star = rng.normal(size=(dim, outputs))
  c_star = rng.normal(size=(outputs,))
  xs = rng.normal(size=(num_workers, samples, dim))
  ys = []
  for i in range(num_workers):
    k_i = k_star + heterogeneity * rng.normal(size=k_star.shape)
    c_i = c_star + heterogeneity * rng.normal(size=c_star.shape)
    ys.append(xs[i] @ k_i + c_i + 0.1 * rng.normal(size=(samples, outputs)))
  ys = np.stack(ys)
  a = np.concatenate([xs.reshape(-1, dim), np.ones((num_workers * samples, 1))], 1)
  sol, *_ = np.linalg.lstsq(a, ys.reshape(-1, outputs), rcond=None)
  return (xs.astype(np.float32), ys.astype(np.float32),
          {"kernel": sol[:dim], "bias": sol[dim]})


def global_loss(params: Mapping[str, np.ndarray], xs: np.ndarray, ys: np.ndarray) -> float:
  """(1/W) sum_i f_i at ONE set of params (float64)."""
  pred = xs.astype(np.float64) @ np.asarray(params["kernel"], np.float64) + np.asarray(
      params["bias"], np.float64)
  return float(0.5 * np.mean(np.sum((pred - ys) ** 2, -1)))


def simulate(comm_cfg: Mapping, *, steps: int = 100, learning_rate: float = 0.05,
             num_devices: Optional[int] = None, seed: int = 0, problem_seed: int = 0,
             heterogeneity: float = 1.0, dim: int = 16, outputs: int = 4,
             schedule: str = "cosine") -> dict[str, Any]:
  """Trains comm_cfg's algorithm on `linreg_problem` with plain SGD (learning rate
  `constant` or `cosine`-decayed to 0 over `steps`), full-batch gradients and identical
  zero init. Returns numpy arrays:
    params (final stacked), loss (steps,) of the average model, optimum_loss,
    consensus (steps,), bytes (steps, W)."""
  cfg = resolve(comm_cfg)
  w = cfg["workers"]
  xs, ys, opt = linreg_problem(w, dim=dim, outputs=outputs, heterogeneity=heterogeneity,
                               seed=problem_seed)
  mesh = wk.make_mesh(num_devices)
  lr = (optax.cosine_decay_schedule(learning_rate, steps) if schedule == "cosine"
        else learning_rate)
  tx = optax.sgd(lr)
  alg = algs.make_algorithm(cfg, tx=tx, seed=seed)
  zero = {"kernel": jnp.zeros((dim, outputs), jnp.float32),
          "bias": jnp.zeros((outputs,), jnp.float32)}
  params, opt_state, model_state, comm_state = stacked.init_workers(zero, {}, tx, alg, mesh)
  data = wk.shard((jnp.asarray(xs), jnp.asarray(ys)), mesh)

  def local_grad(p, model_state, batch, key):
    def loss_fn(p):
      x, y = batch
      return 0.5 * jnp.mean(jnp.sum(jnp.square(x @ p["kernel"] + p["bias"] - y), -1))
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return grads, model_state, {"loss": loss}

  f = jax.jit(stacked.make_stacked_step(local_grad, alg, mesh))
  base = wk.replicate(jax.random.PRNGKey(seed), mesh)
  losses, consensus, nbytes = [], [], []
  for t in range(steps):
    step = wk.replicate(jnp.int32(t), mesh)
    params, opt_state, model_state, comm_state, stats = f(
        params, opt_state, model_state, comm_state, data, step, base)
    host = jax.device_get(params)
    losses.append(global_loss(jax.tree.map(lambda v: v.mean(0), host), xs, ys))
    consensus.append(float(np.asarray(stats["consensus_distance"])[0]))
    nbytes.append(np.asarray(stats["bytes_sent"]))
  return {"params": jax.device_get(params), "loss": np.asarray(losses),
          "optimum_loss": global_loss(opt, xs, ys), "consensus": np.asarray(consensus),
          "bytes": np.stack(nbytes)}


def subprocess_env(num_devices: int) -> dict[str, str]:
  """Environment for a child JAX process with `num_devices` CPU devices.

  XLA's CPU collectives deadlock unless its thread pool is larger than the number of
  local devices, so NPROC is set to max(16, 2 * devices)."""
  env = dict(os.environ)
  env["JAX_NUM_CPU_DEVICES"] = str(num_devices)
  env["JAX_PLATFORMS"] = "cpu"
  env["NPROC"] = str(max(16, 2 * num_devices))
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return env


def run_in_subprocess(code: str, num_devices: int, timeout: float = 180.0) -> str:
  """Runs `code` with `python -c` on `num_devices` CPU devices; returns stdout.

  Killed (SIGKILL) after `timeout` seconds; raises RuntimeError with the child's output
  on a non-zero exit or a timeout."""
  proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                          env=subprocess_env(num_devices), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
    raise RuntimeError(f"subprocess on {num_devices} devices timed out after {timeout}s "
                       f"(killed)\nstdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
  if proc.returncode != 0:
    raise RuntimeError(f"subprocess on {num_devices} devices failed "
                       f"(exit {proc.returncode})\nstdout:\n{out[-4000:]}\n"
                       f"stderr:\n{err[-4000:]}")
  return out


# --------------------------------------------------------------------------------------
# Self-checks of the worker primitives and gossip on the current devices
# --------------------------------------------------------------------------------------

def _perms(w: int, rng: np.random.Generator) -> list[np.ndarray]:
  base = [np.arange(w), (np.arange(w) + 1) % w, (np.arange(w) - 1) % w, np.arange(w)[::-1],
          (np.arange(w) + w // 2) % w]
  return base + [rng.permutation(w) for _ in range(3)]


def check_worker_primitives(widths=(1, 4, 8, 16), seed: int = 0) -> list[str]:
  """Checks permute / pull / mean / gather / worker_index against numpy for every W in
  `widths` divisible by the device count, under check_vma=True (and, for the largest
  W, also check_vma=False). Returns the failures (empty: all good)."""
  d = len(jax.devices())
  mesh = wk.make_mesh()
  fails: list[str] = []
  for w in widths:
    if w % d:
      continue
    rng = np.random.default_rng(seed + w)
    tree = {"a": rng.normal(size=(w, 3, 5)).astype(np.float32),
            "b": rng.integers(-100, 100, size=(w,)).astype(np.int32),
            "c": (rng.normal(size=(w, 7)) * 10.0**rng.integers(-20, 20, size=(w, 7))
                  ).astype(np.float32)}
    x = wk.shard(jax.tree.map(jnp.asarray, tree), mesh)
    perms = _perms(w, rng)
    # check_vma=False (no varying-axis type checks) once, for the largest W
    for check_vma in ((True, False) if w == max(widths) else (True,)):
      # one compiled function per W: every permutation at once
      f = jax.jit(wk.run_per_worker(
          lambda t: [(wk.permute(t, p), wk.pull(t, p)) for p in perms], mesh,
          check_vma=check_vma))
      for perm, (got_perm, got_pull) in zip(perms, jax.device_get(f(x))):
        for k, v in tree.items():
          ref = np.empty_like(v)
          ref[perm] = v
          if not np.array_equal(got_perm[k], ref):
            fails.append(f"permute W={w} D={d} perm={perm.tolist()} leaf {k}")
          if not np.array_equal(got_pull[k], v[perm]):
            fails.append(f"pull W={w} D={d} src={perm.tolist()} leaf {k}")
      fl = {k: v for k, v in tree.items() if v.dtype == np.float32}
      xf = wk.shard(jax.tree.map(jnp.asarray, fl), mesh)
      g = jax.jit(wk.run_per_worker(
          lambda t: (wk.mean(t), wk.mean(t, exact=True), wk.gather(t),
                     wk.worker_index(jax.tree.leaves(t)[0].shape[0])), mesh,
          check_vma=check_vma))
      m, me, ga, idx = jax.device_get(g(xf))
      if not np.array_equal(idx, np.arange(w)):
        fails.append(f"worker_index W={w} D={d}: {idx}")
      for k, v in fl.items():
        seq = v[0].copy()
        for i in range(1, w):
          seq = seq + v[i]
        seq = seq / np.float32(w)
        if not np.array_equal(me[k], np.broadcast_to(seq, v.shape)):
          fails.append(f"mean(exact) W={w} D={d} leaf {k} not bitwise the sequential sum")
        ref = v.astype(np.float64).mean(0)
        scale = np.abs(v).astype(np.float64).max(0) + 1e-30
        if not np.all(np.abs(m[k] - ref) <= 4 * w * 2.0**-24 * scale):
          fails.append(f"mean W={w} D={d} leaf {k} off by more than 4 W ulp(max|x|)")
        if not np.array_equal(ga[k], np.broadcast_to(v[None], (w,) + v.shape)):
          fails.append(f"gather W={w} D={d} leaf {k}")
  return fails


def gossip_outputs(widths=(8, 16), seed: int = 0, steps: int = 3) -> dict[str, np.ndarray]:
  """Runs `steps` gossip steps of every topology (time-varying ones through `lax.switch`
  from step 0) on random data; returns {f"{topology}_{W}": float32 (W, 6, 5)} for the
  widths divisible by the device count."""
  from coltrain.comm import topology as topo
  mesh = wk.make_mesh()
  d = len(jax.devices())
  out = {}
  for w in widths:
    if w % d:
      continue
    rng = np.random.default_rng(seed + w)
    x0 = rng.normal(size=(w, 6, 5)).astype(np.float32)
    tops = [topo.make_topology(n, w) for n in topo.TOPOLOGIES if not (n == "torus" and w < 4)]

    def run(x):
      res = []
      for t in tops:
        y = x
        for s in range(steps):
          y = t.gossip(y, jnp.int32(s))
        res.append(y)
      return res

    f = jax.jit(wk.run_per_worker(run, mesh))
    for t, y in zip(tops, f(wk.shard(jnp.asarray(x0), mesh))):
      out[f"{t.name}_{w}"] = np.asarray(y)
  return out


def simulate_many(cfgs: list[Mapping], path: str, **kw) -> None:
  """`simulate` each config (keyword arguments as for `simulate`) and save the final
  params, losses, consensus distances and bytes to the npz file `path` under keys
  f"{i}/{name}"."""
  res = {}
  for i, c in enumerate(cfgs):
    r = simulate(c, **kw)
    res[f"{i}/kernel"] = r["params"]["kernel"]
    res[f"{i}/bias"] = r["params"]["bias"]
    res[f"{i}/loss"] = r["loss"]
    res[f"{i}/consensus"] = r["consensus"]
    res[f"{i}/bytes"] = r["bytes"]
  np.savez(path, **res)
