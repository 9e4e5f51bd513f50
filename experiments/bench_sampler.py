"""Sampler benchmark (issue 8): the coupled Parallel trajectory at 28x28, compared in one process
as (a) cdjax's whole trajectory = one jit + lax.scan call, (b) the same JAX step (the `parallel`
scan body, built from `_Branches.logits_update` / `signal_update`) jitted once and called from a
Python loop, (c) the PyTorch eager reference (`torch_reference.py`, official-code-style loop),
(d) path (a) with XLA's logistic in place of `layers.sigmoid` in every SiLU (before / after that
change), all timed side by side in rounds (`bench_common.interleaved_runs`); plus the strategy
cost ratios (NFE and wall time relative to enhancement alone) and the
matmul peak of the machine. Random weights: throughput does not depend on them.

PYTHONPATH=. .venv/bin/python experiments/bench_sampler.py --config configs/mnist_demo.py

Writes experiments/results/bench.{json,md} (merged with bench_train.py's entries).
The JAX paths run with the XLA flags the config asks for (`parallel.configure_xla`: the
config's `mesh.host_cpu_devices` split and `mesh.xla_flags`; XLA_FLAGS in the environment win).
`--xla_variants` re-runs the scan path at one batch size in a subprocess per XLA_FLAGS value,
which replaces the config's flags ("none": no flags), e.g.
`--xla_variants=none,--xla_force_host_platform_device_count=2`: the scan path shards its batch
over every device it sees.
"""
import json
import os
import sys
import time
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as bc  # noqa: E402  (pins threads before jax / torch are imported)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cdjax import coupled  # noqa: E402
from cdjax import nets  # noqa: E402
from cdjax import parallel  # noqa: E402
from cdjax.nets import layers  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/mnist_demo.py", "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 50, "DDPM steps (NFE per branch) of every trajectory.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes of the Parallel benchmark.")
_PATHS = flags.DEFINE_list("paths", ["scan", "xla_sigmoid", "loop", "torch"],
                           "Which of scan, xla_sigmoid (scan with XLA's logistic in the SiLUs), "
                           "loop, torch to run.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (each path once per round; median).")
_BUDGET = flags.DEFINE_float("budget_s", 20.0, "Stop after the round whose timed calls passed "
                             "this many seconds per path (at least one round).")
_STRATEGY_BATCH = flags.DEFINE_integer("strategy_batch", 4, "Batch of the strategy-cost runs; 0: skip.")
_STRATEGY_REPEATS = flags.DEFINE_integer("strategy_repeats", 2, "Timed repeats of each strategy.")
_XLA_VARIANTS = flags.DEFINE_list("xla_variants", [], "XLA_FLAGS values to try on the scan path "
                                  "(subprocess each), e.g. --xla_cpu_use_onednn=true.")
_VARIANT_BATCH = flags.DEFINE_integer("variant_batch", 16, "Batch of the XLA-flag variants.")
_MICRO_BATCHES = flags.DEFINE_list("micro_batches", [], "Also time the scan path with "
                                   "sampling.micro_batch = each of these (path scan_micro<m>).")
_BREAKDOWN_BATCH = flags.DEFINE_integer("breakdown_batch", 1, "Batch of the per-step breakdown "
                                        "(networks only, U-Net only, XLA profile, one core); 0: skip.")
_JSON_ONLY = flags.DEFINE_bool("json_only", False, "Print results as one JSON line; write nothing.")

SECTION = "sampler"


def _network_inputs(model_cfg, b: int):
  shape = (b,) + tuple(model_cfg.data.shape)
  x, k = jnp.zeros(shape), model_cfg.data.num_classes
  l, t = jnp.zeros((b, k)), jnp.zeros((b,))
  return {"signal": (x, t, x, l), "logits": (l, t, l, x), "classifier": (x,)}


def init_params(config):
  """Random params of the three networks, {"signal", "logits"} and the classifier's."""
  inputs = _network_inputs(config, 1)
  key = jax.random.PRNGKey(0)
  params = {}
  for i, name in enumerate(("signal", "logits", "classifier")):
    section = config[name]
    net = nets.get_network(section.net, **section.net_kwargs)
    params[name] = net.init(jax.random.fold_in(key, i), *inputs[name])["params"]
  classifier = params.pop("classifier")
  return params, classifier


