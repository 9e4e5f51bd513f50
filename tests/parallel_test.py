"""Mesh from config, batch-size check, host batch -> global sharded array, padded batches,
multi-host detection, splitting a CPU host into devices and the XLA flags set before JAX starts."""
import json
import os
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from cdjax import nets
from cdjax import parallel
from configs import default
from configs import speech_keywords


def _config(data):
  c = default.get_config()
  c.mesh.data = data
  return c


def test_mesh_over_all_devices_or_a_given_number():
  assert jax.device_count() == 8
  assert parallel.make_mesh(_config(-1)).devices.size == 8
  mesh = parallel.make_mesh(_config(2))
  assert mesh.axis_names == ("data",) and mesh.devices.size == 2
  assert list(mesh.devices) == jax.devices()[:2]
  for data in (9, 0, -2):
    with pytest.raises(ValueError, match=rf"mesh.data={data} must be -1 or in \[1, 8\]"):
      parallel.make_mesh(_config(data))


def test_batch_not_divisible_names_both_numbers():
  parallel.check_batch_size(16, 8)
  with pytest.raises(ValueError, match=r"batch size 12 is not divisible by the 8 devices \(= 8\)"):
    parallel.check_batch_size(12, 8)
  with pytest.raises(ValueError, match=r"16 .* 8 devices x 4 gradient-accumulation steps"):
    parallel.check_batch_size(16, 8, grad_accum_steps=4)
  # The suggestion is the nearest multiple (at least one unit); an empty batch is refused too.
  for size, problem, suggested in ((14, "is not divisible", 16), (0, "is not positive", 8),
                                   (-8, "is not positive", 8), (70, "is not divisible", 72)):
    with pytest.raises(ValueError,
                       match=rf"batch size {size} {problem}.* multiple of 8, e\.g\. {suggested}\.$"):
      parallel.check_batch_size(size, 8)


def test_global_batch_is_sharded_over_data():
  mesh = parallel.make_mesh(_config(-1))
  host = {"image": np.arange(16 * 3, dtype=np.float32).reshape(16, 3), "label": np.arange(16)}
  batch = parallel.global_batch(host, mesh)
  assert batch["image"].shape == (16, 3)
  assert {s.data.shape for s in batch["image"].addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(batch["label"]), host["label"])
  params = parallel.replicate({"w": np.ones(3)}, mesh)
  assert params["w"].sharding.is_fully_replicated


def test_sharded_batches_pad_the_last_batch_with_the_last_item():
  mesh = parallel.make_mesh(_config(4))
  y = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
  num_batches, batch = parallel.sharded_batches(y, 8, mesh)
  assert num_batches == 2
  first, last = batch(0), batch(1)
  assert {s.data.shape for s in first.addressable_shards} == {(2, 2)}
  np.testing.assert_array_equal(np.asarray(first), y[:8])
  np.testing.assert_array_equal(np.asarray(last), np.concatenate([y[8:], np.repeat(y[-1:], 6, 0)]))
  with pytest.raises(ValueError, match=r"batch size 6 .* 4 devices"):
    parallel.sharded_batches(y, 6, mesh)


