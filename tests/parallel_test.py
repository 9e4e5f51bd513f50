"""Mesh from config, batch-size check, host batch -> global sharded array, multi-host detection,
splitting a CPU host into devices."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from cdjax import parallel
from configs import default


def _config(data):
  c = default.get_config()
  c.mesh.data = data
  return c


def test_mesh_over_all_devices_or_a_given_number():
  assert jax.device_count() == 8
  assert parallel.make_mesh(_config(-1)).devices.size == 8
  mesh = parallel.make_mesh(_config(2))
  assert mesh.axis_names == ("data",) and mesh.devices.size == 2
  with pytest.raises(ValueError, match="mesh.data=9"):
    parallel.make_mesh(_config(9))


def test_batch_not_divisible_names_both_numbers():
  mesh = parallel.make_mesh(_config(-1))
  parallel.check_batch_size(16, mesh)
  with pytest.raises(ValueError, match=r"batch size 12 .* 8 devices"):
    parallel.check_batch_size(12, mesh)
  with pytest.raises(ValueError, match=r"16 .* 8 devices x 4 gradient-accumulation steps"):
    parallel.check_batch_size(16, mesh, grad_accum_steps=4)


def test_global_batch_is_sharded_over_data():
  mesh = parallel.make_mesh(_config(-1))
  host = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
  batch = parallel.global_batch(host, mesh)
  assert batch["image"].shape == (16, 3)
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
  params = parallel.replicate({"w": np.ones(3)}, mesh)
  assert params["w"].sharding.is_fully_replicated


def test_multihost_environment_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not parallel.is_multihost_env()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel.is_multihost_env()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.is_multihost_env()


@pytest.mark.parametrize("xla_flags,expected", [
    ("", 3),                                                     # split as asked
    ("--xla_force_host_platform_device_count=5", 5),             # the user's own count wins
])
def test_split_host_cpu_sets_the_device_count_before_jax_starts(xla_flags, expected):
  code = ("from cdjax import parallel; parallel.split_host_cpu(3); import jax; "
          "print(jax.devices('cpu').__len__())")
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       check=True)
  assert out.stdout.split()[-1] == str(expected)


def test_split_host_cpu_after_start_changes_nothing(monkeypatch):
  assert jax.device_count() == 8     # backends are running
  monkeypatch.setenv("XLA_FLAGS", "")
  parallel.split_host_cpu(3)
  assert os.environ["XLA_FLAGS"] == "" and jax.device_count() == 8
