"""coltrain.comm: compressed, decentralized communication between simulated workers.

W workers are stacked along a leading axis sharded over the 1-D mesh axis "workers"
(D devices, L = W / D workers per device); one code path runs inside `jax.shard_map`.

Modules:
  workers      the worker axis: permute / pull / mean / gather / worker_index inside
               shard_map; make_mesh / shard / replicate / stack / run_per_worker on the host
  topology     ring, torus, exponential, one_peer_exponential, complete; mixing as
               permutation terms, dense matrices, spectral gaps, gossip
  compressors  none, top_k, rand_k, qsgd, sign, powersgd, bfp (packed wire format),
               with_error_feedback; exact payload bytes
  algorithms   allreduce, dpsgd, choco, gradient_tracking, local_sgd, powersgd as
               `Algorithm(init, step)`; consensus_distance, average_params
  config       COMM_DEFAULTS, validate_comm
  stacked      init_workers / split_batch / make_stacked_step: a multi-worker train step
               from a per-worker local gradient function and an Algorithm
  testing      a toy least-squares problem, `simulate`, multi-device subprocess helpers
"""

from coltrain.comm import algorithms, compressors, config, stacked, topology, workers
from coltrain.comm.algorithms import (ALGORITHMS, Algorithm, average_params,
                                      consensus_distance, init_opt_state, make_algorithm)
from coltrain.comm.compressors import (COMPRESSORS, Compressor, make_compressor,
                                       with_error_feedback)
from coltrain.comm.config import COMM_DEFAULTS, validate_comm
from coltrain.comm.stacked import init_workers, make_stacked_step, split_batch
from coltrain.comm.topology import TOPOLOGIES, Mixing, Topology, make_topology
from coltrain.comm.workers import (AXIS, gather, make_mesh, mean, permute, pull, replicate,
                                   run_per_worker, shard, stack, unstack, worker_index)

__all__ = [
    "ALGORITHMS", "AXIS", "Algorithm", "COMM_DEFAULTS", "COMPRESSORS", "Compressor",
    "Mixing", "TOPOLOGIES", "Topology", "algorithms", "average_params", "compressors",
    "config", "consensus_distance", "gather", "init_opt_state", "init_workers",
    "make_algorithm", "make_stacked_step", "split_batch", "stacked",
    "make_compressor", "make_mesh", "make_topology", "mean", "permute", "pull",
    "replicate", "run_per_worker", "shard", "stack", "topology", "unstack",
    "validate_comm", "with_error_feedback", "worker_index", "workers",
]