def jax_flops_per_call(config, params, classifier, b: int) -> dict:
  """XLA cost-analysis FLOPs of one call of each network at batch b."""
  model = coupled.model_from_config(config)
  fns = {"signal": (model.signal_net, params["signal"]), "logits": (model.logits_net, params["logits"]),
         "classifier": (model.classifier, classifier)}
  out = {}
  for name, args in _network_inputs(config, b).items():
    fn, p = fns[name]
    out[name] = float(jax.jit(fn).lower(p, *args).compile().cost_analysis()["flops"])
  return out


def torch_flops_per_call(config, b: int) -> dict:
  import torch
  import torch_reference as tr
  unet, logit_net, classifier = tr.build(config)
  x = torch.zeros((b, config.data.shape[-1]) + tuple(config.data.shape[:2]))
  l, t = torch.zeros(b, config.data.num_classes), torch.zeros(b)
  return {"signal": float(tr.count_flops(unet, x, t, x, l)),
          "logits": float(tr.count_flops(logit_net, l, t, l, x)),
          "classifier": float(tr.count_flops(classifier, x))}


def sampling_config(config, strategy: str):
  cfg = config.sampling.copy_and_resolve_references()
  cfg.strategy = strategy
  return cfg


def with_steps(config, n: int):
  config = config.copy_and_resolve_references()
  config.signal.sde_kwargs.N = n
  config.logits.sde_kwargs.N = n
  return config


# ---- (a) the compiled trajectory ----------------------------------------------------------------
def compile_coupled(config, strategy, params, classifier, y):
  """(compiled fn(params, classifier, key, y), compile seconds, memory analysis)."""
  model = coupled.model_from_config(config)
  fn = jax.jit(coupled.get_coupled_fn(model, sampling_config(config, strategy)))
  tic = time.perf_counter()
  compiled = fn.lower(params, classifier, jax.random.PRNGKey(1), y).compile()
  return compiled, time.perf_counter() - tic, compiled.memory_analysis()


def _runner(fn, *args):
  """A callable running `fn(*args)` and blocking until its result is ready."""
  return lambda: jax.block_until_ready(fn(*args))


# ---- (b) the same step, jitted once, from a Python loop -----------------------------------------
def make_step_loop(config, params, classifier, y):
  """`run(key) -> CoupledOutput` running the `parallel` strategy's body once per Python iteration
  (one jitted call per DDPM step, same keys as the scan), plus a compile function."""
  model = coupled.model_from_config(config)
  cfg = sampling_config(config, "parallel")
  n = model.signal_sde.N
  switch = int(round(n * (1.0 - cfg.switch_t)))
  ts_x, ts_l = model.signal_sde.timesteps(), model.logits_sde.timesteps()

  @jax.jit
  def init(params, classifier, key, y):
    b = coupled._Branches(model, cfg, params, classifier, y)
    k_x, k_l, k_steps = jax.random.split(key, 3)
    x, l = b.signal_init(k_x), b.logits_init(k_l, b.y)
    return (x, l, b.y, coupled._initial_logits(b), x, l), k_steps

  @jax.jit
  def step(params, classifier, y, carry, k_steps, i, tx, tx_next, tl, tl_next):
    # The body of coupled.parallel (logits_first, cond_source='clean').
    b = coupled._Branches(model, cfg, params, classifier, y)
    x, l, x0_hat, _, _, _ = carry
    k_sig, k_log = jax.random.split(jax.random.fold_in(k_steps, i))
    c = jnp.where(i >= switch, x0_hat, b.y)
    out_l = b.logits_update(k_log, l, tl, tl_next, c, x0_hat)
    out_x = b.signal_update(k_sig, x, tx, tx_next, out_l.x0_hat, out_l.x0_hat)
    return (out_x.x, out_l.x, out_x.x0_hat, out_l.x0_hat, out_x.x_mean, out_l.x_mean)

  @jax.jit
  def final(params, classifier, y, carry):
    b = coupled._Branches(model, cfg, params, classifier, y)
    return b.output(carry[4], carry[5], b.signal_nfe + b.logits_nfe)

  steps = [(np.int32(i), ts_x[i], ts_x[i + 1], ts_l[i], ts_l[i + 1]) for i in range(n)]

  def run(key, num_steps=n):
    carry, k_steps = init(params, classifier, key, y)
    for args in steps[:num_steps]:
      carry = step(params, classifier, y, carry, k_steps, *args)
    return final(params, classifier, y, carry)

  return run


