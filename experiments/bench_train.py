"""Training benchmark (issue 8): steps/s and examples/s of the image signal branch through
`cdjax.train.make_train_step` (the `signal` trainer's loss, adam + clipping + EMA, donated
state) vs the PyTorch eager equivalent (`torch_reference.CoupledUNet`, the same loss, clipping,
adam and EMA in a plain loop), timed side by side with the step's variants (the compiled peak
memory of a step with and without rematerialisation and gradient accumulation; the step with
the process's flags alone, `mesh.cpu_train_xla_flags=''`, as every step ran before session 42);
and the data-parallel path on the CPU host split into 2 and 8 devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N) vs 1 device: a subprocess each, in turn for
`--split_rounds` rounds. Every JAX step runs with the
config's `mesh.xla_flags` (`parallel.configure_xla`; XLA_FLAGS in the environment win) and the
train step's own `mesh.cpu_train_xla_flags` (`parallel.train_compiler_options`), and compiles
without the persistent compilation cache (`bench_common.configure_xla`).

PYTHONPATH=. .venv/bin/python experiments/bench_train.py --config configs/mnist_demo.py

Random data (throughput does not depend on it). Writes experiments/results/bench.{json,md}.
"""
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402  (pins threads before jax / torch are imported)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from cdjax import parallel  # noqa: E402
from cdjax import overrides  # noqa: E402
from cdjax import train  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment config (default configs/mnist_demo.py).")
_BATCH = flags.DEFINE_integer("batch", 0, "Global batch; 0: config.signal.batch_size.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed train steps per measurement (after 2 warm-up).")
_VARIANTS = flags.DEFINE_list(
    "variants", ["net_remat", "accum2", "accum4", "train_remat", "ynnpack"],
    "Variants of the JAX step, compiled and timed side by side with the baseline on 1 device: "
    "net_remat (signal.net_kwargs.remat), accumK (train.grad_accum_steps=K), train_remat "
    "(config.train.remat), ynnpack (mesh.cpu_train_xla_flags='': the process's XLA flags "
    "alone, i.e. mesh.xla_flags' YNNPACK convolutions, as the sampler runs them).")
_ROUNDS = flags.DEFINE_integer("rounds", 4, "Timed rounds of the side-by-side timing (1-device "
                                "step, its variants, PyTorch eager).")
_HOST_DEVICES = flags.DEFINE_list(
    "host_devices", ["2", "8"], "Also run the data-parallel path with the CPU host split into "
    "each of these device counts (mesh.host_cpu_devices; a subprocess each).")
_SPLIT_ROUNDS = flags.DEFINE_integer("split_rounds", 3, "Rounds of the 1-device and host-split "
                                     "runs (a subprocess each, in turn per round).")
_TORCH = flags.DEFINE_bool("torch", True, "Also run the PyTorch eager equivalent.")
_WORKER = flags.DEFINE_bool("worker", False, "Internal: time the JAX step only, print JSON.")
_RESUME = flags.DEFINE_bool("resume", False, "Reuse the stages already in "
                            "results/bench_train_raw.json (bench_train_gpu_raw.json on a GPU).")


def _raw_path() -> str:
  return os.path.join(bc.RESULTS_DIR, f"bench_{bc.section('train')}_raw.json")


def _save(results):
  os.makedirs(bc.RESULTS_DIR, exist_ok=True)
  with open(_raw_path(), "w") as f:
    json.dump(results, f, indent=2)


def _variant(config, name: str):
  config = config.copy_and_resolve_references()
  config.unlock()
  if name == "net_remat":
    config.signal.net_kwargs.remat = True
  elif name.startswith("accum"):
    config.train.grad_accum_steps = int(name[len("accum"):])
  elif name == "train_remat":
    config.train.remat = True
  elif name == "ynnpack":
    config.mesh.cpu_train_xla_flags = ""
  elif name != "baseline":
    raise ValueError(f"Unknown variant {name!r}.")
  return config


