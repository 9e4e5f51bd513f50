"""Coupled diffusion of signals and logits: the Parallel, Alternating and Nested strategies, and the
baselines, all composed from one pair of branch steps and the scan sampler of `cdjax.sampling`.

`run(model, cfg, params, classifier_params, key, y) -> CoupledOutput` is the pure entry point,
with `params = {"signal": ..., "logits": ...}`, `y` the degraded observation [B, ...] and `cfg`
the `sampling` config section. A strategy is a registered `fn(branches, key) -> CoupledOutput`;
every diffusion step runs inside `jax.lax.scan` (nested scans where the strategy nests), so
`jax.jit(get_coupled_fn(model, cfg))` compiles a whole run.
"""
import copy
import dataclasses
import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from cdjax import guidance
from cdjax import nets
from cdjax import sampling
from cdjax import sde as sde_lib
from cdjax.registry import Registry

STRATEGIES = Registry("strategy")


def standardize_logits(logits, std: float):
  """Per-sample re-standardisation of logits [B, K] to mean 0 and standard deviation `std`.

  The official logit branch re-standardises its x0 estimate (std 0.8) in every reverse step;
  here the training targets and conditioning logits go through the same map too (the official
  code trains on raw logits). The std is the population one (ddof 0, eps 1e-6; the official
  `torch.std` is unbiased, eps 1e-5: 5% more spread at K = 10). `std <= 0`: identity.
  """
  if std <= 0:
    return logits
  centred = logits - logits.mean(-1, keepdims=True)
  return std * centred / (centred.std(-1, keepdims=True) + 1e-6)


@dataclasses.dataclass(frozen=True)
class CoupledModel:
  """The two branches and the frozen classifier, as pure functions of their parameters.

  signal_net(params, x_t, t, cond, logits) -> output shaped like x_t, where
    cond = signal_context(params, y) is computed once per sampler call (default: y itself; Ex-Diff:
    y and the frozen enhancer's latent of y)
  logits_net(params, l_t, t, cond_logits, cond_signal) -> output [B, K]
  classifier(params, x) -> logits [B, K]    (inference mode, never trained here)
  Outputs are turned into scores by `sde.score_from_output` with the branch's parameterization.
  """
  signal_sde: sde_lib.SDE
  logits_sde: sde_lib.SDE
  signal_net: Callable
  logits_net: Callable
  classifier: Callable
  num_classes: int
  signal_parameterization: str = "eps"
  logits_parameterization: str = "eps"
  signal_x0_range: Optional[tuple] = (-1.0, 1.0)   # clip of x0_hat (images); None: no clip
  logits_std: float = 0.8
  signal_context: Callable = lambda params, y: y
  input_shape: Optional[tuple] = None   # y's shape less the batch (images, NHWC); None: any


def model_from_config(config) -> CoupledModel:
  """The CoupledModel of a full experiment config (sections signal, logits, classifier, data)."""
  def inference(section):
    net = nets.get_network(section.net, **section.net_kwargs)
    return lambda params, *inputs: net.apply({"params": params}, *inputs, train=False)

  s, l = config.signal, config.logits
  return CoupledModel(
      signal_sde=sde_lib.get_sde(s.sde, **s.sde_kwargs),
      logits_sde=sde_lib.get_sde(l.sde, **l.sde_kwargs),
      signal_net=inference(s), logits_net=inference(l), classifier=inference(config.classifier),
      num_classes=config.data.num_classes,
      signal_parameterization=s.parameterization, logits_parameterization=l.parameterization,
      signal_x0_range=None if s.x0_clip is None else tuple(s.x0_clip),
      logits_std=l.standardize_std,
      input_shape=tuple(config.data.shape) if config.data.modality == "image" else None)


class CoupledOutput(NamedTuple):
  x0: jax.Array                  # enhanced signal [B, ...]
  logits: jax.Array              # the method's final class logits [B, K]
  classifier_logits: jax.Array   # f(x0): "classify the enhanced signal" [B, K]
  nfe: jax.Array                 # network evaluations per item (signal + logit nets), scalar
  trajectory: Any = None         # strategy-specific clean estimates, or None