def bench_parallel(config, params, classifier, b: int, paths, repeats: int, budget: float) -> dict:
  """Items/s, compile time and peak memory of each path at batch b, all timed side by side
  (`bc.interleaved_runs`). Path `xla_sigmoid`: the scan path with XLA's logistic in place of
  `layers.sigmoid` (the before of that change)."""
  runs, info = {}, {}
  y = jax.random.uniform(jax.random.PRNGKey(2), (b,) + tuple(config.data.shape), minval=-1, maxval=1)
  key = jax.random.PRNGKey(1)
  sharded_y, sharded = y, (params, classifier)
  if b % jax.device_count() == 0:   # a split host (XLA variant): data parallel as in evaluation
    mesh = parallel.make_mesh(config)
    sharded_y = jax.device_put(y, parallel.data_sharded(mesh))
    sharded = parallel.replicate((params, classifier), mesh)

  def add_scan(name, micro_batch=0):
    c = config.copy_and_resolve_references()
    c.sampling.micro_batch = micro_batch
    compiled, compile_s, mem = compile_coupled(c, "parallel", *sharded, sharded_y)
    runs[name] = _runner(compiled, *sharded, key, sharded_y)
    info[name] = dict(compile_s=compile_s,
                      xla_temp_mib=mem.temp_size_in_bytes / 2**20 if mem else None)

  if "scan" in paths:
    add_scan("scan")
    for m in map(int, _MICRO_BATCHES.value):
      if 0 < m < b and b % m == 0:
        add_scan(f"scan_micro{m}", m)
  if "xla_sigmoid" in paths:
    with mock.patch.object(layers, "sigmoid", jax.nn.sigmoid):
      add_scan("xla_sigmoid")
  if "loop" in paths:
    run_loop = make_step_loop(config, params, classifier, y)
    tic = time.perf_counter()
    jax.block_until_ready(run_loop(key, 1))   # compiles init / step / final on one step
    warm = time.perf_counter() - tic
    tic = time.perf_counter()
    jax.block_until_ready(run_loop(key, 1))
    info["loop"] = dict(compile_s=warm - (time.perf_counter() - tic))
    runs["loop"] = _runner(run_loop, key)
  if "torch" in paths:
    import torch
    import torch_reference as tr
    torch.set_num_threads(bc.THREADS)
    torch.manual_seed(0)
    sampler = tr.ParallelSampler(*tr.build(config), n=config.signal.sde_kwargs.N,
                                 switch_t=config.sampling.switch_t,
                                 logits_std=config.logits.standardize_std)
    yt = torch.from_numpy(np.array(y)).permute(0, 3, 1, 2).contiguous()
    runs["torch"] = lambda: sampler(yt)

  timed = bc.interleaved_runs(runs, repeats, budget)
  scan_x0 = timed["scan"]["out"].x0 if "scan" in timed else None
  res = {}
  for name, r in timed.items():
    out = r.pop("out")
    res[name] = dict(r, items_per_s=b / r["sec"], **info.get(name, {}))
    if name != "torch":
      res[name]["nfe"] = int(out.nfe)
      if scan_x0 is not None and name in ("xla_sigmoid", "loop"):   # same keys: equal up to rounding
        res[name]["max_abs_diff_vs_scan"] = float(jnp.max(jnp.abs(out.x0 - scan_x0)))
  return res


def unet_scan_vs_outside(config, params, b: int, calls: int = 10) -> dict:
  """Seconds per U-Net forward call: jitted alone from Python vs inside a lax.scan of `calls`
  (does XLA:CPU run the forward conv net slower inside a while loop, as it does its gradient?)."""
  net = coupled.model_from_config(config).signal_net
  x = jnp.zeros((b,) + tuple(config.data.shape))
  t, l = jnp.full((b,), 10.0), jnp.zeros((b, config.data.num_classes))
  one = jax.jit(lambda p, x: net(p, x, t, x, l))
  scanned = jax.jit(lambda p, x: jax.lax.scan(lambda x, _: (net(p, x, t, x, l), None), x, None,
                                              length=calls)[0])
  outside, _ = bc.timeit(lambda: jax.block_until_ready(one(params["signal"], x)), calls, warmup=2)
  inside, _ = bc.timeit(lambda: jax.block_until_ready(scanned(params["signal"], x)), 3, warmup=1)
  return dict(outside_s=outside, inside_s=inside / calls, batch=b)