def _batch(config, b: int):
  rng = np.random.default_rng(0)
  return {"image": rng.uniform(-1, 1, (b,) + tuple(config.data.shape)).astype(np.float32),
          "label": np.zeros((b,), np.int32)}


def compile_step(config, b: int):
  """(compiled step, state, global batch, compile seconds, memory analysis) for the signal
  trainer over every device of this process."""
  config.train.trainer = "signal"
  mesh = parallel.make_mesh(config)
  trainer = train.TRAINERS.get("signal")(config)
  parallel.check_batch_size(b, mesh.size, config.train.grad_accum_steps)
  optimizer = train.make_optimizer(config.optim, trainer.num_steps)
  batch = _batch(config, b)
  k_init, k_train = jax.random.split(jax.random.PRNGKey(0))
  params = trainer.init_params(k_init, jax.tree.map(lambda v: v[:1], batch))
  state = parallel.replicate(train.TrainState.create(params, optimizer, k_train), mesh)
  step = train.make_train_step(trainer.loss_fn, optimizer, config, mesh)
  gb = parallel.global_batch(batch, mesh)
  tic = time.perf_counter()
  compiled = step.lower(state, gb, None).compile()
  return compiled, state, gb, time.perf_counter() - tic, compiled.memory_analysis()


def time_jax(config, b: int, steps: int) -> dict:
  compiled, state, gb, compile_s, mem = compile_step(config, b)
  for _ in range(2):
    state, m = compiled(state, gb, None)
  jax.block_until_ready(state)
  tic = time.perf_counter()
  for _ in range(steps):
    state, m = compiled(state, gb, None)
  jax.block_until_ready((state, m))
  sec = time.perf_counter() - tic
  return dict(steps_per_s=steps / sec, examples_per_s=steps * b / sec, compile_s=compile_s,
              devices=len(jax.devices()), loss=float(m["loss"]), **_mem(mem))


def _mem(mem) -> dict:
  if mem is None:
    return {}
  return dict(temp_mib=mem.temp_size_in_bytes / 2**20,
              argument_mib=mem.argument_size_in_bytes / 2**20,
              output_mib=mem.output_size_in_bytes / 2**20)


def time_variants(config, b: int, names, steps: int, rounds: int, with_torch: bool) -> dict:
  """The baseline step, each variant's (compiled on 1 device) and, with `with_torch`, the PyTorch
  eager step ("torch") timed side by side (`bc.interleaved_runs`: `steps` steps of each in turn
  per round). Returns {name: dict(examples_per_s, speed_vs_baseline, [compile_s, temp_mib, ...])},
  the baseline's also with speed_vs_torch."""
  runs, out = {}, {}
  for name in ["baseline"] + list(names):
    compiled, state, gb, compile_s, mem = compile_step(_variant(config, name), b)
    out[name] = dict(compile_s=compile_s, **_mem(mem))

    def run(compiled=compiled, holder=[state], gb=gb):
      for _ in range(steps):
        holder[0], _ = compiled(holder[0], gb, None)
      return jax.block_until_ready(holder[0].step)
    runs[name] = run
  if with_torch:
    runs["torch"], out["torch"] = torch_runner(config, b, steps), {}
  timed = bc.interleaved_runs(runs, rounds)
  for name, r in timed.items():
    out[name].update(examples_per_s=steps * b / r["sec"],
                     speed_vs_baseline=bc.paired_ratio(r, timed["baseline"]))
  if with_torch:
    out["baseline"]["speed_vs_torch"] = bc.paired_ratio(timed["baseline"], timed["torch"])
  return out


