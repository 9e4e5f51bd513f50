"""The issue-8 benchmark scripts end to end at toy sizes (a few steps, batches 1-4), writing into a
temporary folder (BENCH_RESULTS_DIR): what the timed runs and a lent GPU's one call
(experiments/device_bench.sh) rely on. Timings at these sizes mean nothing; the test checks what
does not depend on them: the per-step loop equals the scan, the NFE of each strategy, memory
saved by gradient accumulation, the sharded train step's loss, and the files written."""
import json
import math
import os
import subprocess
import sys

from cdjax import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_interleaved_runs_start_each_round_one_further_along():
  sys.path.insert(0, os.path.join(ROOT, "experiments"))
  import bench_common   # pylint: disable=g-import-not-at-top
  calls = []
  runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
  timed = bench_common.interleaved_runs(runs, repeats=3)
  assert "".join(calls) == "abc" + "abc" + "bca" + "cab"   # first calls, then 3 rounds
  assert [len(r["times"]) for r in timed.values()] == [3, 3, 3]


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
