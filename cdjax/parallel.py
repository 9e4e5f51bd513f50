"""Data parallelism from the config: one `data` mesh axis over the devices of every host.

The batch is sharded over `data`, parameters are replicated; under `jax.jit` the gradient of the
global-batch mean is then averaged across devices (pmap semantics, no explicit `pmean`).
"""
import functools
import hashlib
import os
import platform

import jax
import ml_collections
import numpy as np
from absl import logging
from jax._src import xla_bridge
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdjax import provenance

DATA_AXIS = "data"


def is_multihost_env() -> bool:
  """True when the environment describes one process of a multi-host job (an explicit JAX
  coordinator, an MPI / SLURM job of several tasks, or a TPU slice of several workers)."""
  env = os.environ.get
  return bool(env("JAX_COORDINATOR_ADDRESS")
              or int(env("OMPI_COMM_WORLD_SIZE", "1")) > 1
              or int(env("SLURM_NTASKS", "1")) > 1
              or "," in env("TPU_WORKER_HOSTNAMES", ""))


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` (which auto-detects the cluster) in a multi-host job; a no-op
  on a single host or when already initialized. Call before any other JAX call."""
  if is_multihost_env() and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def configure_xla(mesh_config: ml_collections.ConfigDict) -> None:
  """Adds `mesh_config.xla_flags` (a string of `--flag=value`) and, for host_cpu_devices > 0,
  `--xla_force_host_platform_device_count=<host_cpu_devices>` to XLA_FLAGS. Splitting the host
  makes data parallelism spread the work over the cores of a CPU-only machine (XLA:CPU runs the
  small convolutions of these networks on about one core per device); accelerator backends are
  not affected. A flag already in XLA_FLAGS wins. Takes effect only before JAX's backends start;
  afterwards it warns and does nothing. Warns about flag combinations known to be wrong. Also
  turns on the persistent compilation cache (`configure_compilation_cache`)."""
  configure_compilation_cache(mesh_config.compilation_cache_dir,
                              mesh_config.compilation_cache_max_gib)
  wanted = _flags("mesh.xla_flags", mesh_config.xla_flags)
  if mesh_config.host_cpu_devices > 0:
    wanted.append(f"--xla_force_host_platform_device_count={mesh_config.host_cpu_devices}")
  current = os.environ.get("XLA_FLAGS", "")
  present = {f.split("=")[0] for f in current.split()}
  missing = [f for f in wanted if f.split("=")[0] not in present]
  _warn_on_known_xla_bugs(current.split() + missing)
  if not missing:
    return
  if xla_bridge.backends_are_initialized():
    logging.warning("mesh.xla_flags / host_cpu_devices ignored: JAX's backends are already "
                    "running (set XLA_FLAGS='%s' before starting instead).", " ".join(missing))
    return
  os.environ["XLA_FLAGS"] = " ".join([current] + missing).strip()


def configure_compilation_cache(path: str, max_gib: float) -> None:
  """Keeps every program that took >= 1 s to compile in `path`/<host_id()> (JAX's persistent
  compilation cache, least recently used entries evicted beyond `max_gib`), so a restarted or
  repeated job loads it instead of compiling again. "" turns it off; a cache directory JAX
  already has (JAX_COMPILATION_CACHE_DIR) wins. Programs compiled before the call are not kept,
  later ones are. Entries are native code for the CPU that compiled them, and JAX's cache key does
  not name the CPU: the per-host subdirectory keeps a cache on a shared filesystem from handing
  one machine another's code. An unreadable entry is compiled again, with JAX's warning ("Error
  reading persistent compilation cache entry"), each time until the directory is deleted. A
  local directory that cannot be created leaves the cache off, with a warning."""
  if not max_gib > 0:
    raise ValueError(f"mesh.compilation_cache_max_gib={max_gib}: give a size > 0 in GiB, or set "
                     "mesh.compilation_cache_dir='' to turn the cache off.")
  if not path or jax.config.jax_compilation_cache_dir:
    return
  path = os.path.join(os.path.expanduser(path), host_id())
  if "://" not in path:   # local (JAX also takes gs:// and other etils paths)
    try:
      os.makedirs(path, exist_ok=True)
    except OSError as e:
      logging.warning("mesh.compilation_cache_dir: cannot create %s (%s); compiling without the "
                      "persistent cache. Give a writable directory, or '' to turn it off.", path, e)
      return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_compilation_cache_max_size", int(max_gib * 2**30))


def host_id() -> str:
  """`<architecture>-<12 hex digits>`: names this host's CPU model and instruction-set features."""
  info = provenance.cpuinfo()
  cpu = "\n".join(f"{k}: {info[k]}" for k in ("model name", "flags", "Features") if k in info)
  digest = hashlib.sha256((cpu or platform.processor()).encode()).hexdigest()[:12]
  return f"{platform.machine()}-{digest}"


def _flags(name: str, flags: str) -> list:
  """The flags of the config string `name` ("--name=value ..."); ValueError for anything else."""
  flags = flags.split()
  bad = [f for f in flags if not f.startswith("--")]
  if bad:
    raise ValueError(f"{name}: {bad} are not XLA flags; write them as --name=value.")
  return flags


def _cpu_options(name: str, flags: str, devices) -> dict:
  """The config string `name`'s flags as {name: value} where `devices` are all CPUs, else {};
  ValueError naming `name` for what XLA does not take as a compile option."""
  flags = tuple(_flags(name, flags))
  devices = list(devices)
  if any(d.platform != "cpu" for d in devices):
    return {}
  return dict(_checked_cpu_options(name, flags, devices[0]))


@functools.lru_cache(maxsize=None)
def _checked_cpu_options(name: str, flags: tuple, device) -> tuple:
  """`flags` ("--name=value", ...) as ((name, value), ...), after XLA compiled a one-op program
  with them on `device`; true / false become Python bools (compile options take no lower-case
  bools, XLA_FLAGS does)."""
  bools = {"true": True, "false": False}
  options = tuple((k, bools.get(v.lower(), v))
                  for k, v in (f[2:].partition("=")[::2] for f in flags))
  if options:
    try:
      jax.jit(lambda v: v + 1, compiler_options=dict(options)).lower(
          jax.device_put(np.float32(0), device)).compile()
    except jax.errors.JaxRuntimeError as e:
      raise ValueError(f"{name}='{' '.join(flags)}': XLA does not take it as compile options "
                       f"({e}). Fix the flag's name or value, or set --config.{name}= to compile "
                       "with the process's XLA flags alone.") from e
  return options


def train_compiler_options(mesh_config: ml_collections.ConfigDict, devices) -> dict:
  """XLA options of a train step's program alone (`jax.jit(compiler_options=...)`) on `devices`
  (all CPUs: `mesh_config.cpu_train_xla_flags`, else {}). Their default, YNNPACK for reductions
  only (XLA's own convolutions), makes train steps 1.0-1.4x faster than `mesh.xla_flags`' YNNPACK
  convolutions, which suit sharded sampling (experiments/results/bench_notes.md)."""
  return _cpu_options("mesh.cpu_train_xla_flags", mesh_config.cpu_train_xla_flags, devices)


def sample_compiler_options(mesh_config: ml_collections.ConfigDict, devices) -> dict:
  """XLA options of a sampler's program alone on `devices`: `mesh_config.cpu_sample_xla_flags`
  where that is the one device of an unsplit CPU host, else {}. The image default (XLA's own
  convolutions, which use every core) samples 1.1x faster there than `mesh.xla_flags`; on a
  split host those convolutions compute wrong samples whenever two programs run on its devices
  at once, sharded or not (the XLA bug `_warn_on_known_xla_bugs` names), and the speech configs
  keep YNNPACK's (faster for NCSN++)."""
  devices = list(devices)
  if len(devices) != 1 or jax.device_count() != 1:
    return {}
  return _cpu_options("mesh.cpu_sample_xla_flags", mesh_config.cpu_sample_xla_flags, devices)


def _warn_on_known_xla_bugs(xla_flags: list) -> None:
  """Warns about XLA flag combinations known to compute wrong results on this project's jaxlib."""
  value = dict(f.partition("=")[::2] for f in xla_flags)
  devices = int(value.get("--xla_force_host_platform_device_count") or 1)
  ynn = value.get("--xla_cpu_experimental_ynn_fusion_type")
  if ynn is not None and "CONVOLUTION" not in ynn and devices > 1:
    logging.warning(
        "XLA_FLAGS leave convolutions to XLA's own kernels (--xla_cpu_experimental_ynn_fusion_type"
        "=%s) on a host split into %d devices: with jaxlib 0.10.2 two programs running on them at "
        "once (a sampler sharded over them, or one per device) compute wrong samples (after about "
        "20 steps of a U-Net trajectory; see experiments/results/bench_notes.md). Keep the "
        "default mesh.xla_flags, or set mesh.host_cpu_devices=0.", ynn, devices)


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """A 1-D mesh with axis `data` over `config.mesh.data` devices (-1: every device of every host)."""
  devices = jax.devices()
  n = config.mesh.data
  if n == -1:
    n = len(devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.mesh.data={config.mesh.data} must be -1 or in [1, {len(devices)}] "
                     f"(the number of devices).")
  return Mesh(np.asarray(devices[:n]), (DATA_AXIS,))


def check_batch_size(global_batch_size: int, n: int, grad_accum_steps: int = 1) -> None:
  """Raises ValueError unless the global batch splits evenly into `grad_accum_steps`
  micro-batches, each divisible by the n devices it is sharded over (`mesh.size`)."""
  unit = n * grad_accum_steps
  if global_batch_size <= 0 or global_batch_size % unit:
    accum = f" x {grad_accum_steps} gradient-accumulation steps" if grad_accum_steps > 1 else ""
    problem = ("is not positive" if global_batch_size <= 0 else
               f"is not divisible by the {n} devices{accum} (= {unit})")
    raise ValueError(
        f"Global batch size {global_batch_size} {problem}; use a multiple of {unit}, e.g. "
        f"{max(unit, round(global_batch_size / unit) * unit)}.")


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array (parameters, optimizer state, RNG, step)."""
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  """The leading (batch) dimension is split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def sharded_batches(y: np.ndarray, batch_size: int, mesh: Mesh):
  """Inputs y [N, ...] in batches of `batch_size` (the last one padded with copies of y's last
  item), each sharded over `data`: (number of batches, batch(b) -> array [batch_size, ...]).
  Raises ValueError unless the mesh's devices divide `batch_size`."""
  check_batch_size(batch_size, mesh.size)
  pad = -len(y) % batch_size
  y = np.concatenate([y, np.repeat(y[-1:], pad, 0)]) if pad else y
  sharding = data_sharded(mesh)
  return len(y) // batch_size, lambda b: jax.device_put(y[b * batch_size:(b + 1) * batch_size],
                                                        sharding)


def global_batch(batch, mesh: Mesh):
  """This host's batch (a pytree of numpy [B_host, ...]) -> global arrays [B, ...] sharded on
  `data`; B = B_host x number of hosts taking part in the mesh."""
  sharding = data_sharded(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      batch)


def replicate(tree, mesh: Mesh):
  """Places a pytree of arrays on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
