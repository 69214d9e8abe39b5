"""The contract's public test vectors (tests/data/numerics_vectors.json), bit for bit."""

import json
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.numerics import matmul, quantize

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import numerics_reference as ref  # noqa: E402

VECTORS = pathlib.Path(__file__).parent / "data" / "numerics_vectors.json"
CASES = json.loads(VECTORS.read_text())["cases"]


def _bits(hexes, shape):
  return np.array([int(h, 16) for h in hexes], np.uint32).reshape(shape)


def _case_id(c):
  if c["op"] == "quantize":
    return f"quantize-{c['format']}-{c['rounding']}-axis{c['axis']}"
  return f"matmul-{c['lhs']}-{c['rhs']}-{c['datapath']}"


def _run(c):
  if c["op"] == "quantize":
    x = _bits(c["x"], c["shape"])
    kw = {}
    if "random_bits" in c:
      kw["random_bits"] = jnp.asarray(np.array(c["random_bits"], np.uint32)
                                      .reshape(c["shape"]))
    got = quantize(jnp.asarray(x.view(np.float32)), c["format"], axis=c["axis"],
                   rounding=c["rounding"], **kw)
    return got, _bits(c["want"], c["shape"])
  a = _bits(c["a"], c["a_shape"])
  b = _bits(c["b"], c["b_shape"])
  got = matmul(jnp.asarray(a.view(np.float32)), jnp.asarray(b.view(np.float32)),
               lhs=c["lhs"], rhs=c["rhs"], datapath=c["datapath"])
  return got, _bits(c["want"], (c["a_shape"][0], c["b_shape"][1]))


def test_vectors_present():
  ops = {c["op"] for c in CASES}
  assert ops == {"quantize", "matmul"} and len(CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_public_vector(case):
  got, want = _run(case)
  got = np.asarray(got).view(np.uint32)
  ok = ref.contract_equal(got, want)
  assert ok.all(), (f"mismatch at {np.argwhere(~ok).tolist()}: got "
                    f"{[hex(v) for v in got[~ok]]} want {[hex(v) for v in want[~ok]]}")


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_reference_agrees_with_vector(case):
  """The independent reference reproduces the contract's own vectors too."""
  if case["op"] == "quantize":
    x = _bits(case["x"], case["shape"])
    rb = (np.array(case["random_bits"], np.uint32).reshape(case["shape"])
          if "random_bits" in case else None)
    got = ref.quantize(x, case["format"], case["axis"], case["rounding"], rb)
    want = _bits(case["want"], case["shape"])
  else:
    got = ref.matmul_exact(_bits(case["a"], case["a_shape"]),
                           _bits(case["b"], case["b_shape"]), case["lhs"], case["rhs"])
    want = _bits(case["want"], (case["a_shape"][0], case["b_shape"][1]))
  assert ref.contract_equal(got, want).all()
