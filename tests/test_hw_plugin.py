"""Hardware plugins: loading, ABI/capability checks and their errors (with a second,
minimal plugin built here), and backend="hw" under jit / vmap / grad / shard_map and in
training (same params_fingerprint as backend="jax")."""

import os
import subprocess
import sys
import textwrap

import _ctypes
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from coltrain.config import ConfigError, validate
from coltrain.numerics import DotSpec, GemmSpec, hw, make_policy, matmul
from coltrain.numerics.conv import quantized_conv_general_dilated
from coltrain.numerics.dot import quantized_dot_general
from coltrain.numerics.hw import HwPluginError
from tests.conftest import REPO, small_config

HW = os.path.join(REPO, "hw")


def build_plugin(out_dir, **defines) -> str:
  """Compiles hw/tests/minimal_plugin.cc against jaxlib's FFI headers."""
  name = defines.get("MINIMAL_PLUGIN_NAME", "minimal_test")
  path = os.path.join(str(out_dir), f"lib{name}.so")
  flags = [f"-D{k}={v}" if k != "MINIMAL_PLUGIN_NAME" else f'-D{k}="{v}"'
           for k, v in defines.items()]
  subprocess.run(["g++", "-std=c++20", "-O2", "-shared", "-fPIC", *flags,
                  "-I", os.path.join(HW, "include"), "-I", os.path.join(HW, "src"),
                  "-isystem", jax.ffi.include_dir(),
                  os.path.join(HW, "tests", "minimal_plugin.cc"), "-o", path], check=True)
  return path


@pytest.fixture(scope="module")
def minimal(tmp_path_factory):
  return build_plugin(tmp_path_factory.mktemp("plugin"))


def rand(rng, shape):
  return jnp.asarray(rng.standard_normal(shape).astype(np.float32))


def same_bits(x, y):
  return np.array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


# --- loading and capabilities ------------------------------------------------------------

def test_minimal_plugin_capabilities_and_gemm(minimal):
  p = hw.load_plugin(minimal)
  assert hw.load_plugin(minimal) is p  # cached
  assert (p.name, p.ops, p.mantissa_bits, p.block_sizes) == (
      "minimal_test", {"gemm"}, {8}, {32})
  assert p.max_gemm_k == 256 and p.roundings == {"nearest_even"}
  rng = np.random.default_rng(0)
  a, b = rand(rng, (5, 100)), rand(rng, (100, 7))
  want = matmul(a, b, lhs="bfp8_b32", rhs="bfp8_b32")
  assert same_bits(matmul(a, b, lhs="bfp8_b32", rhs="bfp8_b32", backend="hw",
                          hw_plugin=minimal), want)
  lowered = jax.jit(lambda a, b: hw.gemm(a, b, "bfp8_b32", "bfp8_b32", plugin=minimal)
                    ).lower(a, b).as_text()
  assert "coltrain_hw.minimal_test.gemm" in lowered


@pytest.mark.parametrize("kwargs,match", [
    (dict(lhs="bfp4_b32", rhs="bfp8_b32"), "4-bit mantissas unsupported"),
    (dict(lhs="bfp8_b64", rhs="bfp8_b64"), "block size 64 unsupported"),
    (dict(lhs="bfp8_b32", rhs="bfp8_b32", k=300), "K = 300 exceeds its limit 256"),
    (dict(lhs="bfp8_b32", rhs="bfp8_b32", rounding="stochastic"), "cannot round"),
])
def test_minimal_plugin_rejects_what_it_cannot_do(minimal, kwargs, match):
  k = kwargs.pop("k", 64)
  rng = np.random.default_rng(1)
  a, b = rand(rng, (3, k)), rand(rng, (k, 4))
  extra = {}
  if kwargs.get("rounding") == "stochastic":
    extra["key"] = jax.random.key(0)
  with pytest.raises(HwPluginError, match=match):
    jax.jit(lambda a, b: matmul(a, b, datapath="exact", backend="hw", hw_plugin=minimal,
                                **kwargs, **extra)).lower(a, b)


