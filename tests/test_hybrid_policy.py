"""Precision policies: presets, both rule forms, resolution against real models, phases."""

import jax
import jax.numpy as jnp
import pytest

from coltrain.models import LeNet, MLP, ResNet20
from coltrain.numerics.dot import DotSpec, GemmSpec
from coltrain.numerics.formats import parse_format
from coltrain.numerics.policy import PRESETS, make_policy

MNIST = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
CIFAR = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
LENET_LAYERS = ["conv0", "conv1", "dense0", "dense1", "head"]


def _g(lhs, rhs, lr="nearest_even", rr="nearest_even"):
  return GemmSpec(lhs, rhs, lr, rr)


def hbfp(fmt):
  """The HBFP convention: every operand `fmt`, dY stochastic, everything else RNE."""
  return DotSpec(fwd=_g(fmt, fmt), dlhs=_g(fmt, fmt, "stochastic"),
                 drhs=_g(fmt, fmt, "nearest_even", "stochastic"))


@pytest.fixture(scope="module")
def lenet_resolved():
  return {name: make_policy(name).resolve(LeNet(num_classes=10), MNIST) for name in PRESETS}


def test_presets(lenet_resolved):
  r = lenet_resolved
  assert r["fp32"].specs(0) == {} and r["fp32"].storage == (None,)
  for name, m in (("hbfp8_16", "bfp8"), ("hbfp4_16", "bfp4")):
    assert r[name].num_phases == 1
    assert r[name].specs(0) == {l: hbfp(m) for l in LENET_LAYERS}
    assert r[name].storage == (parse_format("bfp16_b64"),)
  e4, e5 = "mxfp8_e4m3", "mxfp8_e5m2"
  assert r["mxfp8"].specs(0) == {
      l: DotSpec(fwd=_g(e4, e4), dlhs=_g(e5, e4), drhs=_g(e4, e5)) for l in LENET_LAYERS}
  assert r["mxfp8"].storage == (None,)
  assert r["mxint8"].specs(0) == {
      l: DotSpec(*(_g("mxint8", "mxint8"),) * 3) for l in LENET_LAYERS}
  assert parse_format("mxint8").block_size == 32


def test_mantissa_bits_of_presets():
  bits = {name: make_policy(name).mantissa_bits for name in PRESETS}
  assert bits == {"fp32": 24, "hbfp8_16": 8, "hbfp4_16": 4, "hbfp4_booster": 4,
                  "mxfp8": 4, "mxint8": 8}


def test_booster_first_last_and_phase_switch(lenet_resolved):
  r = lenet_resolved["hbfp4_booster"]
  assert r.num_phases == 2
  assert r.specs(0) == {"conv0": hbfp("bfp6"), "conv1": hbfp("bfp4"), "dense0": hbfp("bfp4"),
                        "dense1": hbfp("bfp4"), "head": hbfp("bfp6")}
  assert r.specs(1) == {l: hbfp("bfp6") for l in LENET_LAYERS}
  assert r.storage == (parse_format("bfp16"),) * 2
  assert r.phase_starts(100) == [0, 90]
  assert [r.phase_at(s, 100) for s in (0, 89, 90, 99)] == [0, 0, 1, 1]
  assert r.phase_starts(25) == [0, 23]                  # ceil(22.5): the last 10% or less
  assert r.phase_starts(1000) == [0, 900]
  assert r.policy.storage_format == parse_format("bfp16_b64")