def logits_corrector(cfg) -> str:
  """The logit branch's corrector: `cfg.logits_corrector`, or "same" (default): `cfg.corrector`,
  as the official speech sampler runs its annealed Langevin on both branches (its image sampler
  has none)."""
  return cfg.corrector if cfg.logits_corrector == "same" else cfg.logits_corrector


class _Branches:
  """One signal step and one logit step with their conditioning; shared by every strategy."""

  def __init__(self, model: CoupledModel, cfg, params, classifier_params, y, signal_cond=None):
    """signal_cond: `model.signal_context(params["signal"], y)` where already computed (a
    per-step loop computes it once)."""
    self.model, self.cfg, self.params, self.y = model, cfg, params, y
    self.classify = functools.partial(model.classifier, classifier_params)
    g = cfg.guidance
    self.signal_scale, self.logits_scale, self.temperature = (
        g.signal_scale, g.logits_scale, g.temperature)
    clip = model.signal_x0_range
    self.signal_step = sampling.get_step_fn(
        model.signal_sde, cfg.signal_predictor, cfg.corrector, cfg.snr, cfg.n_corrector,
        x0_transform=None if clip is None else (lambda x0: jnp.clip(x0, *clip)),
        predictor_kwargs=cfg.predictor_kwargs)
    self.logits_step = sampling.get_step_fn(
        model.logits_sde, cfg.logits_predictor, logits_corrector(cfg), cfg.snr, cfg.n_corrector,
        x0_transform=self.standardize)
    self.zero_logits = jnp.zeros((y.shape[0], model.num_classes), jnp.float32)
    self.f_y = self.class_logits(y)   # XLA drops it from a program that never reads it
    self.signal_cond = (model.signal_context(params["signal"], y) if signal_cond is None
                        else signal_cond)

  def standardize(self, logits):
    return standardize_logits(logits, self.model.logits_std)

  def class_logits(self, x):
    """f(x) on the logit branch's scale."""
    return self.standardize(self.classify(x))

  # ---- scores -----------------------------------------------------------------------------
  def signal_score_fn(self, logits_cond, guide_logits):
    """score(x_t, t) of the signal branch conditioned on `logits_cond` [B, K]."""
    m = self.model

    def score_fn(x, t):
      out = m.signal_net(self.params["signal"], x, t, self.signal_cond, logits_cond)
      score = m.signal_sde.score_from_output(out, t, m.signal_parameterization)
      if self.signal_scale:
        x0_hat = m.signal_sde.x0_from_score(x, score, t, self.y)
        score = score + guidance.signal_guidance(
            self.classify, x0_hat, guide_logits, self.signal_scale, self.temperature)
      return score
    return score_fn

  def logits_score_fn(self, cond_signal, cond_logits, guide_signal):
    """score(l_t, t) of the logit branch conditioned on a signal c [B, ...] and f(c) [B, K]."""
    m = self.model

    def score_fn(l, t):
      out = m.logits_net(self.params["logits"], l, t, cond_logits, cond_signal)
      score = m.logits_sde.score_from_output(out, t, m.logits_parameterization)
      if self.logits_scale:
        l0_hat = m.logits_sde.x0_from_score(l, score, t, cond_logits)
        score = score + guidance.logits_guidance(
            l0_hat, self.class_logits(guide_signal), self.logits_scale)
      return score
    return score_fn

  # ---- one step of each branch ------------------------------------------------------------
  def signal_update(self, key, x, t, t_next, logits_cond, guide_logits):
    return self.signal_step(key, x, t, t_next, self.signal_score_fn(logits_cond, guide_logits), self.y)

  def logits_update(self, key, l, t, t_next, cond_signal, guide_signal, cond_logits=None):
    """One logit step conditioned on c and f(c) (computed here unless given)."""
    cond_logits = self.class_logits(cond_signal) if cond_logits is None else cond_logits
    score_fn = self.logits_score_fn(cond_signal, cond_logits, guide_signal)
    return self.logits_step(key, l, t, t_next, score_fn, cond_logits)

  # ---- full trajectories ------------------------------------------------------------------
  def signal_init(self, key):
    return self.model.signal_sde.prior_sample(key, self.y.shape, self.y)

  def logits_init(self, key):
    """l_T, centred on f(y) where the logit SDE reverts to its conditioning (speech; as the
    official code starts every logit trajectory, whatever it is conditioned on)."""
    return self.model.logits_sde.prior_sample(key, self.zero_logits.shape, self.f_y)

  def signal_trajectory(self, key, logits_cond):
    """A full signal trajectory from fresh noise, conditioned on fixed logits -> x0 [B, ...]."""
    k_init, k_steps = jax.random.split(key)
    score_fn = self.signal_score_fn(logits_cond, logits_cond)
    x0, _ = sampling.sample(self.signal_step, self.model.signal_sde, score_fn, k_steps,
                            self.signal_init(k_init), self.y)
    return x0

  def logits_trajectory(self, key, cond_signal):
    """A full logit trajectory conditioned on a fixed signal c -> l0 [B, K]."""
    k_init, k_steps = jax.random.split(key)
    cond_logits = self.class_logits(cond_signal)
    score_fn = self.logits_score_fn(cond_signal, cond_logits, cond_signal)
    l0, _ = sampling.sample(self.logits_step, self.model.logits_sde, score_fn, k_steps,
                            self.logits_init(k_init), cond_logits)
    return l0

  @property
  def signal_nfe(self):
    return self.signal_step.nfe * self.model.signal_sde.N

  @property
  def logits_nfe(self):
    return self.logits_step.nfe * self.model.logits_sde.N

  def output(self, x0, logits, nfe, trajectory=None):
    return CoupledOutput(x0, logits, self.classify(x0), jnp.asarray(nfe, jnp.int32), trajectory)


