import os
import shutil
import tempfile

# Every test process sees 8 host CPU devices, so sharding tests run on one CPU.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

# One persistent XLA compilation cache for the whole run: pytest's process (which loads this file
# before it starts the xdist workers), its workers and the subprocesses tests start all inherit the
# directory, so a program that several tests compile (same HLO, shapes and flags) compiles once.
# Most of the suite's time is XLA compiling small networks. Removed when the run ends.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cdjax-test-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
