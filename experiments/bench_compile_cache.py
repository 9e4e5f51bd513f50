"""Persistent compilation cache (`mesh.compilation_cache_dir`): what a second run of the same job
saves. For each config, `bench_sampler.py` (the Parallel sampler's scan at batch 1, timed once)
and, for images, `bench_train.py --worker` (the signal train step) run in fresh processes, first
with an empty cache directory (cold) and then again with the cache the first run wrote (warm).
Reports the compile seconds each prints (lower + compile, or a cache load), each process's wall
time and the cache's size; medians over `--rounds`, each round from a new empty directory.

PYTHONPATH=. .venv/bin/python experiments/bench_compile_cache.py

The runs get the cache through JAX_COMPILATION_CACHE_DIR (which wins over the config's, see
`parallel.configure_compilation_cache`), with JAX's default of keeping the programs that took
>= 1 s to compile. Writes the section `compile_cache` of experiments/results/bench.{json,md}.
"""
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402  (pins threads before jax / torch are imported)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["configs/mnist_demo.py", "configs/speech_keywords.py"],
                             "Configs to run; the train step too where the path does not "
                             "name speech.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Rounds (cold then warm), each from an empty cache.")
_CHILD_FLAGS = flags.DEFINE_list("child_flags", [], "Config overrides for every run, e.g. "
                                 "--config.signal.batch_size=4 (what the sampler and train step read).")

_HERE = os.path.dirname(os.path.abspath(__file__))


def jobs(config: str) -> dict:
  """{job name: (command, fn(its JSON) -> compile seconds)} for `config`."""
  sampler = [sys.executable, os.path.join(_HERE, "bench_sampler.py"), f"--config={config}",
             "--json_only", "--paths=scan", "--batches=1", "--repeats=1", "--strategy_batch=0",
             "--breakdown_batch=0", *_CHILD_FLAGS.value]
  out = {"sampler_b1": (sampler, lambda r: r["parallel"]["1"]["scan"]["compile_s"])}
  if "speech" not in config:
    out["train_step"] = ([sys.executable, os.path.join(_HERE, "bench_train.py"),
                          f"--config={config}", "--worker", "--steps=1", *_CHILD_FLAGS.value],
                         lambda r: r["compile_s"])
  return out


def timed_run(cmd: list, cache_dir: str) -> tuple:
  """(the command's JSON, wall seconds) with JAX's cache in `cache_dir`."""
  tic = time.perf_counter()
  out = bc.run_json_subprocess(cmd, {"JAX_COMPILATION_CACHE_DIR": cache_dir}, timeout=3600)
  wall = time.perf_counter() - tic
  if "error" in out:
    raise RuntimeError(f"{' '.join(cmd)} failed: {out['error']}")
  return out, wall


def dir_mib(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2**20


def measure(cmd: list, compile_s, rounds: int) -> dict:
  """Medians over `rounds` of the cold and warm runs' compile and wall seconds, and the cache's
  MiB after the cold run."""
  runs = {k: [] for k in ("cold_compile_s", "warm_compile_s", "cold_wall_s", "warm_wall_s", "mib")}
  for _ in range(rounds):
    with tempfile.TemporaryDirectory(prefix="cdjax-bench-cache-") as cache:
      for kind in ("cold", "warm"):
        out, wall = timed_run(cmd, cache)
        runs[f"{kind}_compile_s"].append(compile_s(out))
        runs[f"{kind}_wall_s"].append(wall)
        if kind == "cold":
          runs["mib"].append(dir_mib(cache))
  return {k: statistics.median(v) for k, v in runs.items()}


def main(argv):
  del argv
  os.chdir(os.path.dirname(_HERE))   # the configs' paths are relative to the repository root
  entries, load_before = [], bc.load_average()
  for config in _CONFIGS.value:
    tag = os.path.splitext(os.path.basename(config))[0]
    for job, (cmd, compile_s) in jobs(config).items():
      m = measure(cmd, compile_s, _ROUNDS.value)
      print(f"{tag} {job}:", m, file=sys.stderr, flush=True)
      name = f"compile_cache_{tag}_{job}"
      entries += [
          bc.entry(f"{name}_compile_cold_vs_warm", m["cold_compile_s"], "s",
                   m["warm_compile_s"], note="compile without / with the cache"),
          bc.entry(f"{name}_process_cold_vs_warm", m["cold_wall_s"], "s", m["warm_wall_s"],
                   note="the whole process's wall time without / with the cache"),
          bc.entry(f"{name}_cache_mib", m["mib"], "MiB", "cache written by the cold run")]
  notes = [f"{_ROUNDS.value} rounds, medians; ratio = cold / warm (the speed-up of a second run)",
           f"load average before / after: {load_before} / {bc.load_average()}"]
  section = bc.section("compile_cache")
  print(bc.write_results([dict(e, section=section) for e in entries], bc.command(sys.argv), notes,
                         section))


if __name__ == "__main__":
  app.run(main)