def test_multihost_environment_detection(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "OMPI_COMM_WORLD_SIZE", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(k, raising=False)
  assert not parallel.is_multihost_env()
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel.is_multihost_env()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert parallel.is_multihost_env()
  monkeypatch.delenv("SLURM_NTASKS")
  # Each of the other markers alone: one MPI rank or one TPU worker is a single host.
  for name, single, several in (("OMPI_COMM_WORLD_SIZE", "1", "2"),
                                ("TPU_WORKER_HOSTNAMES", "w0", "w0,w1"),
                                ("JAX_COORDINATOR_ADDRESS", "", "10.0.0.1:1234")):
    monkeypatch.setenv(name, single)
    assert not parallel.is_multihost_env(), name
    monkeypatch.setenv(name, several)
    assert parallel.is_multihost_env(), name
    monkeypatch.delenv(name)


def _run_configured(code: str, xla_flags: str, host_cpu_devices: int = 3, mesh_flags=None,
                    cache_dir=None) -> str:
  """stdout of `code` run in a fresh process after `configure_xla` of the default mesh config
  (with `host_cpu_devices` and, if given, `mesh.xla_flags = mesh_flags`). With `cache_dir`:
  `mesh.compilation_cache_dir = cache_dir`, and the process does not inherit the tests' cache
  (conftest.py); programs are kept however fast they compiled."""
  setup = (f"from configs import default; from cdjax import parallel; m = default.get_config().mesh; "
           f"m.host_cpu_devices = {host_cpu_devices}; "
           + (f"m.xla_flags = {mesh_flags!r}; " if mesh_flags is not None else "")
           + (f"m.compilation_cache_dir = {cache_dir!r}; " if cache_dir is not None else "")
           + "parallel.configure_xla(m); import os, jax; ")
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  if cache_dir is not None:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  return subprocess.run([sys.executable, "-c", setup + code], env=env, capture_output=True,
                        text=True, check=True).stdout


@pytest.mark.parametrize("xla_flags,expected", [
    ("", "3 True"),                                                  # split as asked
    ("--xla_force_host_platform_device_count=5", "5 True"),          # the user's own count wins
    ("--xla_cpu_experimental_ynn_fusion_type=", "3 False"),          # so does the user's ynn value
])
def test_configure_xla_sets_device_count_and_flags_before_jax_starts(xla_flags, expected):
  out = _run_configured("print(len(jax.devices('cpu')), 'CONVOLUTION' in os.environ['XLA_FLAGS'])",
                        xla_flags)
  assert out.split("\n")[-2] == expected


def test_configure_xla_rejects_what_is_not_a_flag():
  c = default.get_config()
  c.mesh.xla_flags = "xla_cpu_use_xnnpack=true"
  with pytest.raises(ValueError, match="mesh.xla_flags.*--name=value"):
    parallel.configure_xla(c.mesh)


def test_compiler_options_of_train_steps_and_samplers(monkeypatch):
  """Train steps: on any CPU devices; samplers: on an unsplit CPU host only (on a split host XLA's
  own convolutions compute wrong samples when two programs run at once); the speech configs keep
  the process's flags. What XLA does not take raises, naming the config field."""
  c = default.get_config()
  one, two = jax.devices()[:1], jax.devices()[:2]
  gpus = [types.SimpleNamespace(platform="gpu")]
  ynn_reduce = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"}
  assert parallel.train_compiler_options(c.mesh, one) == ynn_reduce
  assert parallel.train_compiler_options(c.mesh, two) == ynn_reduce
  assert parallel.sample_compiler_options(c.mesh, one) == {}      # this host is split in 8
  monkeypatch.setattr(jax, "device_count", lambda: 1)
  assert parallel.sample_compiler_options(c.mesh, one) == ynn_reduce
  assert parallel.sample_compiler_options(c.mesh, two) == {}
  assert parallel.train_compiler_options(c.mesh, gpus) == parallel.sample_compiler_options(c.mesh, gpus) == {}
  assert parallel.sample_compiler_options(speech_keywords.get_config().mesh, one) == {}
  c.mesh.cpu_train_xla_flags = "--xla_cpu_enable_fast_math=false --xla_cpu_ftz=true"
  assert parallel.train_compiler_options(c.mesh, one) == {"xla_cpu_enable_fast_math": False,
                                                          "xla_cpu_ftz": True}
  c.mesh.cpu_train_xla_flags = ""
  assert parallel.train_compiler_options(c.mesh, one) == {}
  c.mesh.cpu_sample_xla_flags = "xla_cpu_ftz=true"
  with pytest.raises(ValueError, match="mesh.cpu_sample_xla_flags.*--name=value"):
    parallel.sample_compiler_options(c.mesh, one)
  for bad, xla_says in (("--xla_cpu_experimental_ynn_fusion_typo=LIBRARY_FUSION_TYPE_REDUCE",
                         "No such compile option"),
                        ("--xla_cpu_enable_fast_math=maybe", "not a valid bool")):
    c.mesh.cpu_train_xla_flags = bad
    with pytest.raises(ValueError, match=f"mesh.cpu_train_xla_flags='{bad}'.*{xla_says}"):
      parallel.train_compiler_options(c.mesh, one)


def test_configure_xla_after_start_changes_nothing(monkeypatch):
  assert jax.device_count() == 8     # backends are running
  monkeypatch.setenv("XLA_FLAGS", "")
  c = default.get_config()
  c.mesh.host_cpu_devices = 3
  parallel.configure_xla(c.mesh)
  assert os.environ["XLA_FLAGS"] == "" and jax.device_count() == 8


@pytest.mark.parametrize("xla_flags,host_cpu_devices,warns", [
    ("--xla_cpu_experimental_ynn_fusion_type=", 2, True),    # YNNPACK off, split host: wrong samples
    ("--xla_cpu_experimental_ynn_fusion_type= --xla_force_host_platform_device_count=3", 0, True),
    ("--xla_cpu_experimental_ynn_fusion_type=", 0, False),   # one device
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE", 2, True),  # XLA's convs
    ("--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE", 0, False),
    ("", 2, False),                                          # the default flags
])
def test_configure_xla_warns_about_xla_convolutions_on_a_split_host(monkeypatch, xla_flags,
                                                                    host_cpu_devices, warns):
  messages = []
  monkeypatch.setattr(parallel.logging, "warning", lambda msg, *args: messages.append(msg % args))
  monkeypatch.setenv("XLA_FLAGS", xla_flags)
  c = default.get_config()
  c.mesh.host_cpu_devices = host_cpu_devices
  parallel.configure_xla(c.mesh)
  assert any("wrong samples" in m for m in messages) == warns, messages


def network_outputs() -> dict:
  """{name: [max |out|, sum |out|]} of small versions of the image U-Net, the speech enhancer and
  NCSN++ (strided, 1x1 and FIR-resampling convolutions), and of a U-Net gradient."""
  unet = nets.get_network("coupled_unet", width=8, ch_mult=(1, 2), attn_levels=())
  enh = nets.get_network("resunet_enhancer", widths=(8, 16), strides=((2, 2),), groups=4)
  ncsn = nets.get_network("ncsnpp", nf=4, ch_mult=(1, 2), attn_resolutions=(), logit_hidden=0)

  rng = np.random.default_rng(0)
  x, t, l = rng.normal(size=(2, 28, 28, 1)).astype(np.float32), np.full((2,), 0.3), np.ones((2, 10))
  spec = (rng.normal(size=(2, 32, 16)) + 1j * rng.normal(size=(2, 32, 16))).astype(np.complex64)
  out = {}
  for name, net, args in (("unet", unet, (x, t, x, l)), ("enhancer", enh, (spec,)),
                          ("ncsnpp", ncsn, (spec, t, spec))):
    # Random parameters of the right shapes: compiling `net.init` takes 15-30 s on this CPU.
    shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), *args)
    params = jax.tree.map(lambda a: (0.2 * rng.normal(size=a.shape)).astype(a.dtype), shapes)
    out[name] = jax.jit(net.apply)(params, *args)
    if name == "enhancer":
      out[name] = out[name][0]
    if name == "unet":
      loss = lambda p: (net.apply(p, *args) ** 2).sum()
      out["grad"] = jax.jit(jax.grad(loss))(params)["params"]["enc_x"]["Conv_0"]["kernel"]
  return {k: [float(np.abs(v).max()), float(np.abs(v).sum())] for k, v in out.items()}