def test_missing_operation_is_a_clear_error(minimal):
  with pytest.raises(HwPluginError, match="does not provide the 'quantize' operation"):
    hw.quantize(jnp.ones((2, 32)), "bfp8_b32", plugin=minimal)
  g = GemmSpec("bfp8_b32", "bfp8_b32")
  with pytest.raises(ValueError, match="quantize"):
    DotSpec(g, g, g, datapath="exact", backend="hw", hw_plugin=minimal)
  with pytest.raises(ValueError, match="quantize"):
    make_policy("hbfp8_16", datapath="exact", backend="hw", hw_plugin=minimal)


def test_wrong_abi_version(tmp_path):
  path = build_plugin(tmp_path, MINIMAL_PLUGIN_ABI=2, MINIMAL_PLUGIN_NAME="wrong_abi")
  with pytest.raises(HwPluginError, match="ABI version 2, but this coltrain needs version 1"):
    hw.load_plugin(path)


def test_not_a_plugin_and_missing_file(tmp_path):
  with pytest.raises(HwPluginError, match="not a coltrain hw plugin"):
    hw.load_plugin(_ctypes.__file__)
  with pytest.raises(HwPluginError, match="does not exist"):
    hw.load_plugin(str(tmp_path / "nope.so"))


def test_env_var_selects_plugin(monkeypatch, minimal):
  monkeypatch.setenv("COLTRAIN_HW_PLUGIN", minimal)
  assert hw.resolve_plugin_path() == os.path.realpath(minimal)
  assert hw.get_plugin().name == "minimal_test"
  monkeypatch.delenv("COLTRAIN_HW_PLUGIN")
  assert hw.get_plugin().name == "cpu_model"


def test_config_errors_before_training(minimal):
  c = small_config(**{"numerics.backend": "hw"})
  with pytest.raises(ConfigError, match="set 'numerics.datapath' to 'exact'"):
    validate(c)
  c = small_config(**{"numerics.backend": "hw", "numerics.datapath": "exact",
                      "numerics.hw_plugin": "/nonexistent/plugin.so"})
  with pytest.raises(ConfigError, match="numerics.hw_plugin.*does not exist"):
    validate(c)
  c = small_config(**{"numerics.backend": "hw", "numerics.datapath": "exact",
                      "numerics.policy": "hbfp4_16", "numerics.hw_plugin": minimal})
  with pytest.raises(ConfigError, match="numerics.policy"):
    validate(c)
  c = small_config(**{"numerics.backend": "hw", "numerics.datapath": "exact",
                      "numerics.hw_plugin": minimal, "comm.workers": 2,
                      "comm.algorithm": "choco", "comm.compressor": "top_k"})
  with pytest.raises(ConfigError, match="comm.compressor.*top_k"):
    validate(c)


# --- JAX transformations -----------------------------------------------------------------

def test_vmap_equals_per_example_calls():
  rng = np.random.default_rng(2)
  a, b = rand(rng, (4, 6, 70)), rand(rng, (4, 70, 9))
  f = lambda a, b: matmul(a, b, lhs="bfp6_b32", rhs="bfp6_b32", backend="hw")
  got = jax.vmap(f)(a, b)
  for i in range(4):
    assert same_bits(got[i], matmul(a[i], b[i], lhs="bfp6_b32", rhs="bfp6_b32"))


HBFP = DotSpec(GemmSpec("bfp8_b16", "bfp8_b16"),
               GemmSpec("bfp8_b16", "bfp8_b16", lhs_rounding="stochastic"),
               GemmSpec("bfp6_b16", "bfp8_b16", rhs_rounding="stochastic"), datapath="exact")


def _hw(spec):
  return DotSpec(spec.fwd, spec.dlhs, spec.drhs, datapath="exact", backend="hw")