def _initial_logits(b: _Branches):
  """Round-one logits: zeros (images, official) or f(y) (speech, official)."""
  if b.cfg.initial_logits == "zeros":
    return b.zero_logits
  if b.cfg.initial_logits == "classifier":
    return b.f_y
  raise ValueError(f"Unknown sampling.initial_logits {b.cfg.initial_logits!r}; use 'zeros' or 'classifier'.")


# ---- strategies ---------------------------------------------------------------------------------
def parallel_schedule(model: CoupledModel, cfg):
  """Checks the Parallel settings; returns (switch, steps): the index of the first step after the
  switch and the per-step inputs (i, tx, tx_next, tl, tl_next) as numpy [N] arrays."""
  if model.signal_sde.N != model.logits_sde.N:
    raise ValueError(f"Parallel needs equal step counts; signal N={model.signal_sde.N}, logits "
                     f"N={model.logits_sde.N}. Set signal.sde_kwargs.N = logits.sde_kwargs.N.")
  if cfg.cond_source not in ("clean", "noisy"):
    raise ValueError(f"Unknown sampling.cond_source {cfg.cond_source!r}; use 'clean' or 'noisy'.")
  if cfg.parallel_order not in ("logits_first", "signal_first"):
    raise ValueError(f"Unknown sampling.parallel_order {cfg.parallel_order!r}; "
                     "use 'logits_first' or 'signal_first'.")
  ts_x, ts_l = model.signal_sde.timesteps(), model.logits_sde.timesteps()
  switch, _ = model.signal_sde.switch_step(cfg.switch_t)
  return switch, (np.arange(model.signal_sde.N), ts_x[:-1], ts_x[1:], ts_l[:-1], ts_l[1:])


def parallel_start(b: _Branches, key):
  """(carry, k_steps, f_y): the Parallel carry before the first step, the key of the steps and
  f(y) on the logit scale (the conditioning before the switch, computed once)."""
  k_x, k_l, k_steps = jax.random.split(key, 3)
  x, l = b.signal_init(k_x), b.logits_init(k_l)
  return (x, l, b.y, _initial_logits(b), x, l), k_steps, b.f_y


