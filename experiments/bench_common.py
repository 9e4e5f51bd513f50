"""Shared helpers of the issue-8 benchmarks: thread pinning (import this before jax and torch),
the PyTorch reference's device, timing (alone, or side by side in rounds), PyTorch's peak
memory, the machine's matmul peak, and merging entries into experiments/results/bench.{json,md}
(and the figure bench.png; another folder with BENCH_RESULTS_DIR).
`python experiments/bench_common.py` re-renders bench.md and bench.png from bench.json and
bench_notes.md.

Threads: BENCH_THREADS (default 2) sets OMP_NUM_THREADS / MKL_NUM_THREADS and torch's intra-op
threads; XLA:CPU keeps its default Eigen pool (`--xla_cpu_multi_thread_eigen` on), which is one
thread per core. Extra XLA flags come from the environment's XLA_FLAGS.

Accelerators: where JAX's default backend is a GPU, the PyTorch reference runs on CUDA
(`setup_torch`), both frameworks compute float32 convolutions and matmuls in full float32 (no
TF32: `full_float32`), results go to the section `<name>_gpu` (`section`) and `machine()` names
the GPU. Nothing changes on a CPU-only machine.
"""
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import time

THREADS = int(os.environ.setdefault("BENCH_THREADS", "2"))
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
  os.environ.setdefault(_var, str(THREADS))

# after the thread pinning (provenance imports jax only inside machine())
from cdjax import provenance  # noqa: E402

RESULTS_DIR = os.environ.get("BENCH_RESULTS_DIR") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results")


def load_average() -> str:
  one, five, fifteen = os.getloadavg()
  return f"{one:.2f}, {five:.2f}, {fifteen:.2f} (1/5/15 min) on {os.cpu_count()} cores"


def backend() -> str:
  """JAX's default backend: "cpu", "gpu" or "tpu"."""
  import jax
  return jax.default_backend()


def section(name: str) -> str:
  """The bench.json section of a run: `name` on a CPU, `name_<backend>` on an accelerator (so
  that a GPU run keeps the CPU tables, and the entry names stay the same in both)."""
  return name if backend() == "cpu" else f"{name}_{backend()}"


def full_float32() -> None:
  """On a GPU: JAX's float32 dots and convolutions at full float32 precision, as PyTorch's
  under `setup_torch` (both would otherwise pick TF32 for some of them). No-op on a CPU."""
  if backend() == "gpu":
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")


def accelerator_note(rest: str) -> list[str]:
  """The notes line of a run on an accelerator (where both frameworks ran, at which precision),
  ending with `rest`; [] on a CPU."""
  if backend() == "cpu":
    return []
  return [f"{backend()}: JAX and the PyTorch reference on the accelerator, float32 at full "
          f"precision in both (jax_default_matmul_precision=highest, torch TF32 off); {rest}"]


def setup_torch():
  """Imports torch for a reference run: BENCH_THREADS intra-op threads, seed 0, and its device:
  CUDA where JAX runs on a GPU (and torch sees one), else the CPU; on CUDA, TF32 off for matmuls
  and cuDNN convolutions. Returns (torch, device); the caller puts modules and tensors there
  (not `torch.set_default_device`: its function mode slows every eager op, 2x at batch 1)."""
  try:
    import torch
  except ImportError as e:
    raise ImportError("The PyTorch reference needs the bench extra: .venv/bin/python -m pip install "
                      "-e '.[bench]' (bench_sampler.py without it: --paths=scan,loop).") from e
  torch.set_num_threads(THREADS)
  torch.manual_seed(0)
  device = "cuda" if backend() == "gpu" and torch.cuda.is_available() else "cpu"
  if device == "cuda":
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
  return torch, device


def torch_blocking(fn):
  """fn() followed by a CUDA synchronise where torch runs on CUDA (its eager calls return before
  the GPU is done); returns fn's output."""
  import torch

  def run():
    out = fn()
    if torch.cuda.is_initialized():
      torch.cuda.synchronize()
    return out
  run.uses_torch = True   # `interleaved_runs` measures its memory
  return run


