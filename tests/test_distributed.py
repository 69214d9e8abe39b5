"""Process-group settings from flags and the environment (no JAX runtime started)."""

import pytest

from coltrain import distributed as dist


def test_single_process_without_any_settings():
  assert dist.detect(env={}) is None
  assert dist.detect(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0",
                          "SLURM_STEP_NODELIST": "n1"}) is None
  # A group of one is a plain single process too.
  assert dist.detect("h:1", 1, 0, env={}) is None


def test_explicit_flags_win_over_the_environment():
  env = {"COLTRAIN_COORDINATOR": "a:1", "COLTRAIN_NUM_PROCESSES": "8",
         "COLTRAIN_PROCESS_ID": "3", "COLTRAIN_HEARTBEAT_TIMEOUT": "7"}
  s = dist.detect("10.0.0.1:1234", 4, 2, env=env)
  assert (s.coordinator, s.num_processes, s.process_id, s.source) == (
      "10.0.0.1:1234", 4, 2, "flags")
  assert s.heartbeat_timeout == 7 and s.init_timeout == dist.DEFAULT_INIT_TIMEOUT


def test_flags_go_together():
  with pytest.raises(dist.DistributedError, match="together"):
    dist.detect("h:1", None, 0, env={})


def test_launcher_environment():
  s = dist.detect(env={"COLTRAIN_COORDINATOR": "127.0.0.1:5555",
                       "COLTRAIN_NUM_PROCESSES": "4", "COLTRAIN_PROCESS_ID": "1",
                       "COLTRAIN_INIT_TIMEOUT": "9"})
  assert (s.coordinator, s.num_processes, s.process_id, s.source, s.init_timeout) == (
      "127.0.0.1:5555", 4, 1, "env", 9)


def test_kubernetes_indexed_job():
  s = dist.detect(env={"COLTRAIN_COORDINATOR": "coltrain-0.coltrain:1234",
                       "COLTRAIN_NUM_PROCESSES": "3", "JOB_COMPLETION_INDEX": "2",
                       "KUBERNETES_SERVICE_HOST": "10.96.0.1"})
  assert (s.coordinator, s.num_processes, s.process_id, s.source) == (
      "coltrain-0.coltrain:1234", 3, 2, "kubernetes")
  with pytest.raises(dist.DistributedError, match="JOB_COMPLETION_INDEX"):
    dist.detect(env={"COLTRAIN_COORDINATOR": "h:1", "COLTRAIN_NUM_PROCESSES": "3"})


@pytest.mark.parametrize("nodes,first", [
    ("node7", "node7"), ("node7,gpu2", "node7"), ("node[003-015],x", "node003"),
    ("gpu[12,14-16]", "gpu12"), ("a-b[9]", "a-b9")])
def test_slurm_first_host(nodes, first):
  assert dist.first_slurm_host(nodes) == first


def test_slurm_environment():
  env = {"SLURM_JOB_ID": "4100", "SLURM_NTASKS": "16", "SLURM_PROCID": "5",
         "SLURM_STEP_NODELIST": "h[02-17]"}
  s = dist.detect(env=env)
  assert (s.coordinator, s.num_processes, s.process_id, s.source) == (
      f"h02:{61440 + 4100 % 4096}", 16, 5, "slurm")
  s = dist.detect(env={**env, "COLTRAIN_COORDINATOR_PORT": "2222"})
  assert s.coordinator == "h02:2222"


@pytest.mark.parametrize("env,needle", [
    ({"COLTRAIN_COORDINATOR": "h:1", "COLTRAIN_NUM_PROCESSES": "2",
      "COLTRAIN_PROCESS_ID": "2"}, "not in"),
    ({"COLTRAIN_COORDINATOR": "h:1", "COLTRAIN_NUM_PROCESSES": "two",
      "COLTRAIN_PROCESS_ID": "0"}, "integer"),
    ({"COLTRAIN_COORDINATOR": "host", "COLTRAIN_NUM_PROCESSES": "2",
      "COLTRAIN_PROCESS_ID": "0"}, "HOST:PORT"),
])
def test_bad_settings_are_clear_errors(env, needle):
  with pytest.raises(dist.DistributedError, match=needle):
    dist.detect(env=env)


def test_launcher_child_environment():
  from launch.multiprocess import child_env
  env = child_env({"PATH": "/bin", "NPROC": "3"}, process_id=2, processes=4, devices=2,
                  port=4321, heartbeat_timeout=10, init_timeout=60)
  assert env["COLTRAIN_COORDINATOR"] == "127.0.0.1:4321"
  assert (env["COLTRAIN_NUM_PROCESSES"], env["COLTRAIN_PROCESS_ID"]) == ("4", "2")
  assert env["JAX_NUM_CPU_DEVICES"] == "2"
  assert env["NPROC"] == "4"  # at least 2 x the local devices, per process
  s = dist.detect(env=env)
  assert (s.process_id, s.num_processes, s.heartbeat_timeout, s.init_timeout) == (
      2, 4, 10, 60)