def parallel_step(b: _Branches, k_steps, f_y, before_switch: bool, carry, inputs):
  """One Parallel step (both branches at the same step) -> (carry, trajectory item or None).
  carry = (x, l, x0_hat, l0_hat, x_mean, l_mean); inputs = (i, tx, tx_next, tl, tl_next)."""
  cfg = b.cfg
  noisy = cfg.cond_source == "noisy"
  x, l, x0_hat, l0_hat, _, _ = carry
  i, tx, tx_next, tl, tl_next = inputs
  k_sig, k_log = jax.random.split(jax.random.fold_in(k_steps, i))

  def logits_half(x, x0_hat):
    if before_switch:
      return b.logits_update(k_log, l, tl, tl_next, b.y, x0_hat, cond_logits=f_y)
    return b.logits_update(k_log, l, tl, tl_next, x if noisy else x0_hat, x0_hat)

  if cfg.parallel_order == "logits_first":
    out_l = logits_half(x, x0_hat)
    out_x = b.signal_update(k_sig, x, tx, tx_next, l if noisy else out_l.x0_hat, out_l.x0_hat)
  else:   # the official speech sampler: the signal sees f(y) until the switch, then l0_hat
    l_cond = l if noisy else (f_y if before_switch else l0_hat)
    out_x = b.signal_update(k_sig, x, tx, tx_next, l_cond, l0_hat)
    out_l = logits_half(x, out_x.x0_hat)   # noisy: x_t at this step, as in logits_first
  carry = (out_x.x, out_l.x, out_x.x0_hat, out_l.x0_hat, out_x.x_mean, out_l.x_mean)
  return carry, ((out_x.x0_hat, out_l.x0_hat) if cfg.return_trajectory else None)


@STRATEGIES.register("parallel")
def parallel(b: _Branches, key):
  """One joint loop: both branches at the same step. `cfg.parallel_order` 'logits_first'
  (images: logit step, then the signal step on the l0_hat just computed) or 'signal_first'
  (speech: signal step on f(y) until the switch, on the previous step's l0_hat after it, then the
  logit step). The logit branch sees y and f(y) until the switch step, then the signal's x0_hat
  (or its noisy state x_t with `cond_source='noisy'`; the signal branch then sees l_t)."""
  switch, steps = parallel_schedule(b.model, b.cfg)
  carry, k_steps, f_y = parallel_start(b, key)
  n = len(steps[0])
  trajs = []
  for before_switch, part in ((True, slice(0, switch)), (False, slice(switch, n))):
    if part.stop > part.start:   # two scans: before the switch f(y) is a constant
      body = functools.partial(parallel_step, b, k_steps, f_y, before_switch)
      carry, traj = jax.lax.scan(body, carry, tuple(a[part] for a in steps))
      trajs.append(traj)
  traj = jax.tree.map(lambda *t: jnp.concatenate(t), *trajs) if b.cfg.return_trajectory else None
  return b.output(carry[4], carry[5], b.signal_nfe + b.logits_nfe, traj)


@STRATEGIES.register("alternating")
def alternating(b: _Branches, key):
  """K = cfg.rounds rounds; a round is a full signal trajectory from fresh noise conditioned on
  the current logits (round one: `cfg.initial_logits`), then a full logit trajectory conditioned
  on its x0. `cfg.skip_last_logits` (speech) ends on the signal run: the logits are then the
  previous round's (with K = 1 the initial logits), as the official code returns them."""
  rounds = b.cfg.rounds
  if rounds < 1:
    raise ValueError(f"sampling.rounds must be >= 1, got {rounds}.")

  def round_fn(carry, r):
    logits, _ = carry
    k_round = jax.random.fold_in(key, r)
    x0 = b.signal_trajectory(jax.random.fold_in(k_round, 0), logits)
    last = r == rounds - 1
    if b.cfg.skip_last_logits:
      l0 = jax.lax.cond(last, lambda: logits,
                        lambda: b.logits_trajectory(jax.random.fold_in(k_round, 1), x0))
    else:
      l0 = b.logits_trajectory(jax.random.fold_in(k_round, 1), x0)
    return (l0, x0), ((x0, l0) if b.cfg.return_trajectory else None)

  init = (_initial_logits(b), jnp.zeros_like(b.y))
  (logits, x0), traj = jax.lax.scan(round_fn, init, jnp.arange(rounds))
  logit_runs = rounds - 1 if b.cfg.skip_last_logits else rounds
  return b.output(x0, logits, rounds * b.signal_nfe + logit_runs * b.logits_nfe, traj)


