"""Sampler benchmark (issue 8): the coupled Parallel trajectory, compared in one process as
(a) cdjax's whole trajectory = one jit + lax.scan call, (b) the same step (`coupled.parallel_step`,
the scan body) jitted once and called from a Python loop, (c) the PyTorch eager reference
(official-code-style loop), (d) path (a) with flax's GroupNorm or dot_product_attention in place of
cdjax's (the befores of `layers.GroupNorm` / `layers.dot_product_attention`), all timed side by
side in rounds (`bench_common.interleaved_runs`); plus the matmul peak of the machine. Random
weights: throughput does not depend on them. Two setups, chosen by the config:

- images (28x28, `torch_reference.py`), section `sampler`; also the batch-1 step breakdown, the
  strategy cost ratios (NFE and wall time relative to enhancement alone) and `--xla_variants`:
  PYTHONPATH=. .venv/bin/python experiments/bench_sampler.py --config configs/mnist_demo.py
- speech (`--frames` spectrogram frames; NCSN++ with the enhancer's latent, OUVE predictor +
  corrector, `torch_reference_speech.py`), section `sampler_speech`, entries named `speech_*`:
  PYTHONPATH=. .venv/bin/python experiments/bench_sampler.py --config configs/speech_keywords.py \
      --config.mesh.host_cpu_devices=2 \
      --paths=scan,flax_groupnorm,flax_attention,loop,torch,torch_fir_sums \
      --batches=1,16,64 --repeats=3 --budget_s=60
  (path torch_fir_sums: the reference with NCSN++'s FIR as shifted sums, as cdjax writes it)

Writes experiments/results/bench.{json,md} (merged with bench_train.py's entries).
The JAX paths run with the XLA flags the config asks for (`parallel.configure_xla`: the
config's `mesh.host_cpu_devices` split and `mesh.xla_flags`; XLA_FLAGS in the environment win),
and, where the host is one device, with the sampler's own options, as evaluation compiles them
(`parallel.sample_compiler_options`: `mesh.cpu_sample_xla_flags`), and compile without the
persistent compilation cache (`bench_common.configure_xla`).
`--xla_variants` re-runs the scan path at one batch size in a subprocess per XLA_FLAGS value,
which replaces the config's flags ("none": no flags), e.g.
`--xla_variants=none,--xla_force_host_platform_device_count=2`: the scan path shards its batch
over every device it sees.
"""
import contextlib
import functools
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
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from cdjax import audio  # noqa: E402
from cdjax import coupled  # noqa: E402
from cdjax import nets  # noqa: E402
from cdjax import overrides  # noqa: E402
from cdjax import parallel  # noqa: E402
from cdjax import sampling  # noqa: E402
from cdjax import sde as sde_lib  # noqa: E402
from cdjax import speech  # noqa: E402
from cdjax.nets import layers  # noqa: E402
from cdjax.nets import speech as speech_nets  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment config (default configs/mnist_demo.py).")
_STEPS = flags.DEFINE_integer("steps", 0, "Steps of every trajectory (both branches); 0: the config's.")
_FRAMES = flags.DEFINE_integer("frames", 256, "Spectrogram frames of the speech setup (16 kHz, hop "
                               "128: 256 frames = 2 s).")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64"], "Batch sizes of the Parallel benchmark.")
_PATHS = flags.DEFINE_list("paths", ["scan", "flax_groupnorm", "flax_attention", "loop", "torch"],
                           "Which of scan, flax_groupnorm (scan with flax's GroupNorm), "
                           "flax_attention (scan with flax's dot_product_attention), loop, torch, "
                           "torch_fir_sums (speech: the reference with NCSN++'s FIR as shifted "
                           "sums) to run.")
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
_UNSPLIT = flags.DEFINE_list("unsplit_batches", [], "Batch sizes timed (every path, and the "
                             "breakdown if its batch is one of them) in a subprocess whose CPU host "
                             "is one device (--config.mesh.host_cpu_devices=0), where evaluation "
                             "compiles samplers with mesh.cpu_sample_xla_flags; only where the "
                             "config splits the host. A batch that does not shard loses nothing.")
_JSON_ONLY = flags.DEFINE_bool("json_only", False, "Print results as one JSON line; write nothing.")


def is_speech(config) -> bool:
  """The speech setup (complex spectrograms, NCSN++ signal branch), not the image one."""
  return config.signal.net == "ncsnpp"


def section(config) -> str:
  """The bench.json section of the config's setup (`_gpu` appended on a GPU: `bc.section`)."""
  return bc.section("sampler_speech" if is_speech(config) else "sampler")