def torch_runner(config, b: int, steps: int):
  """fn() running `steps` steps of the same signal-branch step in PyTorch eager (gn_replace
  corruption, DDPM eps loss with zero logits, global-norm clip, adam, EMA) and returning the
  last loss; two warm-up steps are run here."""
  torch, device = bc.setup_torch()
  import torch_reference as tr
  c = config.signal
  net = tr.CoupledUNet(config.data.shape[-1], **dict(c.net_kwargs)).train().to(device)
  ema = [p.detach().clone() for p in net.parameters()]
  opt = torch.optim.Adam(net.parameters(), lr=config.optim.lr, betas=(config.optim.b1, config.optim.b2),
                         eps=config.optim.eps)
  abar = tr.cosine_alphas_cumprod(c.sde_kwargs.N).to(device)
  x0 = torch.from_numpy(_batch(config, b)["image"]).to(device).permute(0, 3, 1, 2).contiguous()
  p_replace, k = config.corruption.kwargs.p, config.data.num_classes
  decay = config.train.ema_decay

  def step(i):
    y = torch.where(torch.rand_like(x0) < p_replace, torch.randn_like(x0), x0)
    t = torch.randint(0, c.sde_kwargs.N, (b,), device=device)
    a = abar[t].view(-1, 1, 1, 1)
    z = torch.randn_like(x0)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * z
    loss = (net(x_t, t.float(), y, torch.zeros(b, k, device=device)) - z).pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), config.optim.grad_clip)
    opt.step()
    d = min(decay, (1.0 + i) / (10.0 + i))
    with torch.no_grad():
      torch._foreach_lerp_(ema, [p.detach() for p in net.parameters()], 1.0 - d)
    return loss.detach()

  for i in range(2):
    step(i)
  done = [2]

  def run():
    for _ in range(steps):
      loss = step(done[0])
      done[0] += 1
    return float(loss)
  return run


def host_split_rounds(config, b: int, rounds: int) -> dict:
  """The JAX step on 1 device and, on a CPU, on the host split into each of `--host_devices`
  (XLA_FLAGS=--xla_force_host_platform_device_count=N), a worker subprocess each, run in turn
  for `rounds` rounds (ordered by `bc.round_order`, as `bc.interleaved_runs`) so that the
  split runs and the 1-device run see the same machine state; one round where there is no split
  (an accelerator). Returns {str(N): [the worker's `time_jax` result in each round]}."""
  counts = [1] + [int(n) for n in (_HOST_DEVICES.value if bc.backend() == "cpu" else [])]
  out = {str(n): [] for n in counts}
  cmd = [sys.executable, os.path.abspath(__file__),
         f"--config={flags.FLAGS['config'].config_filename}", f"--batch={b}",
         f"--steps={_STEPS.value}", "--worker",
         *(a for a in sys.argv[1:] if a.startswith("--config."))]
  for r in range(rounds if len(counts) > 1 else 1):
    for n in bc.round_order(counts, r):
      split = [f"--xla_force_host_platform_device_count={n}"] if n > 1 else []
      xla_flags = " ".join([os.environ.get("XLA_FLAGS", "")] + split).strip()
      out[str(n)].append(bc.run_json_subprocess(cmd, {"XLA_FLAGS": xla_flags}))
      print(f"jax {n} device(s):", out[str(n)][-1], file=sys.stderr, flush=True)
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  b = _BATCH.value or config.signal.batch_size
  one_device = config.mesh.copy_and_resolve_references()
  one_device.host_cpu_devices = 0   # the N-device runs below split the host themselves
  bc.configure_xla(one_device)
  bc.full_float32()
  if _WORKER.value:
    print(json.dumps(time_jax(config, b, _STEPS.value)))
    return
  t_start = time.perf_counter()
  results = dict(load_before=bc.load_average(), batch=b, steps=_STEPS.value)
  if _RESUME.value and os.path.exists(_raw_path()):
    with open(_raw_path()) as f:
      results.update(json.load(f))
  if "host_splits" not in results:
    results["host_splits"] = host_split_rounds(config, b, _SPLIT_ROUNDS.value)
    _save(results)
  one_device_errors = [r["error"] for r in results["host_splits"]["1"] if "error" in r]
  if one_device_errors:
    raise RuntimeError(f"the 1-device train step failed: {one_device_errors[0][-1000:]}")
  if "side_by_side" not in results:
    results["side_by_side"] = time_variants(config, b, _VARIANTS.value, _STEPS.value,
                                            _ROUNDS.value, _TORCH.value)
    _save(results)
  results["load_after"] = bc.load_average()
  results["total_s"] = results.get("total_s", 0.0) + time.perf_counter() - t_start
  _save(results)
  write(results)


