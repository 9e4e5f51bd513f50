import os
import shutil
import tempfile

import pytest

# Every test process sees 8 host CPU devices, so sharding tests run on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax   # pylint: disable=g-import-not-at-top   (after XLA_FLAGS; no backend starts here)

# One persistent XLA compilation cache for the whole run: pytest's process (which loads this file
# before it starts the xdist workers), its workers and the subprocesses tests start all inherit the
# directory, so a program that several tests compile (same HLO, shapes and flags) compiles once.
# Most of the suite's time is XLA compiling small networks. Removed when the run ends. Entries
# are compressed with zstandard (a dependency): zlib took 14 of one test's 160 s.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cdjax-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


# The slowest files first (seconds summed over a file's tests, 2-core AMD EPYC, one `make test`):
# xdist hands out whole files (`--dist loadfile --no-loadscope-reorder`) in this order, so the
# run does not end with one worker busy on a long file while the other idles.
SLOWEST_FILES = ("paper_configs_test.py",        # 237 s
                 "speech_test.py",               # 186
                 "bench_test.py",                # 170
                 "speech_enhancement_test.py",   # 157
                 "train_test.py",                # 125
                 "nets_image_test.py",           # 121
                 "experiment_test.py")           # 110; every other file < 85


def pytest_collection_modifyitems(items):
  rank = lambda item: (SLOWEST_FILES.index(item.path.name) if item.path.name in SLOWEST_FILES
                       else len(SLOWEST_FILES))
  items.sort(key=rank)   # stable: within a file, and among the other files, as collected


def pytest_runtest_setup(item):
  """XLA compiles without its LLVM optimisations (jax_disable_most_optimizations, inherited by the
  subprocesses a test starts) unless the test is marked `optimized`. Most tests compile networks
  and run them a few times: unoptimised, an NCSN++ gradient compiles in 5.5 s instead of 10 and
  the suite took 12.1 min instead of 18.0. Tests that run thousands of steps (samplers against
  analytic scores, SDE simulations, training to an accuracy) are marked `optimized`: they run
  2-3x slower unoptimised. Set before the test's fixtures, so a module fixture follows its first test."""
  optimized = item.get_closest_marker("optimized") is not None
  jax.config.update("jax_disable_most_optimizations", not optimized)
  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "0" if optimized else "1"


@pytest.fixture
def files_under():
  """A function: directory -> sorted (path, size, mtime_ns) of everything under it; equal
  before and after a call means the call wrote nothing there."""
  def stamps(directory: str) -> list:
    paths = [os.path.join(root, n) for root, dirs, files in os.walk(directory) for n in dirs + files]
    return sorted((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
  return stamps
