"""Shared helpers of the issue-8 benchmarks: thread pinning (import this before jax and torch),
timing (alone, or side by side in rounds), peak-RSS sampling, the machine's matmul peak, and
merging entries into experiments/results/bench.{json,md}.

Threads: BENCH_THREADS (default 2) sets OMP_NUM_THREADS / MKL_NUM_THREADS and torch's intra-op
threads; XLA:CPU keeps its default Eigen pool (`--xla_cpu_multi_thread_eigen` on), which is one
thread per core. Extra XLA flags come from the environment's XLA_FLAGS.
"""
import gc
import json
import os
import platform
import statistics
import subprocess
import threading
import time

THREADS = int(os.environ.setdefault("BENCH_THREADS", "2"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, str(THREADS))

import psutil  # noqa: E402

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  mem = psutil.virtual_memory().total / 2**30
  return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB, {platform.system()} {platform.release()}"


def timeit(fn, repeats: int, warmup: int = 1, budget_s: float = float("inf")):
  """(median seconds, all timings) of `fn()` (which must block until its result is ready):
  `warmup` untimed calls, then `repeats` timed ones, stopping early (after at least one) once
  the timed calls have used `budget_s` seconds."""
  for _ in range(warmup):
    fn()
  times = []
  if repeats <= 0 or budget_s <= 0:
    return float("nan"), times
  for _ in range(repeats):
    tic = time.perf_counter()
    fn()
    times.append(time.perf_counter() - tic)
    if sum(times) > budget_s:
      break
  return statistics.median(times), times


def interleaved_runs(runs: dict, repeats: int, budget_s: float = float("inf")) -> dict:
  """Times the callables `runs` ({name: fn() blocking until its result is ready}) alike and side
  by side: one untimed first call each under PeakRSS (one-time costs: buffer allocation, oneDNN
  primitive creation, ...), then up to `repeats` rounds calling each once in turn, so that every
  one sees the same machine state (this VM's speed drifts by 10-30% within minutes), stopping
  after the first round whose timed calls brought the total past `budget_s` per callable.
  Returns {name: dict(out=first output, sec=median, times, first_s, rss_delta_mib)}."""
  res = {}
  for name, fn in runs.items():
    with PeakRSS() as rss:
      tic = time.perf_counter()
      out = fn()
      res[name] = dict(out=out, first_s=time.perf_counter() - tic, times=[])
    res[name]["rss_delta_mib"] = rss.delta_mib
  for _ in range(repeats):
    for name, fn in runs.items():
      tic = time.perf_counter()
      fn()
      res[name]["times"].append(time.perf_counter() - tic)
    if sum(sum(r["times"]) for r in res.values()) > budget_s * len(runs):
      break
  for r in res.values():
    r["sec"] = statistics.median(r["times"]) if r["times"] else float("nan")
  return res


def paired_ratio(a: dict, b: dict) -> float:
  """Median over the rounds of `interleaved_runs` of b's time / a's time: how many times faster
  a ran than b, each round compared with the one run beside it (robust to the machine's drift)."""
  return statistics.median(tb / ta for ta, tb in zip(a["times"], b["times"]))


class PeakRSS:
  """Context manager sampling this process's RSS every `interval` s; `.delta_mib` is the peak
  minus the RSS on entry (after a gc)."""

  def __init__(self, interval: float = 0.002):
    self.interval, self.proc = interval, psutil.Process()

  def __enter__(self):
    gc.collect()
    self.base = self.peak = self.proc.memory_info().rss
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def _poll(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, self.proc.memory_info().rss)
      time.sleep(self.interval)

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, self.proc.memory_info().rss)
    self.delta_mib = (self.peak - self.base) / 2**20
    return False


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict:
  """Measured GFLOP/s of an n x n float32 matmul in jax (XLA:CPU) and torch (if importable)."""
  import jax
  import jax.numpy as jnp
  out = {}
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  sec, _ = timeit(lambda: dot(a, a).block_until_ready(), repeats, warmup=2)
  out["jax"] = 2 * n**3 / sec / 1e9
  try:
    import torch
    t = torch.randn(n, n)
    sec, _ = timeit(lambda: torch.mm(t, t), repeats, warmup=2)
    out["torch"] = 2 * n**3 / sec / 1e9
  except ImportError:
    pass
  return out


def entry(name: str, value: float, unit: str, baseline, ratio=None, **extra) -> dict:
  """One bench.json entry; `baseline` is a number (same unit) or a description; `ratio` defaults
  to value / baseline for a numeric baseline."""
  if ratio is None:
    ratio = value / baseline if isinstance(baseline, (int, float)) and baseline else float("nan")
  return dict(name=name, value=float(value), unit=unit, baseline=baseline, ratio=float(ratio), **extra)


def write_results(entries: list[dict], command: str, notes: list[str], section: str) -> str:
  """Merges `entries` into results/bench.json (replacing `section`'s entries from an earlier run
  and same-name ones), records `command` and `notes` under `section`, and rewrites
  results/bench.md. Returns the json path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, "bench.json")
  data = {"command": "", "machine": machine(), "entries": [], "runs": {}}
  if os.path.exists(path):
    with open(path) as f:
      data.update(json.load(f))
  names = {e["name"] for e in entries}
  data["entries"] = [e for e in data["entries"]
                     if e["name"] not in names and e.get("section") != section] + entries
  data["runs"][section] = dict(command=command, machine=machine(), notes=notes)
  data["command"] = " && ".join(r["command"] for r in data["runs"].values())
  data["machine"] = machine()
  with open(path, "w") as f:
    json.dump(data, f, indent=2)
  _write_md(data)
  return path


def _fmt(v) -> str:
  if isinstance(v, float):
    if v != v:
      return "-"
    return f"{v:.4g}"
  return str(v)


def _write_md(data: dict) -> None:
  lines = ["# cdjax benchmarks (issue 8)", "",
           "Generated by the scripts below (`experiments/bench_common.py` rewrites this file from "
           "`bench.json`; hand-written notes live in `bench_notes.md`).", "",
           f"Machine of the newest run: {data['machine']}", ""]
  for section, run in data["runs"].items():
    lines += [f"## {section}", "", "```", run["command"], "```", ""]
    if "machine" in run:
      lines += [f"Machine: {run['machine']}", ""]
    lines += [f"- {n}" for n in run["notes"]] + [""]
    lines += ["| name | value | unit | baseline | ratio |", "|---|---|---|---|---|"]
    for e in data["entries"]:
      if e.get("section", section) == section:
        lines.append(f"| {e['name']} | {_fmt(e['value'])} | {e['unit']} | {_fmt(e['baseline'])} "
                     f"| {_fmt(e['ratio'])} |")
    lines.append("")
  notes = os.path.join(RESULTS_DIR, "bench_notes.md")
  if os.path.exists(notes):
    with open(notes) as f:
      lines += [f.read()]
  with open(os.path.join(RESULTS_DIR, "bench.md"), "w") as f:
    f.write("\n".join(lines))


def run_json_subprocess(argv: list[str], env_extra: dict, timeout: float = 600) -> dict:
  """Runs a python command whose last stdout line is JSON; returns it (or {"error": ...})."""
  env = dict(os.environ, **env_extra)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return {"error": (proc.stderr or proc.stdout)[-2000:]}
  return json.loads(lines[-1])