def write(results: dict) -> None:
  section = bc.section("train")
  e, S, b = [], dict(section=section), results["batch"]
  splits = {int(n): runs for n, runs in results["host_splits"].items()}
  failed = {n: runs for n, runs in splits.items() if any("error" in r for r in runs)}
  j = dict(splits[1][0], steps_per_s=statistics.median(r["steps_per_s"] for r in splits[1]))
  e.append(bc.entry("train_jax_steps_per_s", j["steps_per_s"], "steps/s", f"batch {b}, 1 device",
                    float("nan"), **S))
  e.append(bc.entry("train_jax_compile_s", j["compile_s"], "s", "lower+compile", float("nan"), **S))
  sbs = results["side_by_side"]
  base = sbs["baseline"]
  if "torch" in sbs:
    e.append(bc.entry("train_jax_vs_torch_eager", base["examples_per_s"], "examples/s",
                      sbs["torch"]["examples_per_s"], base["speed_vs_torch"], **S))
  for n, runs in splits.items():
    if n > 1 and n not in failed:
      e.append(bc.entry(f"train_{n}dev_vs_1dev",
                        statistics.median(r["examples_per_s"] for r in runs), "examples/s",
                        statistics.median(r["examples_per_s"] for r in splits[1]),
                        statistics.median(r["examples_per_s"] / one["examples_per_s"]
                                          for r, one in zip(runs, splits[1])), **S))
  e.append(bc.entry("train_step_temp_mib_baseline", base["temp_mib"], "MiB",
                    "compiled.memory_analysis() temp buffers", float("nan"), **S))
  for name, m in sbs.items():
    if name not in ("baseline", "torch"):
      e.append(bc.entry(f"train_step_temp_mib_{name}", m["temp_mib"], "MiB", base["temp_mib"], **S))
      e.append(bc.entry(f"train_{name}_vs_baseline", m["examples_per_s"], "examples/s",
                        base["examples_per_s"], m["speed_vs_baseline"], **S))
  notes = [f"load before: {results['load_before']}; after: {results['load_after']}",
           f"signal branch (configs' coupled_unet), global batch {b}, {results['steps']} timed steps "
           f"after 2 warm-up steps; threads: BENCH_THREADS={bc.THREADS}; total script time "
           f"{results['total_s']:.0f} s",
           *([f"train_Ndev_vs_1dev and train_jax_steps_per_s: the step on 1 device and on the host "
              f"split into N (--xla_force_host_platform_device_count=N on the same cores, batch "
              f"split N ways; N=2 on 2 cores is what mesh.host_cpu_devices=2 gives the demo), a "
              f"subprocess each, run in turn for {len(splits[1])} rounds; value / baseline: "
              f"medians, ratio: median over rounds of the paired ratio"] if len(splits) > 1 else []),
           "memory: XLA's compiled temp-buffer size of one train step (arguments/outputs = state "
           "and batch are the same in every variant)",
           "train_jax_vs_torch_eager and train_<variant>_vs_baseline: the 1-device step, its "
           f"variants and PyTorch eager timed side by side ({results['steps']} steps of each in "
           "turn per round); value / baseline: medians, ratio: median over rounds of the paired "
           "ratio"]
  notes += bc.accelerator_note("no CPU host splits")
  for n, runs in failed.items():
    notes.append(f"{n}dev run failed: {next(r for r in runs if 'error' in r)['error'][-300:]!r}")
  command = bc.command(sys.argv)
  print(bc.write_results(e, command, notes, section))


if __name__ == "__main__":
  overrides.run(main, "configs/mnist_demo.py")