def _grid_indices(grid: np.ndarray, times) -> np.ndarray:
  """Indices into the step grid [N] of `times` (sampling.nested_steps), unique and sorted;
  a ValueError names any time that is not on the grid."""
  times = np.asarray(times, np.float32).reshape(-1)
  match = np.isclose(times[:, None], grid[None, :], rtol=1e-6, atol=1e-6)
  off = times[~match.any(1)]
  if off.size:
    raise ValueError(f"sampling.nested_steps {off.tolist()} are not steps of the logit SDE's grid "
                     f"({grid[0]:g} ... {grid[-1]:g}, {grid.size} steps); use values of "
                     "logits_sde.timesteps()[:-1].")
  return np.unique(match.argmax(1))


@STRATEGIES.register("nested")
def nested(b: _Branches, key):
  """One logit trajectory; before each logit step in `cfg.nested_steps` a full signal trajectory
  is re-run on the logits estimated so far (the previous step's l0_hat; round-one logits before
  the first step), and that step and the later ones are conditioned on its x0 and f(x0). Before
  the first re-run the logit steps see a first signal trajectory on the round-one logits
  (`cfg.nested_first_signal_run`, images) or y and f(y) (speech). `cfg.final_signal_run`
  (speech) adds one last signal run on the final logits; x0 is otherwise the last signal run's
  (y where none ran). With one key per stage, as Alternating's first round: the first run and
  the logit trajectory are Alternating K=1's."""
  m = b.model
  ts = m.logits_sde.timesteps()
  refresh_at = _grid_indices(ts[:-1], b.cfg.nested_steps)
  k_round = jax.random.fold_in(key, 0)
  k_signal, k_logits, k_refresh, k_final = (jax.random.fold_in(k_round, j) for j in range(4))
  l0_hat = _initial_logits(b)
  if b.cfg.nested_first_signal_run:
    c = b.signal_trajectory(k_signal, l0_hat)
    c_logits = b.class_logits(c)
  else:
    c, c_logits = b.y, b.f_y
  k_init, k_steps = jax.random.split(k_logits)

  def body(carry, inputs):
    l, _, l0_hat, c, c_logits = carry
    i, t, t_next = inputs

    def refresh():
      x0 = b.signal_trajectory(jax.random.fold_in(k_refresh, i), l0_hat)
      return x0, b.class_logits(x0)
    c, c_logits = jax.lax.cond(jnp.any(i == refresh_at), refresh, lambda: (c, c_logits))
    out = b.logits_update(jax.random.fold_in(k_steps, i), l, t, t_next, c, c, cond_logits=c_logits)
    carry = (out.x, out.x_mean, out.x0_hat, c, c_logits)
    return carry, (out.x0_hat if b.cfg.return_trajectory else None)

  l = b.logits_init(k_init)
  steps = (jnp.arange(m.logits_sde.N), ts[:-1], ts[1:])
  (_, logits, _, x0, _), traj = jax.lax.scan(body, (l, l, l0_hat, c, c_logits), steps)
  signal_runs = int(b.cfg.nested_first_signal_run) + len(refresh_at)
  if b.cfg.final_signal_run:
    x0 = b.signal_trajectory(k_final, logits)
    signal_runs += 1
  return b.output(x0, logits, signal_runs * b.signal_nfe + b.logits_nfe, traj)


# ---- baselines ----------------------------------------------------------------------------------
@STRATEGIES.register("noisy")
def noisy(b: _Branches, key):
  """Classify the degraded input: x0 = y, logits = f(y)."""
  del key
  return b.output(b.y, b.f_y, 0)


@STRATEGIES.register("enhance_then_classify")
def enhance_then_classify(b: _Branches, key):
  """The signal diffusion alone (zero logits), then the classifier on its output."""
  x0 = b.signal_trajectory(jax.random.fold_in(jax.random.fold_in(key, 0), 0), b.zero_logits)
  return b.output(x0, b.class_logits(x0), b.signal_nfe)