def signal_shape(config) -> tuple:
  """One item of y: [H, W, C] (images) or [F, frames] (speech)."""
  if is_speech(config):
    return (audio.N_FFT // 2 + 1, _FRAMES.value)
  return tuple(config.data.shape)


def make_y(config, key, b: int) -> jax.Array:
  """A random observation batch: images uniform in [-1, 1]; complex spectrograms N(0, 0.2^2)."""
  shape = (b,) + signal_shape(config)
  if is_speech(config):
    re, im = 0.2 * jax.random.normal(key, (2,) + shape)
    return jax.lax.complex(re, im)
  return jax.random.uniform(key, shape, minval=-1, maxval=1)


def _net(config, name: str):
  return nets.get_network(config[name].net, **config[name].net_kwargs)


def _network_inputs(config, b: int) -> dict:
  """{network: its inputs at batch b}; speech adds the enhancer, whose latent the score net reads."""
  x = jnp.zeros((b,) + signal_shape(config), jnp.complex64 if is_speech(config) else jnp.float32)
  l, t = jnp.zeros((b, config.data.num_classes)), jnp.full((b,), 0.5)
  inputs = {"signal": (x, t, x, l), "logits": (l, t, l, x), "classifier": (x,)}
  if is_speech(config):
    latent = jax.eval_shape(
        lambda y: _net(config, "enhancer").init_with_output(jax.random.PRNGKey(0), y)[0][1], x)
    inputs["signal"] += (jnp.zeros(latent.shape, latent.dtype),)
    inputs["enhancer"] = (x,)
  return inputs


def init_params(config):
  """Random params ({"signal", "logits"}, classifier's) as the sampler takes them; Ex-Diff's
  signal params are {"score", "enhancer"}."""
  key = jax.random.PRNGKey(0)
  params = {name: _net(config, name).init(jax.random.fold_in(key, i), *inputs)["params"]
            for i, (name, inputs) in enumerate(_network_inputs(config, 1).items())}
  # Zero-initialised layers (NCSN++'s output convs) get small random weights: otherwise the
  # score net's output is exactly 0 and the paths' agreement checks nothing.
  leaves, tree = jax.tree.flatten(params)
  leaves = [0.02 * jax.random.normal(jax.random.fold_in(key, 100 + i), p.shape, p.dtype)
            if not p.any() else p for i, p in enumerate(leaves)]
  params = jax.tree.unflatten(tree, leaves)
  if is_speech(config):
    params["signal"] = {"score": params.pop("signal"), "enhancer": params.pop("enhancer")}
  classifier = params.pop("classifier")
  return params, classifier


def params_by_network(params, classifier) -> dict:
  """{network name (as in `_network_inputs`): its params} from `init_params`' output."""
  own = dict(params, classifier=classifier)
  if "score" in params["signal"]:
    own.update(signal=params["signal"]["score"], enhancer=params["signal"]["enhancer"])
  return own


def jax_flops_per_call(config, params, classifier, b: int) -> dict:
  """XLA cost-analysis FLOPs of one call of each network at batch b."""
  own = params_by_network(params, classifier)
  out = {}
  for name, args in _network_inputs(config, b).items():
    apply = functools.partial(lambda net, p, *a: net.apply({"params": p}, *a), _net(config, name))
    out[name] = float(jax.jit(apply).lower(own[name], *args).compile().cost_analysis()["flops"])
  return out


def torch_networks(config, fir_sums: bool = False) -> dict:
  """{network name (as in `_network_inputs`): the PyTorch reference's module, random weights};
  `fir_sums` (speech): NCSN++'s FIR as shifted sums instead of SGMSE+'s `upfirdn2d_native`."""
  if is_speech(config):
    import torch_reference_speech as trs
    return dict(zip(("signal", "enhancer", "logits", "classifier"), trs.build(config, fir_sums)))
  import torch_reference as tr
  return dict(zip(("signal", "logits", "classifier"), tr.build(config)))


def torch_flops_per_call(config, b: int) -> dict:
  torch, _ = bc.setup_torch()
  import torch_reference as tr
  nets = torch_networks(config)
  l = torch.zeros(b, config.data.num_classes)
  if is_speech(config):
    x = torch.zeros((b,) + signal_shape(config), dtype=torch.complex64)
    t = torch.full((b,), 0.5)
    args = {"signal": (x, t, x, l, nets["enhancer"](x)[1]), "enhancer": (x,)}
  else:
    x = torch.zeros((b, config.data.shape[-1]) + tuple(config.data.shape[:2]))
    t = torch.zeros(b)
    args = {"signal": (x, t, x, l)}
  args.update(logits=(l, t, l, x), classifier=(x,))
  return {name: float(tr.count_flops(net, *args[name])) for name, net in nets.items()}


def calls_per_step(config) -> int:
  """Network calls per step of each branch (the predictor's plus the corrector's; both branches
  run the same corrector): the step's NFE."""
  s = config.sampling
  sde = sde_lib.get_sde(config.signal.sde, **config.signal.sde_kwargs)
  return sampling.get_step_fn(sde, s.signal_predictor, s.corrector, s.snr, s.n_corrector).nfe


def sampling_config(config, strategy: str):
  cfg = config.sampling.copy_and_resolve_references()
  cfg.strategy = strategy
  return cfg


def with_steps(config, n: int):
  """The config with n steps in both branches (n = 0: unchanged)."""
  config = config.copy_and_resolve_references()
  if n:
    config.signal.sde_kwargs.N = n
    config.logits.sde_kwargs.N = n
  return config


# ---- (a) the compiled trajectory ----------------------------------------------------------------
def compiler_options(config, y) -> dict:
  """The sampler's own XLA options for a program on y's devices, as evaluation compiles it."""
  return parallel.sample_compiler_options(config.mesh, y.sharding.device_set)


def compile_coupled(config, strategy, params, classifier, y):
  """(compiled fn(params, classifier, key, y), compile seconds, memory analysis)."""
  model = speech.coupled_model(config)
  fn = jax.jit(coupled.get_coupled_fn(model, sampling_config(config, strategy)),
               compiler_options=compiler_options(config, y))
  tic = time.perf_counter()
  compiled = fn.lower(params, classifier, jax.random.PRNGKey(1), y).compile()
  return compiled, time.perf_counter() - tic, compiled.memory_analysis()


def _runner(fn, *args):
  """A callable running `fn(*args)` and blocking until its result is ready."""
  return lambda: jax.block_until_ready(fn(*args))


# ---- (b) the same step, jitted once, from a Python loop -----------------------------------------
def make_step_loop(config, params, classifier, y):
  """(run, first): `run(key, indices=all) -> CoupledOutput` calls the `parallel` strategy's step
  (`coupled.parallel_step`, the scan body) jitted, once per Python iteration, with the same keys
  as the scan; `run(key, first)` compiles every jitted function (one step each side of the switch)."""
  model = speech.coupled_model(config)
  cfg = sampling_config(config, "parallel")
  switch, steps = coupled.parallel_schedule(model, cfg)
  steps = [tuple(a[i] for a in steps) for i in range(len(steps[0]))]
  branches = functools.partial(coupled._Branches, model, cfg)
  jit = functools.partial(jax.jit, compiler_options=compiler_options(config, y))

  @jit
  def start(params, classifier, y, key):   # + the signal's conditioning (Ex-Diff: the latent), once
    b = branches(params, classifier, y)
    return coupled.parallel_start(b, key), b.signal_cond

  @functools.partial(jit, static_argnums=0)
  def step(before_switch, params, classifier, y, cond, k_steps, f_y, carry, inputs):
    return coupled.parallel_step(branches(params, classifier, y, cond), k_steps, f_y,
                                 before_switch, carry, inputs)[0]

  @jit
  def final(params, classifier, y, cond, carry):
    b = branches(params, classifier, y, cond)
    return b.output(carry[4], carry[5], b.signal_nfe + b.logits_nfe)

  def run(key, indices=range(len(steps))):
    (carry, k_steps, f_y), cond = start(params, classifier, y, key)
    for i in indices:
      carry = step(bool(i < switch), params, classifier, y, cond, k_steps, f_y, carry, steps[i])
    return final(params, classifier, y, cond, carry)

  return run, sorted({0, min(switch, len(steps) - 1)})   # the steps that compile every version


def torch_parallel_sampler(config, modules: dict):
  """The PyTorch reference's Parallel sampler over `modules` (as `torch_networks` returns them):
  `sampler(y in torch's layout) -> (x0, logits, f(x0))`."""
  if is_speech(config):
    import torch_reference_speech as trs
    return trs.ParallelSampler(*modules.values(), config)
  import torch_reference as tr
  return tr.ParallelSampler(*modules.values(), n=config.signal.sde_kwargs.N,
                            switch_t=config.sampling.switch_t,
                            logits_std=config.logits.standardize_std)


def torch_sampler(config, y, fir_sums: bool = False):
  """fn() running the PyTorch eager reference's Parallel trajectory on y (in its layout), random
  weights; `fir_sums`: as in `torch_networks`."""
  torch, device = bc.setup_torch()
  modules = {k: m.to(device) for k, m in torch_networks(config, fir_sums).items()}
  yt = torch.from_numpy(np.array(y)).to(device)
  if not is_speech(config):
    yt = yt.permute(0, 3, 1, 2).contiguous()
  sampler = torch_parallel_sampler(config, modules)
  return bc.torch_blocking(lambda: sampler(yt))


# Paths that trace the scan with one of cdjax's CPU speed-ups undone (the before of that change):
# name -> patches (module, attribute, replacement).
_UNDONE = {
    "flax_groupnorm": ((layers, "GroupNorm", nn.GroupNorm),   # GroupNorm(groups): same fields
                       (speech_nets, "GroupNorm", nn.GroupNorm)),
    "flax_attention": ((layers, "dot_product_attention", nn.dot_product_attention),
                       (speech_nets, "dot_product_attention", nn.dot_product_attention)),
}


def bench_parallel(config, params, classifier, b: int, paths, repeats: int, budget: float) -> dict:
  """Items/s, compile time and peak memory (the scan's and PyTorch's) of each path at batch b,
  all timed side by side (`bc.interleaved_runs`). The `_UNDONE` paths: the scan path with a
  speed-up undone."""
  runs, info = {}, {}
  y = make_y(config, jax.random.PRNGKey(2), b)
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
    made = mem.temp_size_in_bytes + mem.output_size_in_bytes if mem else float("nan")
    info[name] = dict(compile_s=compile_s,
                      peak_mib=made * len(sharded_y.sharding.device_set) / 2**20)

  if "scan" in paths:
    add_scan("scan")
    for m in map(int, _MICRO_BATCHES.value):
      if 0 < m < b and b % m == 0:
        add_scan(f"scan_micro{m}", m)
  for name in (p for p in _UNDONE if p in paths):
    with contextlib.ExitStack() as patched:
      for module, attribute, replacement in _UNDONE[name]:
        patched.enter_context(mock.patch.object(module, attribute, replacement))
      add_scan(name)
  if "loop" in paths:
    run_loop, first = make_step_loop(config, *sharded, sharded_y)   # on the scan's devices
    tic = time.perf_counter()
    jax.block_until_ready(run_loop(key, first))   # compiles start / step / final
    warm = time.perf_counter() - tic
    tic = time.perf_counter()
    jax.block_until_ready(run_loop(key, first))
    info["loop"] = dict(compile_s=warm - (time.perf_counter() - tic))
    runs["loop"] = _runner(run_loop, key)
  if "torch" in paths:
    runs["torch"] = torch_sampler(config, y)
  if "torch_fir_sums" in paths:
    if not is_speech(config):
      raise ValueError("path torch_fir_sums is the speech setup's (NCSN++'s FIR); drop it for images.")
    runs["torch_fir_sums"] = torch_sampler(config, y, fir_sums=True)

  timed = bc.interleaved_runs(runs, repeats, budget)
  scan_x0 = timed["scan"]["out"].x0 if "scan" in timed else None
  res = {}
  for name, r in timed.items():
    out = r.pop("out")
    res[name] = dict(r, items_per_s=b / r["sec"], **info.get(name, {}))
    if not name.startswith("torch"):
      res[name]["nfe"] = int(out.nfe)
      if scan_x0 is not None and (name in _UNDONE or name == "loop"):   # same keys: equal up to rounding
        res[name]["max_abs_diff_vs_scan"] = float(jnp.max(jnp.abs(out.x0 - scan_x0)))
  return res


def unet_scan_vs_outside(config, params, b: int, calls: int = 10) -> dict:
  """Seconds per U-Net forward call: jitted alone from Python vs inside a lax.scan of `calls`
  (does XLA:CPU run the forward conv net slower inside a while loop, as it does its gradient?)."""
  net = coupled.model_from_config(config).signal_net
  x = jnp.zeros((b,) + tuple(config.data.shape))
  t, l = jnp.full((b,), 10.0), jnp.zeros((b, config.data.num_classes))
  jit = functools.partial(jax.jit, compiler_options=compiler_options(config, x))
  one = jit(lambda p, x: net(p, x, t, x, l))
  scanned = jit(lambda p, x: jax.lax.scan(lambda x, _: (net(p, x, t, x, l), None), x, None,
                                              length=calls)[0])
  outside, _ = bc.timeit(lambda: jax.block_until_ready(one(params["signal"], x)), calls, warmup=2)
  inside, _ = bc.timeit(lambda: jax.block_until_ready(scanned(params["signal"], x)), 3, warmup=1)
  return dict(outside_s=outside, inside_s=inside / calls, batch=b)


def _compiled_runner(config, fn, args):
  """`_runner` of `fn(*args)` compiled as the sampler (`compiler_options` on args[-1], y)."""
  compiled = jax.jit(fn, compiler_options=compiler_options(config, args[-1])).lower(*args).compile()
  return _runner(compiled, *args)


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
  """Where the time of one Parallel step goes at batch b (each in a lax.scan over the steps), timed
  side by side in rounds: the whole trajectory; its three networks chained as in a step (no SDE
  update, no RNG; before the switch the logit net reads y and f(y), computed once, after it x and
  f(x)); the U-Net alone (on logits that change every step, as in the trajectory). Also an XLA
  profile of the trajectory, and the trajectory pinned to one core (`taskset -c 0`, a
  subprocess: how much of the second core the step uses)."""
  model = coupled.model_from_config(config)
  n = model.signal_sde.N
  switch, _ = coupled.parallel_schedule(model, sampling_config(config, "parallel"))
  y = jax.random.uniform(jax.random.PRNGKey(2), (b,) + tuple(config.data.shape), minval=-1, maxval=1)
  l0, ts = jnp.zeros((b, config.data.num_classes)), jnp.linspace(1.0, 1.0 / n, n)

  def networks(params, classifier, y):
    f_y = model.classifier(classifier, y)

    def body(after_switch):
      def step(carry, t):
        x, l = carry
        t = jnp.full((b,), t)
        c, f_c = (x, model.classifier(classifier, x)) if after_switch else (y, f_y)
        l = model.logits_net(params["logits"], l, t, f_c, c)
        return (model.signal_net(params["signal"], x, t, y, l), l), None
      return step
    carry = jax.lax.scan(body(False), (y, l0), ts[:switch])[0]
    return jax.lax.scan(body(True), carry, ts[switch:])[0]

  def unet(params, y):
    body = lambda x, t: (model.signal_net(params["signal"], x, jnp.full((b,), t), y, l0 + t), None)
    return jax.lax.scan(body, y, ts)[0]

  compiled, _, _ = compile_coupled(config, "parallel", params, classifier, y)
  run = _runner(compiled, params, classifier, jax.random.PRNGKey(1), y)
  timed = bc.interleaved_runs(dict(
      full=run, networks=_compiled_runner(config, networks, (params, classifier, y)),
      unet=_compiled_runner(config, unet, (params, y))), repeats)
  cmd = ["taskset", "-c", "0", *self_command(f"--steps={n}", f"--batches={b}", "--paths=scan",
                                              f"--repeats={repeats}", "--breakdown_batch=0")]
  one_core = bc.run_json_subprocess(cmd, {})
  return dict(batch=b, **{name: dict(ms_per_step=r["sec"] / n * 1e3, times=r["times"])
                          for name, r in timed.items()},
              profile=_profile_ms_per_step(run, n),
              one_core=one_core.get("parallel", {}).get(str(b), {}).get("scan", one_core))


# (name, sampling.strategy, sampling.rounds) of the strategy-cost runs
STRATEGY_RUNS = (("enhance", "enhance_then_classify", 1), ("parallel", "parallel", 1),
                 ("alternating5", "alternating", 5), ("nested", "nested", 1))


def with_rounds(config, rounds: int):
  """The config with `sampling.rounds` = rounds (Alternating's K)."""
  config = config.copy_and_resolve_references()
  config.sampling.rounds = rounds
  return config


def check_strategies(config, params, classifier, b: int) -> None:
  """Traces (does not compile) each strategy-cost run at batch b, so that a config they reject
  (e.g. `sampling.nested_steps` off the grid of `--steps`) fails before the timed stages."""
  y = jax.ShapeDtypeStruct((b,) + tuple(config.data.shape), jnp.float32)
  model = speech.coupled_model(config)
  for _, strategy, rounds in STRATEGY_RUNS:
    fn = coupled.get_coupled_fn(model, sampling_config(with_rounds(config, rounds), strategy))
    jax.eval_shape(fn, params, classifier, jax.random.PRNGKey(1), y)


def bench_strategies(config, params, classifier, b: int, repeats: int, budget: float) -> dict:
  """Wall time (side by side) and NFE of each strategy's compiled trajectory at batch b."""
  y = jax.random.uniform(jax.random.PRNGKey(3), (b,) + tuple(config.data.shape), minval=-1, maxval=1)
  runs, compile_s = {}, {}
  for name, strategy, rounds in STRATEGY_RUNS:
    compiled, compile_s[name], _ = compile_coupled(with_rounds(config, rounds), strategy, params,
                                                   classifier, y)
    runs[name] = _runner(compiled, params, classifier, jax.random.PRNGKey(1), y)
  return {name: dict(sec=r["sec"], times=r["times"], nfe=int(r["out"].nfe), compile_s=compile_s[name])
          for name, r in bc.interleaved_runs(runs, repeats, budget).items()}


def self_command(*args: str) -> list:
  """This script as a subprocess printing JSON: the same config file and `--config.*` overrides,
  strategy costs and XLA variants off, then `args` (later flags win)."""
  fields = [a for a in sys.argv[1:] if a.startswith("--config.")]
  return [sys.executable, os.path.abspath(__file__), f"--config={_CONFIG_PATH}", *fields,
          "--strategy_batch=0", "--json_only", *args]


def run_variants(variants, b: int) -> dict:
  out = {}
  for v in ["default"] + list(variants):   # default: the flags of this run
    cmd = self_command(f"--steps={_STEPS.value}", f"--batches={b}", "--paths=scan",
                       f"--repeats={_REPEATS.value}", "--breakdown_batch=0",
                       f"--micro_batches={','.join(_MICRO_BATCHES.value)}",
                       "--config.mesh.host_cpu_devices=0", "--config.mesh.xla_flags=",
                       "--config.mesh.cpu_sample_xla_flags=")   # the variant's XLA_FLAGS alone
    flags_env = {"default": os.environ.get("XLA_FLAGS", ""), "none": ""}.get(v, v)
    r = bc.run_json_subprocess(cmd, {"XLA_FLAGS": flags_env})
    out[v] = r.get("parallel", {}).get(str(b), r)   # {path: result}, or the error
  return out


def run_unsplit(b: int, breakdown: bool, xla_flags_before: str) -> dict:
  """`bench_parallel` at batch b (and the breakdown) in a subprocess whose host is one device;
  XLA_FLAGS as this process found them, before the config's split was added."""
  cmd = self_command(f"--steps={_STEPS.value}", f"--batches={b}", f"--paths={','.join(_PATHS.value)}",
                     f"--repeats={_REPEATS.value}", f"--budget_s={_BUDGET.value}",
                     f"--micro_batches={','.join(_MICRO_BATCHES.value)}",
                     f"--breakdown_batch={b if breakdown else 0}",
                     "--config.mesh.host_cpu_devices=0")
  return bc.run_json_subprocess(cmd, {"XLA_FLAGS": xla_flags_before}, timeout=3600)


_CONFIG_PATH = "configs/mnist_demo.py"


def main(argv):
  del argv
  global _CONFIG_PATH
  _CONFIG_PATH = flags.FLAGS["config"].config_filename
  config = with_steps(_CONFIG.value, _STEPS.value)
  xla_flags_before = os.environ.get("XLA_FLAGS", "")
  bc.configure_xla(config.mesh)
  bc.full_float32()
  load_before = bc.load_average()
  t_start = time.perf_counter()
  params, classifier = init_params(config)
  batches = [int(b) for b in _BATCHES.value]
  results = dict(load_before=load_before, xla_flags=os.environ.get("XLA_FLAGS", ""),
                 devices=jax.device_count(),
                 threads=bc.THREADS, steps=config.signal.sde_kwargs.N, parallel={})
  image = not is_speech(config)   # the breakdown, strategy costs and XLA variants: images only
  on_cpu = bc.backend() == "cpu"  # the breakdown (XLA:CPU profile, one core) and variants: CPU only

  def save(finished: bool = False):
    """Writes the stages measured so far (a run stopped by a time limit keeps them)."""
    results.update(load_after=bc.load_average(), total_s=time.perf_counter() - t_start,
                   finished=finished)
    if _JSON_ONLY.value:
      if finished:
        print(json.dumps(results))
      return
    with open(os.path.join(bc.RESULTS_DIR, f"bench_{section(config)}_raw.json"), "w") as f:
      json.dump(results, f, indent=2)
    write(results, config)

  if image and _STRATEGY_BATCH.value > 0:
    check_strategies(config, params, classifier, _STRATEGY_BATCH.value)
  if not _JSON_ONLY.value:
    results["matmul_gflops"] = bc.matmul_peak()
    results["flops_jax"] = jax_flops_per_call(config, params, classifier, 1)
    if "torch" in _PATHS.value:
      results["flops_torch"] = torch_flops_per_call(config, 1)
    if image:
      results["scan_vs_outside"] = unet_scan_vs_outside(config, params, 16)
  unsplit = [b for b in batches if str(b) in _UNSPLIT.value and on_cpu and jax.device_count() > 1]
  for b in batches:
    if b in unsplit:
      child = run_unsplit(b, image and b == _BREAKDOWN_BATCH.value, xla_flags_before)
      if "error" in child:
        raise RuntimeError(f"the unsplit-host run of batch {b} failed: {child['error']}")
      results["parallel"][str(b)] = child["parallel"][str(b)]
      results.setdefault("unsplit", {})[str(b)] = dict(xla_flags=child["xla_flags"],
                                                       devices=child["devices"])
      if "breakdown" in child:
        results["breakdown"] = child["breakdown"]
    else:
      results["parallel"][str(b)] = bench_parallel(config, params, classifier, b, _PATHS.value,
                                                   _REPEATS.value, _BUDGET.value)
    print(f"batch {b}:", json.dumps({k: round(v["items_per_s"], 3)
                                     for k, v in results["parallel"][str(b)].items()}),
          file=sys.stderr, flush=True)
    save()
  if image and on_cpu and _BREAKDOWN_BATCH.value > 0 and "breakdown" not in results:
    results["breakdown"] = step_breakdown(config, params, classifier, _BREAKDOWN_BATCH.value,
                                          _REPEATS.value)
    save()
  if image and _STRATEGY_BATCH.value > 0:
    results["strategies"] = bench_strategies(config, params, classifier, _STRATEGY_BATCH.value,
                                             _STRATEGY_REPEATS.value, _BUDGET.value)
    save()
  if image and on_cpu and _XLA_VARIANTS.value:
    results["xla_variants"] = run_variants(_XLA_VARIANTS.value, _VARIANT_BATCH.value)
  save(finished=True)


def write(results: dict, config) -> None:
  e, S = [], dict(section=section(config))
  n = results["steps"]
  fl = results["flops_jax"]
  # per item: the networks of each step (each once per predictor / corrector call), the
  # classifier on y once, on x0_hat at each step after the switch and on x0 at the end, plus the
  # enhancer once (speech)
  switch, _ = sde_lib.get_sde(config.signal.sde, **config.signal.sde_kwargs).switch_step(
      config.sampling.switch_t)
  classifier_calls = n - switch + 2
  k = calls_per_step(config)
  traj_flops = n * k * (fl["signal"] + fl["logits"]) \
      + classifier_calls * fl["classifier"] + fl.get("enhancer", 0.0)
  calls = f"{n} steps x {k} x (signal net + logit net) + classifier x {classifier_calls}"
  prefix = "speech_" if is_speech(config) else ""
  peak = max(results["matmul_gflops"].values())
  mm = bc.matmul_size()
  e.append(bc.entry("matmul_peak_jax", results["matmul_gflops"]["jax"], "GFLOP/s",
                    f"{mm}^2 f32 jnp.dot", float("nan"), **S))
  if "torch" in results["matmul_gflops"]:
    e.append(bc.entry("matmul_peak_torch", results["matmul_gflops"]["torch"], "GFLOP/s",
                      f"{mm}^2 f32 torch.mm", float("nan"), **S))
  for name in results["flops_jax"]:
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
      e.append(bc.entry(f"sampler_jit_scan_items_per_s_b{b}", s["items_per_s"], "items/s", calls,
                        float("nan"), **S))
      e.append(bc.entry(f"sampler_jit_scan_frac_of_peak_b{b}", gflops, "GFLOP/s", peak, **S))
      e.append(bc.entry(f"sampler_jit_scan_compile_s_b{b}", s["compile_s"], "s", "lower+compile",
                        float("nan"), **S))
      torch_mib = r.get("torch", {}).get("torch_peak_mib")
      e.append(bc.entry(f"sampler_jit_scan_peak_mib_b{b}", s["peak_mib"], "MiB",
                        "PyTorch eager not run" if torch_mib is None else torch_mib, **S))
    for path in (p for p in r if p.startswith("scan_micro")):
      m = path[len("scan_micro"):]
      versus(f"sampler_jit_scan_micro{m}_vs_whole_batch_b{b}", r[path], r["scan"])
      if "torch" in r:
        versus(f"sampler_jit_scan_micro{m}_vs_torch_eager_b{b}", r[path], r["torch"])
    if "scan" in r and "torch" in r:
      versus(f"sampler_jit_scan_vs_torch_eager_b{b}", r["scan"], r["torch"])
    if "scan" in r and "torch_fir_sums" in r:
      versus(f"sampler_jit_scan_vs_torch_fir_sums_b{b}", r["scan"], r["torch_fir_sums"])
    for path in (p for p in _UNDONE if "scan" in r and p in r):
      versus(f"sampler_jit_scan_vs_{path}_b{b}", r["scan"], r[path])
      e.append(bc.entry(f"sampler_{path}_max_abs_diff_vs_scan_b{b}", r[path]["max_abs_diff_vs_scan"],
                        "abs", "x0 of the scan, same keys", float("nan"), **S))
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
    full, nets, u = bd["full"], bd["networks"], bd["unet"]
    e.append(bc.entry(f"sampler_step_vs_networks_only_b{b}", full["ms_per_step"], "ms/step",
                      nets["ms_per_step"], bc.paired_ratio(nets, full), **S))
    e.append(bc.entry(f"unet_share_of_step_b{b}", u["ms_per_step"], "ms/step",
                      full["ms_per_step"], bc.paired_ratio(full, u), **S))
    prof = bd["profile"]["ms_per_step"]
    for kind, ms in prof.items():
      e.append(bc.entry(f"profile_{kind}_share_of_step_b{b}", ms, "ms/step (profiled)",
                        sum(prof.values()), **S))
    e.append(bc.entry(f"profile_xla_ops_per_step_b{b}", bd["profile"]["ops_per_step"], "ops",
                      "thunks run per step", float("nan"), **S))
    two_cores = results["parallel"].get(str(b), {}).get("scan")
    if "items_per_s" in bd["one_core"] and two_cores:   # the table's rounds, both cores
      e.append(bc.entry(f"sampler_jit_scan_two_cores_vs_one_b{b}", two_cores["items_per_s"],
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
           *([] if results.get("finished", True) else
             ["partial: written after each stage, and the run stopped before the last"]),
           f"threads: BENCH_THREADS={results['threads']} (torch.set_num_threads, OMP), XLA_FLAGS="
           f"'{results['xla_flags']}' ({results['devices']} devices); {n} DDPM steps; every path "
           f"of a batch size timed side by side: one untimed call each, one untimed round, then "
           f"up to {_REPEATS.value} rounds calling each in turn, ordered by a Williams design "
           f"(no path always right after the same one); value and baseline: each path's median; "
           f"the ratio of two paths: the median over rounds of their per-round ratio; "
           f"total script time {results['total_s']:.0f} s",
           f"FLOPs per item per trajectory: {traj_flops / 1e9:.2f} GFLOP (XLA cost analysis per "
           f"network call; {calls}{' + the enhancer once' if 'enhancer' in fl else ''}), as the "
           "eager reference runs them: XLA hoists the loop-invariant encoders of y out of the "
           "scan, which the reference recomputes every step; frac_of_peak ratio = achieved "
           f"GFLOP/s over the best measured {mm}^2 matmul",
           "flops_per_call_*: value = XLA cost_analysis (all ops), baseline = torch FlopCounterMode "
           "(conv/matmul/attention only, 2 FLOPs per MAC)"]
  for b, u in results.get("unsplit", {}).items():
    notes.append(f"batch {b}{' and the breakdown' if bd and str(bd['batch']) == b else ''}: every "
                 f"path timed side by side in a subprocess whose host is one device "
                 f"(--config.mesh.host_cpu_devices=0; XLA_FLAGS='{u['xla_flags']}', "
                 f"{u['devices']} device), where samplers compile with mesh.cpu_sample_xla_flags, "
                 "as evaluation does there (`--unsplit_batches`)")
  notes.append("sampler_jit_scan_peak_mib: memory made during one trajectory call (parameters and "
               "y excluded): value = the scan's XLA buffer assignment, temporaries + outputs, "
               "summed over the devices it runs on (compiled.memory_analysis()); baseline = the "
               "peak of PyTorch's tensor allocations during its first call (the profiler's "
               "allocation events on a CPU, torch.cuda.max_memory_allocated on a GPU); neither "
               "counts library scratch outside the framework's allocator (YNNPACK's, oneDNN's)")
  notes += bc.accelerator_note("no XLA:CPU breakdown or flag variants")
  if is_speech(config):
    notes.append(f"speech setup: y = complex compressed spectrograms [B, {signal_shape(config)[0]}, "
                 f"{_FRAMES.value}] (random), the config's networks with random weights (the "
                 "enhancer's latent computed once per trajectory), PyTorch reference "
                 "torch_reference_speech.py")
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
  command = bc.command(sys.argv)
  e = [dict(entry, name=prefix + entry["name"]) for entry in e]
  print(bc.write_results(e, command, notes, section(config)))


if __name__ == "__main__":
  overrides.run(main, "configs/mnist_demo.py")