def test_grad_of_dense_matches_jax_and_lowers_every_gemm_to_the_plugin():
  rng = np.random.default_rng(3)
  x, w = rand(rng, (24, 40)), rand(rng, (40, 10))
  key = jax.random.key(7)
  dims = (((1,), (0,)), ((), ()))

  def loss(spec):
    dot = quantized_dot_general(spec)
    return lambda x, w: jnp.sum(jnp.tanh(dot(x, w, dims, key=key)))

  want = jax.grad(loss(HBFP), argnums=(0, 1))(x, w)
  fn = jax.jit(jax.grad(loss(_hw(HBFP)), argnums=(0, 1)))
  got = fn(x, w)
  assert all(same_bits(g, h) for g, h in zip(got, want))
  hlo = fn.lower(x, w).as_text()
  assert hlo.count("coltrain_hw.cpu_model.gemm") == 3  # fwd, dlhs, drhs
  assert hlo.count("coltrain_hw.cpu_model.quantize") == 6


def test_grad_of_conv_matches_jax():
  rng = np.random.default_rng(4)
  x, w = rand(rng, (2, 8, 8, 3)), rand(rng, (3, 3, 3, 5))
  key = jax.random.key(1)

  def loss(spec):
    conv = quantized_conv_general_dilated(spec)
    return lambda x, w: jnp.sum(conv(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), key=key) ** 2)

  want = jax.grad(loss(HBFP), argnums=(0, 1))(x, w)
  got = jax.jit(jax.grad(loss(_hw(HBFP)), argnums=(0, 1)))(x, w)
  assert all(same_bits(g, h) for g, h in zip(got, want))


def test_inside_shard_map_on_two_devices():
  script = textwrap.dedent("""
      import jax, jax.numpy as jnp, numpy as np
      from jax.sharding import PartitionSpec as P
      from coltrain.numerics import matmul
      assert jax.device_count() == 2
      mesh = jax.make_mesh((2,), ("x",))
      rng = np.random.default_rng(0)
      a = rng.standard_normal((8, 96)).astype(np.float32)
      b = rng.standard_normal((96, 12)).astype(np.float32)
      f = jax.shard_map(lambda a, b: matmul(a, b, lhs="bfp8_b32", rhs="bfp8_b32",
                                            backend="hw"),
                        mesh=mesh, in_specs=(P("x"), P()), out_specs=P("x"))
      a_s = jax.device_put(a, jax.NamedSharding(mesh, P("x")))
      b_s = jax.device_put(b, jax.NamedSharding(mesh, P()))
      got = np.asarray(jax.jit(f)(a_s, b_s))
      want = np.asarray(matmul(jnp.asarray(a), jnp.asarray(b), lhs="bfp8_b32",
                               rhs="bfp8_b32"))
      assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
      print("OK")
  """)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", NPROC="4")
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-3000:]


# --- training ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {"model": "lenet", "steps": 3, "batch_size": 16, "numerics.policy": "hbfp8_16"},
    {"steps": 6, "numerics.policy": "hbfp4_16", "comm.workers": 2, "comm.algorithm": "choco",
     "comm.compressor": "top_k", "comm.gamma": 0.5},
    {"steps": 6, "numerics.policy": "hbfp8_16", "comm.workers": 2,
     "comm.compressor": "bfp8_b64"},
], ids=["lenet", "choco_top_k", "allreduce_bfp8"])
def test_training_fingerprint_hw_equals_jax(tfds_dir, tmp_path, overrides):
  from coltrain.train import train_and_evaluate
  summaries = {}
  for backend in ("jax", "hw"):
    c = small_config(**{**overrides, "numerics.datapath": "exact",
                        "numerics.backend": backend, "checkpoint_every": 100})
    summaries[backend] = train_and_evaluate(c, str(tmp_path / backend))
  assert summaries["hw"]["params_fingerprint"] == summaries["jax"]["params_fingerprint"]
  assert summaries["hw"].get("bytes_sent_per_worker") == summaries["jax"].get(
      "bytes_sent_per_worker")