def test_compact_and_python_forms_agree():
  compact = make_policy("@first,@last=bfp6;*=bfp4;@storage=bfp16|0.9:*=bfp6")
  python = make_policy(((0.0, (("@first,@last", "bfp6"), (("*",), "bfp4"),
                                ("@storage", "bfp16"))),
                        (0.9, (("*", "bfp6"),))))
  preset = make_policy("hbfp4_booster")
  assert compact.phases == python.phases == preset.phases
  # Role and tensor keys, explicit rounding, dict form.
  a = make_policy("dense*=fwd:bfp8/bfp6,dy:bfp4~ne,w:bfp5;head=drhs:mxint8~sr")
  b = make_policy(((0, (("dense*", {"fwd": ("bfp8", "bfp6"), "dy": ("bfp4", "nearest_even"),
                                    "w": "bfp5"}),
                        ("head", {"drhs": "mxint8~stochastic"}))),))
  assert a.phases == b.phases
  dense = a.phases[0].rules[0]
  assert dense.fwd == _g("bfp8", "bfp6")
  assert dense.dlhs == _g("bfp4", "bfp5", "nearest_even", "nearest_even")
  assert dense.drhs == _g("fp32", "bfp4", "nearest_even", "nearest_even")
  head = a.phases[0].rules[1]
  assert head.fwd == _g("fp32", "fp32") and head.dlhs == _g("fp32", "fp32")
  assert head.drhs == _g("mxint8", "mxint8", "stochastic", "stochastic")


def test_resolution_first_match_wins_and_unmatched_stay_fp32():
  r = make_policy("stage*/conv0=bfp6~ne;stage*=bfp4~ne;@last=bfp8~ne").resolve(
      ResNet20(10), CIFAR)
  specs = r.specs(0)
  paths = [l.path for l in r.layers]
  assert paths[0] == "stem" and paths[-1] == "head" and len(paths) == 22
  assert "stem" not in specs                                    # no rule -> fp32
  assert specs["stage1_block0/conv0"].fwd.lhs == parse_format("bfp6")
  assert specs["stage1_block0/conv1"].fwd.lhs == parse_format("bfp4")
  assert specs["stage2_block0/shortcut"].fwd.lhs == parse_format("bfp4")
  assert specs["head"].fwd.lhs == parse_format("bfp8")
  # An explicit fp32 rule shields a layer from later rules.
  r = make_policy("dense1=fp32;*=bfp4").resolve(MLP(10), MNIST)
  assert set(r.specs(0)) == {"dense0", "head"}
  assert [l.path for l in r.layers] == ["dense0", "dense1", "head"]


def test_exact_datapath_policy():
  r = make_policy("hbfp8_16", datapath="exact").resolve(MLP(10), MNIST)
  assert all(s.datapath == "exact" for s in r.specs(0).values())
  with pytest.raises(ValueError, match="exact"):
    make_policy("mxfp8", datapath="exact")


@pytest.mark.parametrize("bad, match", [
    ("hbfp9_16", "unknown policy preset"),
    ("*=bfp99", "number format"),
    ("*=bfp8~sometimes", "rounding"),
    ("*=fwd:bfp8,grad:bfp8", "unknown key"),
    ("@middle=bfp8", "special pattern"),
    ("*=bfp8|*=bfp4", "start fraction"),
    ("*=bfp8|0.5:*=bfp6|0.4:*=bfp4", "increase"),
    ("*=bfp8|1.5:*=bfp4", r"\[0, 1\)"),
    ("*=bfp8;conv0", "PATTERNS=FORMATS"),
    ("*=", "missing formats"),
    ("*=bfp8;@storage=bfp0", "number format"),
    (((0.5, (("*", "bfp8"),)),), "must start at 0"),
    (((0, ("*", "bfp8")),), "patterns, formats"),
    ("", "unknown policy preset"),
])
def test_malformed_policies_raise(bad, match):
  with pytest.raises(ValueError, match=match):
    make_policy(bad)


def test_pattern_matching_no_layer_lists_the_layers():
  p = make_policy("conv*=bfp6;*=bfp4")
  with pytest.raises(ValueError) as e:
    p.resolve(MLP(10), MNIST)
  msg = str(e.value)
  assert "'conv*' matches no GEMM layer" in msg
  for layer in ("dense0", "dense1", "head"):
    assert layer in msg


def test_phase_arguments():
  p = make_policy("hbfp4_booster")
  with pytest.raises(ValueError):
    p.phase_starts(0)
  r = p.resolve(MLP(10), MNIST)
  with pytest.raises(ValueError):
    r.specs(2)
  assert "phase 1" in r.describe() and "phase 1" in p.describe()
  assert hash(r) == hash(p.resolve(MLP(10), MNIST))        # usable as a static value