def test_default_ynnpack_convolutions_compute_the_same_networks():
  """The default mesh.xla_flags (YNNPACK convolutions, in a fresh process) against XLA's own
  kernels (this process)."""
  code = ("import json, sys; sys.path.insert(0, 'tests'); import parallel_test; "
          "print(json.dumps(parallel_test.network_outputs()))")
  ynn = json.loads(_run_configured(code, "", host_cpu_devices=0).split("\n")[-2])
  xla = network_outputs()
  assert "ynn" not in os.environ.get("XLA_FLAGS", "")
  for name in ("unet", "enhancer", "ncsnpp", "grad"):
    assert xla[name][0] > 1e-3, name                                  # a non-trivial output
    np.testing.assert_allclose(ynn[name], xla[name], rtol=1e-4, err_msg=name)


_CACHED_RUN = """
import json, sys, warnings
sys.path.insert(0, "tests")
import parallel_test
hits = []
jax.monitoring.register_event_listener(lambda e, **kw: hits.append(e) if e.endswith("/cache_hits") else None)
with warnings.catch_warnings(record=True) as w:
  warnings.simplefilter("always")
  out = parallel_test.network_outputs()
print(json.dumps(dict(dir=jax.config.jax_compilation_cache_dir, hits=len(hits), out=out,
                      warned=any("cache" in str(x.message) for x in w))))
"""