def _ms_per_step(fn, args, steps: int, repeats: int) -> float:
  compiled = jax.jit(fn).lower(*args).compile()
  sec, _ = bc.timeit(lambda: jax.block_until_ready(compiled(*args)), repeats, warmup=1)
  return sec / steps * 1e3


def _profile_ms_per_step(run, steps: int) -> dict:
  """XLA:CPU profile of one `run()` (a compiled trajectory): ms per step in convolutions
  (YNNPACK or XLA), dots and every other op (elementwise, normalisation, reductions), and the
  number of XLA ops (thunks) run per step. Control-flow thunks (while, call) are not counted:
  they contain the ops."""
  import glob
  import gzip
  import tempfile
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp, create_perfetto_trace=True)
    run()
    jax.profiler.stop_trace()
    with gzip.open(glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]) as f:
      events = json.load(f)["traceEvents"]
  ms = dict(conv=0.0, dot=0.0, other=0.0)
  ops = 0
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}) or name.startswith(
        ("while", "call", "conditional", "end: ")):
      continue
    kind = "conv" if name.startswith(("ynn_fusion", "conv")) else "dot" if name.startswith("dot") else "other"
    ms[kind] += e["dur"] / 1e3 / steps
    ops += 1
  return dict(ms_per_step=ms, ops_per_step=ops / steps)


def step_breakdown(config, params, classifier, b: int, repeats: int) -> dict:
  """Where the time of one Parallel step goes at batch b (each in a lax.scan over the steps):
  the whole trajectory, its three networks chained as in a step (no SDE update, no RNG), the
  U-Net alone, an XLA profile of the trajectory, and the trajectory pinned to one core
  (`taskset -c 0`, a subprocess: how much of the second core the step uses)."""
  model = coupled.model_from_config(config)
  n = model.signal_sde.N
  y = jax.random.uniform(jax.random.PRNGKey(2), (b,) + tuple(config.data.shape), minval=-1, maxval=1)
  l0, ts = jnp.zeros((b, config.data.num_classes)), jnp.linspace(1.0, 1.0 / n, n)

  def networks(params, classifier, y):
    def body(carry, t):
      x, l = carry
      t = jnp.full((b,), t)
      l = model.logits_net(params["logits"], l, t, model.classifier(classifier, x), x)
      return (model.signal_net(params["signal"], x, t, y, l), l), None
    return jax.lax.scan(body, (y, l0), ts)[0]

  def unet(params, y):
    body = lambda x, t: (model.signal_net(params["signal"], x, jnp.full((b,), t), y, l0), None)
    return jax.lax.scan(body, y, ts)[0]

  compiled, _, _ = compile_coupled(config, "parallel", params, classifier, y)
  run = _runner(compiled, params, classifier, jax.random.PRNGKey(1), y)
  full, _ = bc.timeit(run, repeats, warmup=1)
  cmd = ["taskset", "-c", "0", sys.executable, os.path.abspath(__file__),
         f"--config={_CONFIG_PATH}", f"--steps={n}", f"--batches={b}", "--paths=scan",
         f"--repeats={repeats}", "--strategy_batch=0", "--breakdown_batch=0", "--json_only"]
  one_core = bc.run_json_subprocess(cmd, {})
  return dict(batch=b, full_ms=full / n * 1e3,
              networks_ms=_ms_per_step(networks, (params, classifier, y), n, repeats),
              unet_ms=_ms_per_step(unet, (params, y), n, repeats),
              profile=_profile_ms_per_step(run, n),
              one_core=one_core.get("parallel", {}).get(str(b), {}).get("scan", one_core))


