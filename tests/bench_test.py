"""The issue-8 benchmark scripts end to end at toy sizes (a few steps, batches 1-4), writing into a
temporary folder (BENCH_RESULTS_DIR): what the timed runs and a lent GPU's one call
(experiments/device_bench.sh) rely on. Timings at these sizes mean nothing; the test checks what
does not depend on them: the per-step loop equals the scan, the NFE of each strategy, memory
saved by gradient accumulation, the sharded train step's loss, and the files written."""
import collections
import json
import math
import os
import subprocess
import sys

from cdjax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interleaved_runs_follow_a_williams_design_after_an_untimed_round():
  """First calls, an untimed round in round 0's order, then the timed rounds; over n rounds (2n
  for odd n) every callable runs right after every other one equally often within the rounds."""
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_common   # pylint: disable=g-import-not-at-top
  calls = []
  runs = {name: (lambda name=name: calls.append(name)) for name in "abcd"}
  timed = bench_common.interleaved_runs(runs, repeats=3)
  assert "".join(calls) == "abcd" + "abdc" + "abdc" + "bcad" + "cdba"
  assert [len(r["times"]) for r in timed.values()] == [3, 3, 3, 3]
  for n in range(2, 8):
    rounds = [bench_common.round_order(list(range(n)), i) for i in range(n if n % 2 == 0 else 2 * n)]
    assert all(sorted(r) == list(range(n)) for r in rounds), n
    pairs = collections.Counter((r[k], r[k + 1]) for r in rounds for k in range(n - 1))
    assert len(pairs) == n * (n - 1) and len(set(pairs.values())) == 1, (n, pairs)


def _bench_common(monkeypatch, ticks=None):
  """experiments/bench_common.py; with `ticks`, its clock (time.perf_counter) returns them in turn."""
  if os.path.join(ROOT, "experiments") not in sys.path:
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_common   # pylint: disable=g-import-not-at-top
  if ticks is not None:
    it = iter(ticks)
    monkeypatch.setattr(bench_common.time, "perf_counter", lambda: next(it))
  return bench_common


def test_timing_arithmetic_medians_per_round_ratios_and_budgets(monkeypatch):
  """The numbers every table reports, on hand-made timings: medians (not means) of the timed
  calls; paired_ratio the median over rounds of b's time / a's (not the ratio of medians or a
  mean); interleaved_runs stopping after the round that brings the total past budget_s per
  callable; entry's default ratio value / baseline, NaN without a numeric nonzero baseline."""
  bc = _bench_common(monkeypatch, ticks=[0, 1, 1, 2, 2, 6, 6, 100])   # calls of 1, 1, 4 s
  assert bc.timeit(lambda: None, repeats=3, warmup=0) == (1.0, [1, 1, 4])
  bc = _bench_common(monkeypatch, ticks=[0, 1, 1, 5, 5, 100])   # 1 s, then 4 s: past 3 s
  assert bc.timeit(lambda: None, repeats=9, warmup=0, budget_s=3.0) == (2.5, [1, 4])
  calls = []
  sec, times = bc.timeit(lambda: calls.append(1), repeats=9, warmup=2, budget_s=0)
  assert math.isnan(sec) and times == [] and len(calls) == 2   # no budget: the warm-up only

  a, b = dict(times=[1.0, 2.0, 4.0]), dict(times=[2.0, 2.0, 24.0])   # per round: 2, 1, 6
  assert bc.paired_ratio(a, b) == 2.0

  # first calls (2 x 2 ticks), then rounds of 1 s + 1 s: 2 s per round, budget 1.5 s x 2 callables
  bc = _bench_common(monkeypatch, ticks=[0, 0, 0, 0] + list(range(100)))
  timed = bc.interleaved_runs({"x": lambda: None, "y": lambda: None}, repeats=9, budget_s=1.5)
  assert [r["times"] for r in timed.values()] == [[1, 1], [1, 1]] and timed["x"]["sec"] == 1
  # rounds x y, y x, x y; x's calls take 1, 1, 4 s: its median 1 s (mean 2 s)
  bc = _bench_common(monkeypatch, ticks=[0, 0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 8, 8, 9])
  timed = bc.interleaved_runs({"x": lambda: None, "y": lambda: None}, repeats=3)
  assert timed["x"]["times"] == [1, 1, 4] and timed["x"]["sec"] == 1

  assert bc.entry("n", 6, "s", 3)["ratio"] == 2.0
  assert bc.entry("n", 6, "s", 3, ratio=0.5, section="s")["ratio"] == 0.5
  for baseline in (0, "a description"):
    assert math.isnan(bc.entry("n", 6, "s", baseline)["ratio"])


