"""Where a result came from: the machine it ran on, the code's git commit and the versions of the
libraries that ran it. Results files and benchmarks record all three, so that a number that moves
between runs can be traced to a different CPU, commit or library (a lent GPU machine runs its
image's jax and torch, not the pins)."""
from importlib import metadata
import os
import platform
import subprocess


def machine() -> str:
  """CPU model with its family / model numbers and widest vector ISA (this VM's bare "AMD EPYC"
  has been machines whose 2048^2 matmul ran at 87 to 475 GFLOP/s), cores, memory and OS; plus
  the accelerators where JAX's default backend is not the CPU (call it after XLA's flags are
  set)."""
  cpu = platform.processor() or platform.machine()
  info = cpuinfo()
  if "model name" in info and "flags" in info:
    flags = info["flags"].split()
    isa = ["AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"]
    isa += ["AMX"] if "amx_tile" in flags else []
    model = f"family {info['cpu family']} model {info['model']}, " if (
        "cpu family" in info and "model" in info) else ""
    cpu = f"{info['model name']} ({model}{' + '.join(isa)})"
  mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  host = f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"
  import jax
  backend = jax.default_backend()
  if backend == "cpu":
    return host
  return f"{len(jax.devices())} x {jax.devices()[0].device_kind} ({backend}); host: {host}"


def cpuinfo() -> dict:
  """/proc/cpuinfo's fields as {name: value} (its last processor's; {} where there is none)."""
  try:
    with open("/proc/cpuinfo") as f:
      return {k.strip(): v.strip() for k, v in (l.split(":", 1) for l in f if ":" in l)}
  except OSError:
    return {}


def software(packages=("jax", "jaxlib", "flax", "torch")) -> str:
  """"Python 3.11.7; jax 0.10.2, ..." for those of `packages` installed (others left out)."""
  versions = []
  for name in packages:
    try:
      versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pass
  return f"Python {platform.python_version()}; " + ", ".join(versions)


def record() -> dict:
  """{"commit", "machine", "software"}: what results files and benchmark sections record."""
  return dict(commit=git_commit(), machine=machine(), software=software())


def git_commit(directory: str = os.path.dirname(os.path.abspath(__file__))) -> str:
  """The commit of the git checkout that holds `directory` (default: this package's code, the code
  that ran), with "+changes" where tracked files anywhere in it differ from it, except results
  files (experiments/results, which the scripts themselves rewrite); "unknown" outside a checkout
  or without git."""
  try:
    run = lambda *args: subprocess.run(["git", "-C", directory, *args], capture_output=True,
                                       text=True, check=True).stdout.strip()
    return run("rev-parse", "--short", "HEAD") + (
        "+changes" if run("status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                          ":(top,exclude)experiments/results") else "")
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