def configure_xla(mesh_config) -> None:
  """`parallel.configure_xla` without the config's persistent compilation cache, so that compile
  times are compilations (a JAX_COMPILATION_CACHE_DIR in the environment still wins:
  bench_compile_cache.py times cache loads with it)."""
  from cdjax import parallel   # pylint: disable=g-import-not-at-top  (after the thread pinning)
  mesh_config = mesh_config.copy_and_resolve_references()
  mesh_config.compilation_cache_dir = ""
  parallel.configure_xla(mesh_config)


def command(argv: list[str]) -> str:
  """The shell command that reproduces this run from the repository root."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  python = os.path.relpath(sys.executable, here) if sys.executable.startswith(here) else (
      os.path.basename(sys.executable))
  return f"PYTHONPATH=. {python} " + " ".join([os.path.relpath(argv[0], here)] + argv[1:])


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
  by side: one untimed first call each (one-time costs: buffer allocation, oneDNN primitive
  creation, ...; for PyTorch's, those `torch_blocking` made, under `PeakTorchMemory`), one
  untimed round (without it the image scan's first timed call took 86-88 ms, its later ones
  62-72 ms, session 62), then up to `repeats` rounds calling each once in turn, so that every one
  sees the same machine state (this VM's speed drifts by 10-30% within minutes), stopping after
  the first round whose timed calls brought the total past `budget_s` per callable. Rounds
  follow `round_order` (the untimed one in round 0's order), so that no callable always runs
  right after the same other one (in session 50, of two near-identical JAX paths, the one right
  after PyTorch's ran 4-9% slower; in session 62 the image scan at batch 1 ran 7% slower after
  PyTorch than after the per-step loop).
  Returns {name: dict(out=first output, sec=median, times, first_s, and for PyTorch's
  torch_peak_mib: its peak tensor memory during the first call)}."""
  res = {}
  for name, fn in runs.items():
    with PeakTorchMemory() if getattr(fn, "uses_torch", False) else contextlib.nullcontext() as mem:
      tic = time.perf_counter()
      out = fn()
      res[name] = dict(out=out, first_s=time.perf_counter() - tic, times=[])
    if mem is not None:
      res[name]["torch_peak_mib"] = mem.mib
  for name in round_order(list(runs), 0):
    runs[name]()
  for i in range(repeats):
    for name in round_order(list(runs), i):
      tic = time.perf_counter()
      runs[name]()
      res[name]["times"].append(time.perf_counter() - tic)
    if sum(sum(r["times"]) for r in res.values()) > budget_s * len(runs):
      break
  for r in res.values():
    r["sec"] = statistics.median(r["times"]) if r["times"] else float("nan")
  return res