def test_write_results_replaces_only_its_own_section_and_writes_nan_as_null(tmp_path, monkeypatch):
  """A rerun of a section replaces that section's entries and keeps the others' (also those of
  the same name); the header names the newest run's machine; NaN values and ratios become JSON
  null and "-" in bench.md's tables."""
  bc = _bench_common(monkeypatch)
  monkeypatch.setattr(bc, "RESULTS_DIR", str(tmp_path))
  machines = iter(["m1", "m2", "m3"])
  monkeypatch.setattr(bc.provenance, "record",
                      lambda: dict(commit="abc", machine=next(machines), software="sw"))
  bc.write_results([bc.entry("t", 1.0, "s", 2.0, section="a")], "cmd_a", ["note a"], "a")
  bc.write_results([bc.entry("t", 3.0, "s", 4.0, section="b")], "cmd_b", [], "b")
  assert json.loads((tmp_path / "bench.json").read_text())["machine"] == "m2"   # the newest run's
  bc.write_results([bc.entry("t", 5.0, "s", "desc", section="a"),
                    bc.entry("u", float("nan"), "s", 1.0, section="a")], "cmd_a2", [], "a")
  with open(tmp_path / "bench.json") as f:
    data = json.load(f)
  assert [(e["section"], e["name"], e["value"], e["ratio"]) for e in data["entries"]] == [
      ("b", "t", 3.0, 0.75), ("a", "t", 5.0, None), ("a", "u", None, None)]
  assert data["command"] == "cmd_a2 && cmd_b"
  assert data["machine"] == "m3" and data["runs"]["b"]["machine"] == "m2"
  md = (tmp_path / "bench.md").read_text()
  assert "Machine of the newest run: m3" in md
  assert "| t | 5 | s | desc | - |" in md and "| u | - | s | 1 | - |" in md
  assert "| t | 3 | s | 4 | 0.75 |" in md and "note a" not in md