def bench_strategies(config, params, classifier, b: int, repeats: int, budget: float) -> dict:
  """Wall time (side by side) and NFE of each strategy's compiled trajectory at batch b."""
  y = jax.random.uniform(jax.random.PRNGKey(3), (b,) + tuple(config.data.shape), minval=-1, maxval=1)
  runs, compile_s = {}, {}
  for name, strategy, rounds in (("enhance", "enhance_then_classify", 1), ("parallel", "parallel", 1),
                                 ("alternating5", "alternating", 5), ("nested", "nested", 1)):
    c = config.copy_and_resolve_references()
    c.sampling.rounds = rounds
    compiled, compile_s[name], _ = compile_coupled(c, strategy, params, classifier, y)
    runs[name] = _runner(compiled, params, classifier, jax.random.PRNGKey(1), y)
  return {name: dict(sec=r["sec"], times=r["times"], nfe=int(r["out"].nfe), compile_s=compile_s[name])
          for name, r in bc.interleaved_runs(runs, repeats, budget).items()}


def run_variants(argv0: str, variants, b: int) -> dict:
  out = {}
  for v in ["default"] + list(variants):   # default: the flags of this run
    cmd = [sys.executable, argv0, f"--config={_CONFIG_PATH}", f"--steps={_STEPS.value}",
           f"--batches={b}", "--paths=scan", f"--repeats={_REPEATS.value}", "--strategy_batch=0",
           f"--micro_batches={','.join(_MICRO_BATCHES.value)}", "--json_only",
           "--config.mesh.host_cpu_devices=0", "--config.mesh.xla_flags="]
    flags_env = {"default": os.environ.get("XLA_FLAGS", ""), "none": ""}.get(v, v)
    r = bc.run_json_subprocess(cmd, {"XLA_FLAGS": flags_env})
    out[v] = r.get("parallel", {}).get(str(b), r)   # {path: result}, or the error
  return out


_CONFIG_PATH = "configs/mnist_demo.py"


def main(argv):
  del argv
  global _CONFIG_PATH
  _CONFIG_PATH = flags.FLAGS["config"].config_filename
  config = with_steps(_CONFIG.value, _STEPS.value)
  parallel.configure_xla(config.mesh)
  load_before = bc.load_average()
  t_start = time.perf_counter()
  params, classifier = init_params(config)
  batches = [int(b) for b in _BATCHES.value]
  results = dict(load_before=load_before, xla_flags=os.environ.get("XLA_FLAGS", ""),
                 devices=jax.device_count(),
                 threads=bc.THREADS, steps=_STEPS.value, parallel={})

  if not _JSON_ONLY.value:
    results["matmul_gflops"] = bc.matmul_peak()
    results["flops_jax"] = jax_flops_per_call(config, params, classifier, 1)
    if "torch" in _PATHS.value:
      results["flops_torch"] = torch_flops_per_call(config, 1)
    results["scan_vs_outside"] = unet_scan_vs_outside(config, params, 16)
  for b in batches:
    results["parallel"][str(b)] = bench_parallel(config, params, classifier, b, _PATHS.value,
                                                 _REPEATS.value, _BUDGET.value)
    print(f"batch {b}:", json.dumps({k: round(v["items_per_s"], 3)
                                     for k, v in results["parallel"][str(b)].items()}),
          file=sys.stderr, flush=True)
  if _BREAKDOWN_BATCH.value > 0:
    results["breakdown"] = step_breakdown(config, params, classifier, _BREAKDOWN_BATCH.value,
                                          _REPEATS.value)
  if _STRATEGY_BATCH.value > 0:
    results["strategies"] = bench_strategies(config, params, classifier, _STRATEGY_BATCH.value,
                                             _STRATEGY_REPEATS.value, _BUDGET.value)
  if _XLA_VARIANTS.value:
    results["xla_variants"] = run_variants(os.path.abspath(__file__), _XLA_VARIANTS.value,
                                           _VARIANT_BATCH.value)
  results["load_after"] = bc.load_average()
  results["total_s"] = time.perf_counter() - t_start
  if _JSON_ONLY.value:
    print(json.dumps(results))
    return
  with open(os.path.join(bc.RESULTS_DIR, "bench_sampler_raw.json"), "w") as f:
    json.dump(results, f, indent=2)
  write(results, config)