def test_compilation_cache_reloads_the_same_programs_per_host(tmp_path):
  """mesh.compilation_cache_dir: a second process loads the networks' programs the first one
  compiled (YNNPACK convolutions, FIR resampling, a gradient) from <dir>/<host_id> and computes
  the same outputs (max and sum of |out| equal to the last bit); unreadable entries are compiled
  again, with a warning."""
  run = lambda: json.loads(_run_configured(_CACHED_RUN, "", 0, cache_dir=str(tmp_path)).split("\n")[-2])
  cold = run()
  assert cold["dir"] == str(tmp_path / parallel.host_id()) and cold["hits"] == 0
  entries = list((tmp_path / parallel.host_id()).glob("*-cache"))
  assert len(entries) >= 4, entries                        # 3 networks and a gradient at least
  warm = run()
  assert warm["hits"] >= len(entries) and warm["out"] == cold["out"] and not warm["warned"]
  for entry in entries:
    entry.write_bytes(b"not a compiled program")
  corrupt = run()
  assert corrupt["hits"] == 0 and corrupt["out"] == cold["out"] and corrupt["warned"]


def test_compilation_cache_off_or_the_environments_own(tmp_path, monkeypatch):
  """An empty mesh.compilation_cache_dir turns the cache off, so does one that cannot be created;
  a JAX_COMPILATION_CACHE_DIR wins; the size limit is the config's."""
  last_line = lambda code, **kw: _run_configured(f"print({code})", "", 0, **kw).split("\n")[-2]
  assert default.get_config().mesh.compilation_cache_dir.startswith("~")   # on unless turned off
  assert last_line("jax.config.jax_compilation_cache_dir", cache_dir="") == "None"
  (tmp_path / "a_file").write_text("")
  unwritable = str(tmp_path / "a_file" / "cache")
  assert last_line("jax.config.jax_compilation_cache_dir", cache_dir=unwritable) == "None"
  assert last_line("jax.config.jax_compilation_cache_max_size", cache_dir=str(tmp_path)) == str(4 * 2**30)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
  assert last_line("jax.config.jax_compilation_cache_dir") == str(tmp_path / "mine")


def test_compilation_cache_configured_after_a_compilation_keeps_later_programs(tmp_path):
  """JAX looks for its cache directory when a program is compiled, not at start-up: a process
  that compiled before configure_compilation_cache still keeps what it compiles afterwards."""
  code = ("import jax; jax.jit(lambda v: v * 2)(1.0); from cdjax import parallel; "
          f"parallel.configure_compilation_cache({str(tmp_path)!r}, 1); "
          "jax.jit(lambda later: later * 3 + 1)(2.0)")
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  subprocess.run([sys.executable, "-c", code], env=env, check=True)
  assert list((tmp_path / parallel.host_id()).glob("jit__lambda-*-cache"))


def test_compilation_cache_settings_and_errors(tmp_path, monkeypatch):
  """What configure_compilation_cache sets in a JAX without a cache directory (this process's
  has the tests' one: a stand-in); a directory that cannot be created warns, naming it; a size
  <= 0 raises, naming the field."""
  messages, updates = [], []
  monkeypatch.setattr(parallel.logging, "warning", lambda msg, *args: messages.append(msg % args))
  monkeypatch.setattr(parallel, "jax", types.SimpleNamespace(config=types.SimpleNamespace(
      jax_compilation_cache_dir=None, update=lambda *a: updates.append(a))))
  parallel.configure_compilation_cache(str(tmp_path / "ok"), 0.5)
  assert updates == [("jax_compilation_cache_dir", str(tmp_path / "ok" / parallel.host_id())),
                     ("jax_compilation_cache_max_size", 2**29)] and not messages
  assert re.fullmatch(r"\w+-[0-9a-f]{12}", parallel.host_id())   # architecture-CPU hash
  (tmp_path / "a_file").write_text("")
  parallel.configure_compilation_cache(str(tmp_path / "a_file" / "cache"), 4)
  assert len(updates) == 2 and len(messages) == 1
  assert "cannot create" in messages[0] and str(tmp_path / "a_file") in messages[0]
  c = default.get_config()
  c.mesh.compilation_cache_max_gib = 0
  with pytest.raises(ValueError, match="mesh.compilation_cache_max_gib=0.*> 0"):
    parallel.configure_xla(c.mesh)