def round_order(items: list, i: int) -> list:
  """`items` in the order of round i, row i of a Williams design: row 0 takes items 0, 1, n-1, 2,
  n-2, ...; row i adds i (mod n) to each; for odd n, rows n to 2n-1 are rows 0 to n-1 reversed.
  Over n rounds (2n for odd n) each item runs right after each other item equally often (a
  rotation of one order would keep every item after the same one)."""
  n = len(items)
  row = [(k + 1) // 2 if k % 2 else (n - k // 2) % n for k in range(n)]
  row = [(j + i) % n for j in row]
  if n % 2 and (i // n) % 2:
    row.reverse()
  return [items[j] for j in row]


def paired_ratio(a: dict, b: dict) -> float:
  """Median over the rounds of `interleaved_runs` of b's time / a's time: how many times faster
  a ran than b, each round compared with the one run beside it (robust to the machine's drift)."""
  return statistics.median(tb / ta for ta, tb in zip(a["times"], b["times"]))


class PeakTorchMemory:
  """Context manager: `.mib` is the peak of PyTorch's tensor memory allocated inside it, on top of
  what was allocated on entry: on CUDA from `torch.cuda.max_memory_allocated`; on a CPU, where
  torch keeps no allocator statistics, the running sum of the allocations and frees its profiler
  records (`profile_memory`; the profiled call runs slower). Memory that libraries take outside
  torch's allocator (oneDNN's scratch) is not counted, as XLA's temp buffers do not count
  YNNPACK's."""

  def __enter__(self):
    import torch
    self.cuda = torch.cuda if torch.cuda.is_initialized() else None
    if self.cuda:
      self.cuda.synchronize()
      self.cuda.reset_peak_memory_stats()
      self.base = self.cuda.memory_allocated()
    else:
      self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            profile_memory=True)
      self.profile.__enter__()
    return self

  def __exit__(self, *exc):
    if self.cuda:
      self.cuda.synchronize()
      self.mib = (self.cuda.max_memory_allocated() - self.base) / 2**20
      return False
    self.profile.__exit__(*exc)
    events = [e for e in self.profile.profiler.kineto_results.events() if e.name() == "[memory]"]
    allocated = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
      allocated += e.nbytes()   # negative for a free
      peak = max(peak, allocated)
    self.mib = peak / 2**20
    return False


def matmul_size() -> int:
  """n of the n x n matmul whose speed is the machine's peak: 2048 on a CPU, 8192 on an accelerator."""
  return 2048 if backend() == "cpu" else 8192


def matmul_peak(repeats: int = 5) -> dict:
  """Measured GFLOP/s of a `matmul_size()`^2 float32 matmul in jax and torch (if importable),
  each on its benchmark device."""
  import jax
  import jax.numpy as jnp
  n, out = matmul_size(), {}
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  sec, _ = timeit(lambda: dot(a, a).block_until_ready(), repeats, warmup=2)
  out["jax"] = 2 * n**3 / sec / 1e9
  try:
    torch, device = setup_torch()
  except ImportError:
    return out
  t = torch.randn(n, n, device=device)
  sec, _ = timeit(torch_blocking(lambda: torch.mm(t, t)), repeats, warmup=2)
  out["torch"] = 2 * n**3 / sec / 1e9
  return out


def entry(name: str, value: float, unit: str, baseline, ratio=None, **extra) -> dict:
  """One bench.json entry; `baseline` is a number (same unit) or a description; `ratio` defaults
  to value / baseline for a numeric baseline."""
  if ratio is None:
    ratio = value / baseline if isinstance(baseline, (int, float)) and baseline else float("nan")
  return dict(name=name, value=float(value), unit=unit, baseline=baseline, ratio=float(ratio), **extra)


def write_results(entries: list[dict], command: str, notes: list[str], section: str) -> str:
  """Merges `entries` into results/bench.json (replacing `section`'s entries from an earlier run;
  other sections keep theirs, also under the same names), records `command`, the commit, the
  machine, the library versions and `notes` under `section`, and rewrites results/bench.md.
  Returns the json path."""
  os.makedirs(RESULTS_DIR, exist_ok=True)
  path = os.path.join(RESULTS_DIR, "bench.json")
  data = {"command": "", "entries": [], "runs": {}}
  if os.path.exists(path):
    with open(path) as f:
      data.update(json.load(f))
  data["entries"] = [e for e in data["entries"] if e.get("section") != section] + entries
  data["runs"][section] = dict(command=command, **provenance.record(), notes=notes)
  data["command"] = " && ".join(r["command"] for r in data["runs"].values())
  data["machine"] = data["runs"][section]["machine"]
  with open(path, "w") as f:   # strict JSON: NaN (no ratio, no value) as null
    json.dump(_nan_to_none(data), f, indent=2, allow_nan=False)
  _write_md(data)
  return path


def _nan_to_none(tree):
  """`tree` (dicts, lists, numbers) with every NaN float replaced by None."""
  if isinstance(tree, dict):
    return {k: _nan_to_none(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return [_nan_to_none(v) for v in tree]
  return None if isinstance(tree, float) and tree != tree else tree


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if v != v:
      return "-"
    return f"{v:.4g}"
  return str(v)


# Issue 8's targets for the compiled trajectory: {(baseline path, batch): speed-up}.
TARGETS = {("torch_eager", 1): 3.0, ("torch_eager", 16): 1.2, ("torch_eager", 64): 1.0,
           ("step_loop", 1): 1.5}
# The paper's cost of each strategy relative to enhancement alone (issue 8: about 2x, 10x, 7x).
PAPER_COST = {"parallel": 2.0, "alternating5": 10.0, "nested": 7.0}


def _write_figure(data: dict) -> bool:
  """results/bench.png: per sampler section, the compiled trajectory's speed-up over each other
  path (median of paired rounds) at every batch size, issue 8's targets as black ticks; and the
  strategies' cost relative to enhancement alone (wall time, NFE, the paper's). False when
  bench.json has no sampler entries yet."""
  speedups, costs = {}, {}   # {section: {path: {batch: ratio}}}, {strategy: {cost|nfe: ratio}}
  for e in data["entries"]:
    m = re.fullmatch(r"(?:speech_)?sampler_jit_scan_vs_(torch_eager|torch_fir_sums|step_loop)_b(\d+)",
                     e["name"])
    if m:
      speedups.setdefault(e["section"], {}).setdefault(m[1], {})[int(m[2])] = e["ratio"]
    m = re.fullmatch(r"(parallel|alternating5|nested)_vs_enhance_(cost|nfe)", e["name"])
    if m and e.get("section") == "sampler":
      costs.setdefault(m[1], {})[m[2]] = e["ratio"]
  if not speedups:
    return False
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top
  panels = len(speedups) + bool(costs)
  fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), squeeze=False)
  for ax, (section, paths) in zip(axes[0], sorted(speedups.items())):
    batches = sorted({b for r in paths.values() for b in r})
    width = 0.8 / len(paths)
    for j, (path, ratios) in enumerate(sorted(paths.items())):
      present = [(i, b) for i, b in enumerate(batches) if b in ratios]
      xs = [i + (j - (len(paths) - 1) / 2) * width for i, _ in present]
      ax.bar(xs, [ratios[b] for _, b in present], width, label=f"vs {path.replace('_', ' ')}")
      for x, (_, b) in zip(xs, present):
        if (path, b) in TARGETS:
          ax.hlines(TARGETS[path, b], x - width / 2, x + width / 2, colors="k", linewidth=2)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    ax.set(xticks=range(len(batches)), xticklabels=[f"batch {b}" for b in batches],
           ylabel="speed-up of jit + scan (x)",
           title=f"{'speech' if 'speech' in section else 'images'}: section {section}")
    ax.legend(fontsize=8)
  if costs:
    ax, names = axes[0][-1], list(PAPER_COST)
    for j, (label, values) in enumerate((
        ("wall time", [costs.get(n, {}).get("cost", float("nan")) for n in names]),
        ("NFE", [costs.get(n, {}).get("nfe", float("nan")) for n in names]),
        ("paper", [PAPER_COST[n] for n in names]))):
      ax.bar([i + (j - 1) * 0.27 for i in range(len(names))], values, 0.27, label=label)
    ax.hlines(1.3, -0.4, -0.13, colors="k", linewidth=2)   # target: Parallel at most 1.3x
    ax.set(xticks=range(len(names)), xticklabels=["Parallel", "Alternating K=5", "Nested"],
           ylabel="cost / enhancement alone (x)", title="strategy cost (sampler)")
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS_DIR, "bench.png"), dpi=120)
  plt.close(fig)
  return True


