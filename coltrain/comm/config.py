"""The `comm.*` config group: keys, defaults and validation of their combinations.

`COMM_DEFAULTS` are the library defaults for the schema (`coltrain.config.base_config`
puts them under `c.comm`); `validate_comm(comm_cfg)` returns every problem with a comm
group as a list of messages (empty: valid). Defaults describe plain synchronous data
parallel training, which with `workers = 1` is today's single-worker training.

| key | default | meaning |
| --- | --- | --- |
| comm.workers | 1 | W, simulated data-parallel workers (W % devices == 0) |
| comm.algorithm | allreduce | allreduce, dpsgd, choco, gradient_tracking, local_sgd, powersgd |
| comm.compressor | none | none, top_k, rand_k, qsgd, sign, powersgd, or a bfp format (bfp8_b64, bfp4, mxint8, ...): what allreduce (gradients) or choco (model differences) sends |
| comm.ratio | 0.01 | top_k / rand_k: fraction of entries kept per tensor (k = max(1, ceil(ratio n))) |
| comm.levels | 16 | qsgd: quantization levels s |
| comm.rank | 2 | powersgd (algorithm or compressor): rank r |
| comm.error_feedback | True | allreduce with a compressor: error feedback memory; the powersgd algorithm always uses it (see below); ignored by the others |
| comm.topology | ring | dpsgd, choco, gradient_tracking: ring, torus, exponential, one_peer_exponential, complete |
| comm.gamma | 1.0 | choco: consensus step size in (0, 1] (1 with compressor none = D-PSGD; use smaller values, e.g. 0.1-0.5, with aggressive compressors) |
| comm.local_steps | 1 | local_sgd: average the models every this many steps |
| comm.exact_mean | False | worker means summed in fixed worker order via all_gather: results bitwise independent of the device count (W copies per device) |
"""

from __future__ import annotations

from typing import Any

from coltrain.comm.algorithms import ALGORITHMS
from coltrain.comm.compressors import COMPRESSORS, is_bfp_name
from coltrain.comm.topology import TOPOLOGIES, _grid

COMM_DEFAULTS: dict[str, Any] = {
    "workers": 1,
    "algorithm": "allreduce",
    "compressor": "none",
    "ratio": 0.01,
    "levels": 16,
    "rank": 2,
    "error_feedback": True,
    "topology": "ring",
    "gamma": 1.0,
    "local_steps": 1,
    "exact_mean": False,
}

GOSSIP_ALGORITHMS = ("dpsgd", "choco", "gradient_tracking")


def resolve(comm_cfg: Any) -> dict[str, Any]:
  """The comm group as a plain dict with defaults filled in (accepts a dict, an
  `ml_collections.ConfigDict` of the comm group, or None)."""
  if comm_cfg is None:
    given: dict = {}
  elif hasattr(comm_cfg, "to_dict"):
    given = comm_cfg.to_dict()
  else:
    given = dict(comm_cfg)
  out = dict(COMM_DEFAULTS)
  out.update(given)
  return out


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def validate_comm(comm_cfg: Any) -> list[str]:
  """Every problem with the comm group (unknown keys, types, ranges, combinations)."""
  c = resolve(comm_cfg)
  p: list[str] = []
  for k in c:
    if k not in COMM_DEFAULTS:
      p.append(f"unknown key 'comm.{k}'")
  types = {"workers": _is_int, "levels": _is_int, "rank": _is_int, "local_steps": _is_int,
           "ratio": _is_num, "gamma": _is_num,
           "error_feedback": lambda v: isinstance(v, bool),
           "exact_mean": lambda v: isinstance(v, bool),
           "algorithm": lambda v: isinstance(v, str), "compressor": lambda v: isinstance(v, str),
           "topology": lambda v: isinstance(v, str)}
  bad = [k for k, ok in types.items() if not ok(c[k])]
  for k in bad:
    p.append(f"'comm.{k}' has the wrong type: {c[k]!r} (default {COMM_DEFAULTS[k]!r})")
  if bad:
    return p

  w, alg, cname, top = c["workers"], c["algorithm"], c["compressor"], c["topology"]
  if w < 1:
    p.append(f"'comm.workers' must be >= 1, got {w}")
  if alg not in ALGORITHMS:
    p.append(f"'comm.algorithm' must be one of {ALGORITHMS}, got '{alg}'")
  compressor_ok = cname in COMPRESSORS or is_bfp_name(cname)
  if not compressor_ok:
    p.append(f"'comm.compressor' must be one of {COMPRESSORS} or a bfp format "
             f"(bfp{{m}}_b{{block}}, 2 <= m <= 24; mxint8), got '{cname}'")
  if top not in TOPOLOGIES:
    p.append(f"'comm.topology' must be one of {TOPOLOGIES}, got '{top}'")
  if cname in ("top_k", "rand_k") and not 0 < c["ratio"] <= 1:
    p.append(f"'comm.ratio' must be in (0, 1] for {cname}, got {c['ratio']}")
  if cname == "qsgd" and c["levels"] < 1:
    p.append(f"'comm.levels' must be >= 1 for qsgd, got {c['levels']}")
  if (cname == "powersgd" or alg == "powersgd") and c["rank"] < 1:
    p.append(f"'comm.rank' must be >= 1 for powersgd, got {c['rank']}")
  if not 0 < c["gamma"] <= 1:
    p.append(f"'comm.gamma' must be in (0, 1], got {c['gamma']}")
  if c["local_steps"] < 1:
    p.append(f"'comm.local_steps' must be >= 1, got {c['local_steps']}")

  # combinations
  if alg in ("dpsgd", "gradient_tracking", "local_sgd") and cname != "none":
    hint = " (compressed gossip is algorithm 'choco')" if alg == "dpsgd" else ""
    p.append(f"algorithm '{alg}' sends uncompressed models; 'comm.compressor' must be "
             f"'none', got '{cname}'{hint}")
  if alg == "allreduce" and cname == "rand_k" and c["error_feedback"]:
    p.append("allreduce with compressor 'rand_k' and 'comm.error_feedback': rand_k is "
             "scaled by n/k to be unbiased, so it is not contractive "
             "(E||C(x) - x||^2 = (n/k - 1)||x||^2) and error feedback diverges; set "
             "'comm.error_feedback' to False")
  if alg == "powersgd" and cname not in ("none", "powersgd"):
    p.append(f"algorithm 'powersgd' compresses with PowerSGD of rank 'comm.rank'; "
             f"'comm.compressor' must be 'none' or 'powersgd', got '{cname}'")
  if alg == "allreduce" and cname == "powersgd":
    p.append("allreduce with compressor 'powersgd' would all-gather every worker's own "
             "factors; use algorithm 'powersgd' (PowerSGD's allreduce-compatible scheme)")
  if alg in GOSSIP_ALGORITHMS and top == "torus" and w >= 1 and top in TOPOLOGIES:
    r, _ = _grid(w)
    if w < 4 or r < 2:
      p.append(f"topology 'torus' needs W >= 4 workers that factor as r x c with r, c >= 2 "
               f"(W = {w} would be a ring: use topology 'ring')")
  return p
