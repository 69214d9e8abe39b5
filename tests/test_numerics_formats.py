"""Format names (contract §7): parsing, canonical names, attributes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gfloat import formats as gf

from coltrain.numerics import (ACCEPTED_FORMS, BFPFormat, FP32Format, MXFormat,
                               parse_format, quantize)

MX_NAMES = ["mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4_e2m1"]


@pytest.mark.parametrize("name, cls, fields", [
    ("fp32", FP32Format, {}),
    ("bfp8", BFPFormat, dict(mantissa_bits=8, block_size=64)),
    ("bfp8_b64", BFPFormat, dict(mantissa_bits=8, block_size=64)),
    ("bfp2_b1", BFPFormat, dict(mantissa_bits=2, block_size=1)),
    ("bfp24_b1000", BFPFormat, dict(mantissa_bits=24, block_size=1000)),
    ("bfp16_b16", BFPFormat, dict(mantissa_bits=16, block_size=16)),
    ("mxint8", BFPFormat, dict(mantissa_bits=8, block_size=32, mx_name=True)),
    ("mxint8_b16", BFPFormat, dict(mantissa_bits=8, block_size=16, mx_name=True)),
    ("mxfp8_e4m3", MXFormat, dict(element="e4m3", block_size=32)),
    ("mxfp8_e5m2_b64", MXFormat, dict(element="e5m2", block_size=64)),
    ("mxfp6_e3m2", MXFormat, dict(element="e3m2", block_size=32)),
    ("mxfp6_e2m3_b8", MXFormat, dict(element="e2m3", block_size=8)),
    ("mxfp4_e2m1", MXFormat, dict(element="e2m1", block_size=32)),
])
def test_parse(name, cls, fields):
  f = parse_format(name)
  assert isinstance(f, cls)
  for k, v in fields.items():
    assert getattr(f, k) == v
  assert parse_format(str(f)) == f
  assert parse_format(f.name) == f
  assert parse_format(f) is f
  assert hash(f) == hash(parse_format(name))


def test_canonical_names():
  assert str(parse_format("bfp8")) == "bfp8_b64"
  assert str(parse_format("mxfp8_e4m3_b32")) == "mxfp8_e4m3"
  assert str(parse_format("mxint8_b32")) == "mxint8"
  assert str(parse_format("mxfp4_e2m1_b16")) == "mxfp4_e2m1_b16"


def test_bfp_attributes():
  for m in range(2, 25):
    f = parse_format(f"bfp{m}_b3")
    assert f.qmax == 2 ** (m - 1) - 1
    assert f.step_shift == m - 2
    assert -(2 ** (f.storage_bits - 1)) <= -f.qmax and f.qmax <= 2 ** (f.storage_bits - 1) - 1


@pytest.mark.parametrize("name", MX_NAMES)
def test_mx_attributes_match_gfloat(name):
  f = parse_format(name)
  g = getattr(gf, "format_info_" + name).etype
  assert f.emax_elem == g.emax
  assert f.max_norm == g.max
  assert f.precision == g.precision
  assert f.bias == g.bias
  assert f.bits == g.k
  assert f.max_norm_units * 2.0**f.top_shift == f.max_norm


def test_formats_are_static_jit_args():
  x = jnp.arange(8, dtype=jnp.float32)
  fn = jax.jit(lambda x, fmt: quantize(x, fmt), static_argnums=1)
  for name in ["bfp4_b4", "mxfp4_e2m1_b4", "fp32"]:
    np.testing.assert_array_equal(fn(x, parse_format(name)), quantize(x, name))
  assert len({parse_format("bfp8"), parse_format("bfp8_b64"), parse_format("mxint8")}) == 2


@pytest.mark.parametrize("bad", [
    "", "bfp", "bfp1", "bfp25", "bfp0_b4", "bfp8_b0", "bfp8_b", "bfp08", "bfp8_b064",
    "BFP8", "bfp8_b64_b64", " bfp8", "bfp8 ", "bfp-8", "mxfp8", "mxfp8_e2m1", "mxfp4_e4m3",
    "mxfp6_e5m2", "mxint4", "mxint8_b0", "mxfp8_e4m3_b0", "fp16", "fp32_b4", "int8", "e4m3",
])
def test_malformed_names(bad):
  with pytest.raises(ValueError) as e:
    parse_format(bad)
  assert ACCEPTED_FORMS in str(e.value)


@pytest.mark.parametrize("bad", [None, 8, 8.0, b"bfp8"])
def test_non_string(bad):
  with pytest.raises(ValueError, match="accepted forms"):
    parse_format(bad)


def test_direct_construction_validates():
  with pytest.raises(ValueError):
    BFPFormat(1, 4)
  with pytest.raises(ValueError):
    BFPFormat(8, 0)
  with pytest.raises(ValueError):
    MXFormat("e9m9")
  with pytest.raises(ValueError):
    BFPFormat(6, 32, mx_name=True)
