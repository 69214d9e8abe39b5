"""comm.* config keys: defaults and validation of values and combinations."""

import ml_collections
import pytest

from coltrain.comm.config import COMM_DEFAULTS, resolve, validate_comm


def test_defaults_are_valid_and_complete():
  assert validate_comm({}) == []
  assert validate_comm(None) == []
  assert validate_comm(ml_collections.ConfigDict(COMM_DEFAULTS)) == []
  assert set(COMM_DEFAULTS) == {"workers", "algorithm", "compressor", "ratio", "levels",
                                "rank", "error_feedback", "topology", "gamma",
                                "local_steps", "exact_mean"}
  assert resolve({"workers": 4})["algorithm"] == "allreduce"


VALID = [
    dict(workers=8, algorithm="choco", compressor="none"),  # = D-PSGD
    dict(workers=8, algorithm="choco", compressor="top_k", ratio=0.01, gamma=0.2),
    dict(workers=8, algorithm="choco", compressor="bfp8_b64", topology="torus"),
    dict(workers=8, algorithm="choco", compressor="mxint8", topology="one_peer_exponential"),
    dict(workers=16, algorithm="dpsgd", topology="torus"),
    dict(workers=4, algorithm="gradient_tracking", topology="complete"),
    dict(workers=8, algorithm="allreduce", compressor="qsgd", levels=2),
    dict(workers=8, algorithm="allreduce", compressor="rand_k", error_feedback=False),
    dict(workers=8, algorithm="allreduce", compressor="bfp4"),
    dict(workers=8, algorithm="powersgd", rank=4),
    dict(workers=8, algorithm="powersgd", compressor="powersgd"),
    dict(workers=8, algorithm="local_sgd", local_steps=8, exact_mean=True),
    dict(workers=7, algorithm="allreduce", topology="torus"),  # topology unused
    dict(workers=1, algorithm="dpsgd"),
]


@pytest.mark.parametrize("cfg", VALID)
def test_valid(cfg):
  assert validate_comm(cfg) == []


INVALID = [
    (dict(workers=0), "'comm.workers' must be >= 1"),
    (dict(algorithm="gossip"), "'comm.algorithm' must be one of"),
    (dict(compressor="topk"), "'comm.compressor' must be one of"),
    (dict(compressor="mxfp8_e4m3"), "'comm.compressor' must be one of"),
    (dict(compressor="bfp1"), "'comm.compressor' must be one of"),
    (dict(topology="star"), "'comm.topology' must be one of"),
    (dict(compressor="top_k", ratio=0.0), "'comm.ratio' must be in (0, 1]"),
    (dict(compressor="top_k", ratio=1.5), "'comm.ratio' must be in (0, 1]"),
    (dict(algorithm="choco", compressor="qsgd", levels=0), "'comm.levels' must be >= 1"),
    (dict(algorithm="powersgd", rank=0), "'comm.rank' must be >= 1"),
    (dict(algorithm="choco", compressor="powersgd", rank=0), "'comm.rank' must be >= 1"),
    (dict(gamma=0.0), "'comm.gamma' must be in (0, 1]"),
    (dict(gamma=1.5), "'comm.gamma' must be in (0, 1]"),
    (dict(local_steps=0), "'comm.local_steps' must be >= 1"),
    (dict(algorithm="dpsgd", compressor="top_k"), "compressed gossip is algorithm 'choco'"),
    (dict(algorithm="gradient_tracking", compressor="sign"), "sends uncompressed models"),
    (dict(algorithm="local_sgd", compressor="qsgd"), "sends uncompressed models"),
    (dict(algorithm="powersgd", compressor="top_k"), "must be 'none' or 'powersgd'"),
    (dict(algorithm="allreduce", compressor="powersgd"), "use algorithm 'powersgd'"),
    (dict(algorithm="allreduce", compressor="rand_k"), "error feedback diverges"),
    (dict(workers=2, algorithm="dpsgd", topology="torus"), "topology 'torus' needs W >= 4"),
    (dict(workers=7, algorithm="choco", topology="torus"), "would be a ring"),
    (dict(workers=2.0), "'comm.workers' has the wrong type"),
    (dict(error_feedback=1), "'comm.error_feedback' has the wrong type"),
    (dict(gamma="1"), "'comm.gamma' has the wrong type"),
    (dict(worker=4), "unknown key 'comm.worker'"),
]


@pytest.mark.parametrize("cfg,message", INVALID)
def test_invalid(cfg, message):
  problems = validate_comm(cfg)
  assert any(message in p for p in problems), problems


def test_all_problems_reported_at_once():
  problems = validate_comm(dict(workers=0, algorithm="dpsgd", compressor="sign", gamma=2.0))
  assert len(problems) == 3, problems