def write(results: dict, config) -> None:
  e, S = [], dict(section=SECTION)
  n = results["steps"]
  per_step = {k: v for k, v in results["flops_jax"].items()}
  traj_flops = n * sum(per_step.values())   # per item: classifier + logit net + U-Net per step
  peak = max(results["matmul_gflops"].values())
  e.append(bc.entry("matmul_peak_jax", results["matmul_gflops"]["jax"], "GFLOP/s",
                    "2048^2 f32 jnp.dot", float("nan"), **S))
  if "torch" in results["matmul_gflops"]:
    e.append(bc.entry("matmul_peak_torch", results["matmul_gflops"]["torch"], "GFLOP/s",
                      "2048^2 f32 torch.mm", float("nan"), **S))
  for name in ("signal", "logits", "classifier"):
    torch_flops = results.get("flops_torch", {}).get(name)
    e.append(bc.entry(f"flops_per_call_{name}_b1", results["flops_jax"][name] / 1e6, "MFLOP",
                      "torch FlopCounterMode" if torch_flops is None else torch_flops / 1e6, **S))

  def versus(name, path, baseline):   # items/s of two paths timed side by side
    e.append(bc.entry(name, path["items_per_s"], "items/s", baseline["items_per_s"],
                      bc.paired_ratio(path, baseline), **S))

  for b, r in results["parallel"].items():
    if "scan" in r:
      s = r["scan"]
      gflops = s["items_per_s"] * traj_flops / 1e9
      e.append(bc.entry(f"sampler_jit_scan_items_per_s_b{b}", s["items_per_s"], "items/s",
                        f"{n} steps x (U-Net + logit net + classifier)", float("nan"), **S))
      e.append(bc.entry(f"sampler_jit_scan_frac_of_peak_b{b}", gflops, "GFLOP/s", peak, **S))
      e.append(bc.entry(f"sampler_jit_scan_compile_s_b{b}", s["compile_s"], "s", "lower+compile",
                        float("nan"), **S))
      e.append(bc.entry(f"sampler_jit_scan_xla_temp_mib_b{b}", s["xla_temp_mib"] or float("nan"),
                        "MiB", "compiled.memory_analysis() temp buffers", float("nan"), **S))
      e.append(bc.entry(f"sampler_jit_scan_rss_delta_mib_b{b}", s["rss_delta_mib"], "MiB",
                        "peak RSS minus RSS before the first run", float("nan"), **S))
    for path in (p for p in r if p.startswith("scan_micro")):
      m = path[len("scan_micro"):]
      versus(f"sampler_jit_scan_micro{m}_vs_whole_batch_b{b}", r[path], r["scan"])
      if "torch" in r:
        versus(f"sampler_jit_scan_micro{m}_vs_torch_eager_b{b}", r[path], r["torch"])
    if "scan" in r and "torch" in r:
      versus(f"sampler_jit_scan_vs_torch_eager_b{b}", r["scan"], r["torch"])
      e.append(bc.entry(f"sampler_torch_eager_rss_delta_mib_b{b}", r["torch"]["rss_delta_mib"], "MiB",
                        "peak RSS minus RSS before the first run", float("nan"), **S))
    if "scan" in r and "xla_sigmoid" in r:
      versus(f"sampler_jit_scan_vs_xla_sigmoid_b{b}", r["scan"], r["xla_sigmoid"])
      e.append(bc.entry(f"sampler_xla_sigmoid_max_abs_diff_vs_scan_b{b}",
                        r["xla_sigmoid"]["max_abs_diff_vs_scan"], "abs", "x0 of the scan, same keys",
                        float("nan"), **S))
    if "scan" in r and "loop" in r:
      versus(f"sampler_jit_scan_vs_step_loop_b{b}", r["scan"], r["loop"])
      e.append(bc.entry(f"sampler_step_loop_compile_s_b{b}", r["loop"]["compile_s"], "s",
                        "first call minus steady call", float("nan"), **S))
      e.append(bc.entry(f"sampler_step_loop_max_abs_diff_vs_scan_b{b}",
                        r["loop"].get("max_abs_diff_vs_scan", float("nan")), "abs",
                        "x0 of the scan, same keys", float("nan"), **S))
  so = results.get("scan_vs_outside")
  if so:
    e.append(bc.entry(f"unet_call_in_scan_vs_outside_b{so['batch']}", so["inside_s"] * 1e3, "ms/call",
                      so["outside_s"] * 1e3, **S))
  bd = results.get("breakdown")
  if bd:
    b = bd["batch"]
    e.append(bc.entry(f"sampler_step_vs_networks_only_b{b}", bd["full_ms"], "ms/step",
                      bd["networks_ms"], **S))
    e.append(bc.entry(f"unet_share_of_step_b{b}", bd["unet_ms"], "ms/step", bd["full_ms"], **S))
    prof = bd["profile"]["ms_per_step"]
    for kind, ms in prof.items():
      e.append(bc.entry(f"profile_{kind}_share_of_step_b{b}", ms, "ms/step (profiled)",
                        sum(prof.values()), **S))
    e.append(bc.entry(f"profile_xla_ops_per_step_b{b}", bd["profile"]["ops_per_step"], "ops",
                      "thunks run per step", float("nan"), **S))
    if "items_per_s" in bd["one_core"]:
      e.append(bc.entry(f"sampler_jit_scan_two_cores_vs_one_b{b}", b * 1e3 / (bd["full_ms"] * n),
                        "items/s", bd["one_core"]["items_per_s"], **S))
  st = results.get("strategies")
  if st:
    base = st["enhance"]
    for name, key in (("parallel_vs_enhance_cost", "parallel"),
                      ("alternating5_vs_enhance_cost", "alternating5"),
                      ("nested_vs_enhance_cost", "nested")):
      e.append(bc.entry(name, st[key]["sec"], "s (wall, whole batch)", base["sec"],
                        bc.paired_ratio(base, st[key]), **S))
      e.append(bc.entry(name.replace("_cost", "_nfe"), st[key]["nfe"], "NFE/item", base["nfe"], **S))
  variants = results.get("xla_variants", {})
  torch_at_variant_batch = results["parallel"].get(str(_VARIANT_BATCH.value), {}).get("torch")
  for v, r in variants.items():
    for path, res in r.items():
      if isinstance(res, dict) and "items_per_s" in res:
        suffix = "" if path == "scan" else f"_{path}"
        e.append(bc.entry(f"xla_variant[{v}]{suffix}_items_per_s_b{_VARIANT_BATCH.value}",
                          res["items_per_s"], "items/s",
                          variants["default"].get("scan", {}).get("items_per_s", float("nan")), **S))
        if torch_at_variant_batch:
          e.append(bc.entry(f"xla_variant[{v}]{suffix}_vs_torch_eager_b{_VARIANT_BATCH.value}",
                            res["items_per_s"], "items/s", torch_at_variant_batch["items_per_s"], **S))
  notes = [f"load before: {results['load_before']}; after: {results['load_after']}",
           f"threads: BENCH_THREADS={results['threads']} (torch.set_num_threads, OMP), XLA_FLAGS="
           f"'{results['xla_flags']}' ({results['devices']} devices); {n} DDPM steps; every path "
           f"of a batch size timed side by side: one untimed call each, then up to "
           f"{_REPEATS.value} rounds calling each in turn; value and baseline: each path's "
           f"median; the ratio of two paths: the median over rounds of their per-round ratio; "
           f"total script time {results['total_s']:.0f} s",
           f"FLOPs per item per trajectory: {traj_flops / 1e9:.2f} GFLOP "
           f"(XLA cost analysis per network call x {n} steps); frac_of_peak ratio = achieved GFLOP/s "
           f"over the best measured 2048^2 matmul",
           "flops_per_call_*: value = XLA cost_analysis (all ops), baseline = torch FlopCounterMode "
           "(conv/matmul/attention only, 2 FLOPs per MAC)"]
  if bd:
    notes.append(f"breakdown at batch {bd['batch']}: networks_only = the three networks chained "
                 "as in a step, no SDE update or RNG; profile_* = XLA:CPU profiler time per step "
                 "by op kind (conv: YNNPACK or XLA convolutions); two_cores_vs_one: the same "
                 "trajectory pinned to one core by taskset (subprocess)"
                 + ("" if "items_per_s" in bd["one_core"] else
                    f"; the one-core run failed: {str(bd['one_core'])[-300:]!r}"))
  for v, r in results.get("xla_variants", {}).items():
    if "error" in r:
      notes.append(f"XLA variant '{v}' failed: {r['error'][-300:]!r}")
  command = "PYTHONPATH=. .venv/bin/python " + " ".join(
      [os.path.relpath(sys.argv[0])] + sys.argv[1:])
  print(bc.write_results(e, command, notes, SECTION))


if __name__ == "__main__":
  app.run(main)
