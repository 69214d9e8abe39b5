"""Worker-axis primitives (coltrain.comm.workers) on 1 device and, in subprocesses, on
2, 4 and 8 simulated CPU devices (with NPROC set so XLA's CPU collectives can run).

Checked against numpy for W in {1, 4, 8, 16} (every W divisible by D):
  permute / pull: bitwise; mean(exact=True): bitwise equal to the sequential sum
  x_0 + x_1 + ... + x_{W-1} divided by W; mean (psum): within 4 W ulp(max|x|) of the
  float64 mean; gather, worker_index: exact. Gossip of every topology (3 steps,
  time-varying ones through lax.switch) is bitwise identical on D = 2, 4, 8 and D = 1.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coltrain.comm import testing as ct
from coltrain.comm import workers as wk

WIDTHS = (1, 4, 8, 16)


def test_primitives_one_device():
  assert ct.check_worker_primitives(WIDTHS) == []


@pytest.fixture(scope="module")
def gossip_reference():
  return ct.gossip_outputs()


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_primitives_and_gossip_multi_device(devices, tmp_path, gossip_reference):
  out = str(tmp_path / "gossip.npz")
  code = (
      "import json, jax, numpy as np\n"
      "from coltrain.comm import testing as ct\n"
      f"assert len(jax.devices()) == {devices}, jax.devices()\n"
      f"fails = ct.check_worker_primitives({WIDTHS!r})\n"
      f"np.savez({out!r}, **ct.gossip_outputs())\n"
      "print('FAILS=' + json.dumps(fails))\n")
  stdout = ct.run_in_subprocess(code, devices, timeout=240)
  fails = json.loads(stdout.split("FAILS=")[-1])
  assert fails == []
  got = np.load(out)
  expected = {k for k in gossip_reference if int(k.rsplit("_", 1)[1]) % devices == 0}
  assert set(got.files) == expected
  for k in expected:
    np.testing.assert_array_equal(got[k], gossip_reference[k], err_msg=k)


def test_host_helpers():
  mesh = wk.make_mesh(1)
  assert mesh.axis_names == (wk.AXIS,)
  tree = wk.stack({"w": jnp.arange(3.0), "s": jnp.float32(2)}, 4)
  assert tree["w"].shape == (4, 3) and tree["s"].shape == (4,)
  placed = wk.shard(tree, mesh)
  assert placed["w"].sharding.spec == jax.sharding.PartitionSpec(wk.AXIS)
  np.testing.assert_array_equal(wk.unstack(placed, 2)["w"], np.arange(3.0))
  with pytest.raises(ValueError, match="same leading worker axis"):
    wk.shard({"a": jnp.zeros((4, 2)), "b": jnp.zeros((3,))}, mesh)
  with pytest.raises(ValueError, match="num_devices"):
    wk.make_mesh(len(jax.devices()) + 1)


def test_run_per_worker_replicated_args_and_bad_perm():
  mesh = wk.make_mesh(1)
  x = wk.shard(jnp.arange(8.0).reshape(8, 1), mesh)

  def f(x, step):
    return x + step, wk.worker_index(x.shape[0])

  y, idx = jax.jit(wk.run_per_worker(f, mesh, replicated_args=(1,)))(x, jnp.float32(10))
  np.testing.assert_array_equal(y[:, 0], np.arange(8.0) + 10)
  np.testing.assert_array_equal(idx, np.arange(8))
  with pytest.raises(ValueError, match="permutation of 8 workers"):
    jax.jit(wk.run_per_worker(lambda x: wk.permute(x, [0] * 8), mesh))(x)