def _run(script: str, results_dir, *args: str) -> None:
  """experiments/<script> with `args`, writing into `results_dir`; the config's own XLA flags
  and host split (no XLA_FLAGS from the test process)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(BENCH_RESULTS_DIR=str(results_dir), PYTHONPATH=ROOT)
  out = subprocess.run([sys.executable, os.path.join("experiments", script), *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def _entries(results_dir, section: str) -> dict:
  with open(os.path.join(results_dir, "bench.json")) as f:
    data = json.load(f)
  return {e["name"]: e for e in data["entries"] if e["section"] == section}


def test_image_sampler_and_train_benchmarks_write_one_merged_table(tmp_path, files_under):
  committed = os.path.join(ROOT, "experiments", "results")
  before = files_under(committed)
  _run("bench_sampler.py", tmp_path, "--config=configs/mnist_demo.py", "--steps=4",
       "--config.sampling.nested_steps=(2,1)", "--batches=1,2", "--paths=scan,loop",
       "--repeats=1", "--budget_s=0", "--strategy_batch=2", "--strategy_repeats=1",
       "--breakdown_batch=0")
  _run("bench_train.py", tmp_path, "--config=configs/mnist_demo.py", "--batch=4", "--steps=1",
       "--rounds=1", "--variants=accum2", "--host_devices=2", "--split_rounds=1", "--torch=false")
  assert files_under(committed) == before   # the committed tables are untouched

  sampler = _entries(tmp_path, "sampler")
  for b in (1, 2):   # the demo splits the host in 2: batch 2 is sharded, batch 1 is not
    assert sampler[f"sampler_jit_scan_vs_step_loop_b{b}"]["ratio"] > 0
    assert sampler[f"sampler_step_loop_max_abs_diff_vs_scan_b{b}"]["value"] < 1e-5
  # 4 steps: Parallel 4 + 4, Alternating 5 x (4 + 4), Nested 3 signal runs + 1 logit run
  assert {n: sampler[f"{n}_vs_enhance_nfe"]["ratio"] for n in ("parallel", "alternating5", "nested")} \
      == {"parallel": 2.0, "alternating5": 10.0, "nested": 4.0}
  assert sampler["flops_per_call_signal_b1"]["value"] > 100   # MFLOP: the demo U-Net, ~160
  # per item: 4 steps x (signal net + logit net) + the classifier on y, on x0_hat at the 2 steps
  # after the switch (round(4 x 0.5) = 2) and on x0; achieved GFLOP/s over the best matmul peak
  mflop = {n: sampler[f"flops_per_call_{n}_b1"]["value"] for n in ("signal", "logits", "classifier")}
  per_item = 4 * (mflop["signal"] + mflop["logits"]) + 4 * mflop["classifier"]
  frac = sampler["sampler_jit_scan_frac_of_peak_b1"]
  assert math.isclose(frac["value"], sampler["sampler_jit_scan_items_per_s_b1"]["value"] * per_item
                      / 1e3, rel_tol=1e-6)
  assert frac["baseline"] == max(sampler[n]["value"] for n in ("matmul_peak_jax", "matmul_peak_torch")
                                 if n in sampler)
  # XLA's buffers of a call, summed over the devices: batch 2 is 1 item on each of 2 devices
  peak = [sampler[f"sampler_jit_scan_peak_mib_b{b}"]["value"] for b in (1, 2)]
  assert 1.5 < peak[1] / peak[0] < 2.5, peak

  train = _entries(tmp_path, "train")
  assert train["train_step_temp_mib_accum2"]["ratio"] < 0.75   # two micro-batches of 2
  assert math.isfinite(train["train_2dev_vs_1dev"]["ratio"])
  with open(tmp_path / "bench_train_raw.json") as f:
    raw = json.load(f)
  (one,), (two,) = raw["host_splits"]["1"], raw["host_splits"]["2"]
  assert (one["devices"], two["devices"]) == (1, 2)
  assert math.isclose(two["loss"], one["loss"], rel_tol=1e-5)

  md = (tmp_path / "bench.md").read_text()
  assert "## sampler" in md and "## train" in md and "--batches=1,2" in md
  assert md.count(f"Software: {provenance.software()}") == 2   # what ran each section
  assert (tmp_path / "bench.png").stat().st_size > 10_000


def test_compile_cache_benchmark(tmp_path, monkeypatch):
  """Cold and warm runs of the image sampler and train step, each from its own cache directory
  (not the tests' one); every program cached, however fast it compiled."""
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  _run("bench_compile_cache.py", tmp_path, "--configs=configs/mnist_demo.py", "--rounds=1",
       "--child_flags=--config.signal.sde_kwargs.N=4,--config.logits.sde_kwargs.N=4,"
       "--config.signal.batch_size=4")
  e = _entries(tmp_path, "compile_cache")
  for job in ("sampler_b1", "train_step"):
    name = f"compile_cache_mnist_demo_{job}"
    assert e[f"{name}_cache_mib"]["value"] > 0.01, e     # the cold run wrote its programs
    for kind in ("compile", "process"):
      run = e[f"{name}_{kind}_cold_vs_warm"]
      assert 0 < run["baseline"] < 600 and run["ratio"] == run["value"] / run["baseline"]


def test_speech_sampler_benchmark(tmp_path):
  _run("bench_sampler.py", tmp_path, "--config=configs/speech_keywords.py", "--frames=64",
       "--steps=2", "--batches=1", "--paths=scan,loop", "--repeats=1", "--budget_s=0")
  speech = _entries(tmp_path, "sampler_speech")
  assert speech["speech_sampler_step_loop_max_abs_diff_vs_scan_b1"]["value"] < 1e-5
  assert speech["speech_flops_per_call_enhancer_b1"]["value"] > 0   # Ex-Diff's latent, once
  assert "## sampler_speech" in (tmp_path / "bench.md").read_text()


def test_committed_bench_md_is_the_rendering_of_bench_json_and_the_notes(tmp_path):
  """bench.md is generated: after a hand edit of bench_notes.md, or bench.json copied back from a
  lent GPU, `python experiments/bench_common.py` must have re-rendered it."""
  committed = os.path.join(ROOT, "experiments", "results")
  for name in ("bench.json", "bench_notes.md"):
    with open(os.path.join(committed, name)) as f:
      (tmp_path / name).write_text(f.read())
  env = dict(os.environ, BENCH_RESULTS_DIR=str(tmp_path))
  out = subprocess.run([sys.executable, os.path.join("experiments", "bench_common.py")], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(committed, "bench.md")) as f:
    assert (tmp_path / "bench.md").read_text() == f.read(), \
        "experiments/results/bench.md is stale: run `python experiments/bench_common.py`"