def _write_md(data: dict) -> None:
  lines = ["# cdjax benchmarks (issue 8)", "",
           "Generated by the scripts below (`experiments/bench_common.py` rewrites this file and "
           "`bench.png` from `bench.json`; hand-written notes live in `bench_notes.md`).", "",
           f"Machine of the newest run: {data['machine']}", ""]
  if _write_figure(data):
    lines += ["![speed-ups of the compiled trajectory and strategy costs; black ticks: issue 8's "
              "targets](bench.png)", ""]
  for section, run in data["runs"].items():
    lines += [f"## {section}", "", "```", run["command"], "```", ""]
    if "machine" in run:
      commit = f", commit {run['commit']}" if "commit" in run else ""
      lines += [f"Machine: {run['machine']}{commit}", ""]
    if "software" in run:
      lines += [f"Software: {run['software']}", ""]
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


def render() -> None:
  """Rewrites results/bench.md and bench.png from bench.json and bench_notes.md as they stand
  (after a hand edit of the notes, or bench.json copied back from a lent GPU)."""
  with open(os.path.join(RESULTS_DIR, "bench.json")) as f:
    _write_md(json.load(f))


def run_json_subprocess(argv: list[str], env_extra: dict, timeout: float = 600) -> dict:
  """Runs a python command whose last stdout line is JSON; returns it (or {"error": ...})."""
  env = dict(os.environ, **env_extra)
  proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    return {"error": (proc.stderr or proc.stdout)[-2000:]}
  return json.loads(lines[-1])


if __name__ == "__main__":
  render()