@STRATEGIES.register("card")
def card(b: _Branches, key):
  """CARD-style: the logit diffusion conditioned on the degraded input only (no enhancement)."""
  return b.output(b.y, b.logits_trajectory(key, b.y), b.logits_nfe)


# ---- entry points -------------------------------------------------------------------------------
def run(model: CoupledModel, cfg, params, classifier_params, key, y) -> CoupledOutput:
  """Runs `cfg.strategy` on observations y [B, ...]; with `cfg.num_samples > 1` the final logits
  are a majority vote (ties broken by the mean logits) over independent samples (x0, f(x0) and
  the trajectory are the first sample's; NFE counts every sample). With
  0 < `cfg.micro_batch` < B, the batch runs as B / micro_batch sequential chunks (`lax.map`)
  of micro_batch items, chunk i with key fold_in(key, i) and items i, i + B / micro_batch, ...
  (so a batch sharded over devices stays spread over them); XLA:CPU runs these networks faster
  per item on small batches."""
  _check_inputs(model, params, y)
  m = cfg.micro_batch
  if 0 < m < y.shape[0]:
    return _micro_batched(model, cfg, params, classifier_params, key, y, m)
  strategy = STRATEGIES.get(cfg.strategy)
  b = _Branches(model, cfg, params, classifier_params, y)
  if cfg.num_samples <= 1:
    return strategy(b, key)
  outs = jax.lax.map(lambda k: strategy(b, k), jax.random.split(key, cfg.num_samples))
  votes = jax.nn.one_hot(outs.logits.argmax(-1), model.num_classes).sum(0)
  logits = votes + 1e-3 * jax.nn.softmax(outs.logits.mean(0), -1)
  first = jax.tree.map(lambda a: a[0], outs.trajectory)
  return CoupledOutput(outs.x0[0], logits, outs.classifier_logits[0], outs.nfe[0] * cfg.num_samples,
                       first)


def _check_inputs(model: CoupledModel, params, y) -> None:
  """Raises an error naming the problem unless params holds both branches and y [B, ...] is
  floating (or complex) and, where the model knows it, of its input shape."""
  missing = [k for k in ("signal", "logits") if k not in params]
  if missing:
    raise KeyError(f"params lacks {missing}; give {{'signal': ..., 'logits': ...}} (e.g. the "
                   "'joint' or 'pretrained' entry of experiment.load_params).")
  if not jnp.issubdtype(y.dtype, jnp.inexact):
    raise TypeError(f"y has dtype {y.dtype}; give floats (images scaled to [-1, 1], as "
                    "data.standardize does).")
  if model.input_shape is not None and tuple(y.shape[1:]) != model.input_shape:
    raise ValueError(f"y has shape {tuple(y.shape)}; this model takes [B, "
                     f"{', '.join(map(str, model.input_shape))}] (config data.shape, NHWC).")


def _micro_batched(model, cfg, params, classifier_params, key, y, m: int) -> CoupledOutput:
  b = y.shape[0]
  if b % m:
    raise ValueError(f"sampling.micro_batch={m} must divide the batch size {b}.")
  if cfg.return_trajectory:
    raise ValueError("sampling.micro_batch does not support return_trajectory; set micro_batch=0.")
  cfg = copy.deepcopy(cfg)
  cfg.micro_batch = 0
  to_chunks = lambda a: a.reshape((m, b // m) + a.shape[1:]).swapaxes(0, 1)   # [B/m, m, ...]
  from_chunks = lambda a: a.swapaxes(0, 1).reshape((b,) + a.shape[2:])
  outs = jax.lax.map(lambda args: run(model, cfg, params, classifier_params,
                                      jax.random.fold_in(key, args[0]), args[1]),
                     (jnp.arange(b // m), to_chunks(y)))
  return CoupledOutput(from_chunks(outs.x0), from_chunks(outs.logits),
                       from_chunks(outs.classifier_logits), outs.nfe[0])


def get_coupled_fn(model: CoupledModel, cfg) -> Callable:
  """`fn(params, classifier_params, key, y) -> CoupledOutput` for the strategy in `cfg`; jit it."""
  return functools.partial(run, model, cfg)
