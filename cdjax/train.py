"""Training: the train state, one train-step factory, the trainers, and the training loop.

Every trainer (classifier, signal, logits, enhancer, joint) runs through the same
`make_train_step`; a trainer (`TRAINERS`) only says which loss (`cdjax.losses`) it minimises, what
the networks are conditioned on, and how its parameters start. `train(config, workdir, name)`
runs one, resuming from the latest checkpoint in `workdir`.
"""
import copy
import dataclasses
import functools
import json
import math
import os
import time
from typing import Any, Callable, Optional

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from cdjax import audio
from cdjax import checkpoint
from cdjax import data
from cdjax import errors
from cdjax import exdiff
from cdjax import losses
from cdjax import nets
from cdjax import parallel
from cdjax import sde as sde_lib
from cdjax.nets.layers import after
from cdjax.registry import Registry

LossFn = Callable[..., tuple[jax.Array, dict]]   # (params, frozen, batch, rng) -> (loss, metrics)
TRAINERS = Registry("trainer")         # name -> builder(config) -> Trainer
OBSERVATIONS = Registry("modality")    # config.data.modality -> builder(config) -> observe fn


@struct.dataclass
class TrainState:
  """Everything a step changes; a pytree, checkpointed whole."""
  step: jax.Array        # int32 scalar: optimizer updates done
  params: Any
  opt_state: Any
  ema_params: Any
  rng: jax.Array         # base key; step s uses fold_in(rng, s)

  @classmethod
  def create(cls, params, optimizer: optax.GradientTransformation, rng: jax.Array) -> "TrainState":
    """Step 0, in one compiled call (eagerly, the optimizer moments and the EMA compile an XLA
    program per parameter shape). The EMA is a copy, so that no buffer appears twice in a
    donated state."""
    make = lambda p, r: cls(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                            ema_params=jax.tree.map(jnp.copy, p), rng=r)
    return jax.jit(make)(params, rng)


def make_schedule(optim: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup over `optim.warmup_steps`, then constant or cosine decay to 0 at `num_steps`."""
  if optim.schedule == "constant":   # (optax.warmup_constant_schedule is 0 with no warmup)
    return optax.join_schedules([optax.linear_schedule(0.0, optim.lr, optim.warmup_steps),
                                 optax.constant_schedule(optim.lr)], [optim.warmup_steps])
  if optim.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, optim.lr, optim.warmup_steps,
                                              max(num_steps, optim.warmup_steps + 1))
  raise ValueError(f"Unknown optim.schedule {optim.schedule!r}; use 'constant' or 'cosine'.")


def make_optimizer(optim: ml_collections.ConfigDict, num_steps: int,
                   lr_scales: Optional[dict] = None) -> optax.GradientTransformation:
  """Global-norm clipping (`optim.grad_clip` > 0), then adam or adamw on the schedule.

  With `lr_scales` {key: s} the parameters are a dict with those keys, and subtree `key` learns
  at s times the schedule (the joint stage's per-branch rates); s = 1 everywhere is the plain
  optimizer, bit for bit."""
  schedule = make_schedule(optim, num_steps)

  def scaled(scale: float = 1.0):   # adam or adamw at scale x the schedule
    lr = lambda count: scale * schedule(count)
    if optim.name == "adam":
      if optim.weight_decay:
        raise ValueError(f"optim.weight_decay={optim.weight_decay} has no effect with "
                         "optim.name='adam'; use optim.name='adamw', or weight_decay=0.")
      return optax.adam(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps)
    if optim.name == "adamw":
      return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                         weight_decay=optim.weight_decay)
    raise ValueError(f"Unknown optim.name {optim.name!r}; use 'adam' or 'adamw'.")
  if lr_scales is None:
    opt = scaled()
  else:
    opt = optax.multi_transform({k: scaled(s) for k, s in lr_scales.items()},
                                {k: k for k in lr_scales})
  return optax.chain(optax.clip_by_global_norm(optim.grad_clip), opt) if optim.grad_clip > 0 else opt


def ema_decay(decay: float, step: jax.Array) -> jax.Array:
  """The EMA decay at `step`, warmed up as min(decay, (1 + step) / (10 + step))."""
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    config: ml_collections.ConfigDict, mesh: Mesh) -> Callable:
  """`step(state, batch, frozen) -> (state, metrics)`, jitted over `mesh`.

  batch: a pytree of global arrays [B, ...] sharded over `data`; `frozen` (replicated, never
  updated) goes to the loss as is. The gradient is that of the global-batch mean, computed as
  the mean over `config.train.grad_accum_steps` = A micro-batches (micro-batch i holds rows
  i, i + A, ..., so each stays split over `data`; micro-batch i uses fold_in(step key, i)); one
  optimizer update per step. The micro-batch loop is unrolled at trace time (XLA:CPU runs the
  gradient convolutions inside a `while` loop (scan) ~10x slower) and micro-batch i + 1 starts
  after all of micro-batch i's gradient (`nets.layers.after`), so one micro-batch's activations
  are live at a time. The state is donated. XLA compiles it with
  `parallel.train_compiler_options` (on CPU devices: its own convolutions).
  metrics: the loss's metrics (means over micro-batches), `grad_norm` and `param_norm` (of the
  updated parameters: an update to inf shows in the step that makes it).
  """
  accum, decay = config.train.grad_accum_steps, config.train.ema_decay
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  micro_sharding = NamedSharding(mesh, P(parallel.DATA_AXIS))

  def micro_batch(x, i):   # rows i, i + A, ... of [B, ...]
    x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:])[:, i]
    return jax.lax.with_sharding_constraint(x, micro_sharding)

  def step(state: TrainState, batch, frozen):
    rng = jax.random.fold_in(state.rng, state.step)
    grads, metrics = None, []
    for i in range(accum):
      micro = jax.tree.map(lambda x: micro_batch(x, i), batch)
      if grads is not None:   # one micro-batch's activations live at a time
        micro = after(micro, grads)
      (_, m), g = grad_fn(state.params, frozen, micro, jax.random.fold_in(rng, i))
      grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
      metrics.append(m)
    grads = jax.tree.map(lambda g: g / accum, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay(decay, state.step)
    ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
    metrics = dict(jax.tree.map(lambda *v: jnp.mean(jnp.stack(v)), *metrics),
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  rep, shard = parallel.replicated(mesh), parallel.data_sharded(mesh)
  return jax.jit(step, in_shardings=(rep, shard, rep), out_shardings=(rep, rep),
                 donate_argnums=0,
                 compiler_options=parallel.train_compiler_options(config.mesh, mesh.devices.flat))


# ---- trainers -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Trainer:
  """What differs between trainers; `train` does the rest."""
  loss_fn: LossFn
  init_params: Callable            # (rng, example batch [1, ...]) -> params
  num_steps: int
  batch_size: int                  # global
  frozen: Any = None               # never-updated loss inputs, e.g. {"classifier": params}; their
                                   # sha256s are recorded in every checkpoint and checked on resume
  evaluate: Optional[Callable] = None       # (ema_params) -> {name: float}, at checkpoints
  export: Optional[Callable] = None         # (workdir, ema_params, last metrics) after training
  lr_scales: Optional[dict] = None          # {params key: learning-rate factor} (make_optimizer)


def _network(config, section) -> nn.Module:
  """The network of a config section (`net`, `net_kwargs`), rematerialised when
  `config.train.remat` is set and the module has a `remat` field (the classifiers have none:
  one config trains every stage, and the frozen classifier only runs forward)."""
  kwargs = dict(section.net_kwargs)
  fields = {f.name for f in dataclasses.fields(nets.NETWORKS.get(section.net))}
  if config.train.remat and "remat" in fields:
    kwargs["remat"] = True
  try:
    return nets.get_network(section.net, **kwargs)
  except TypeError as e:
    raise TypeError(f"Network {section.net!r} rejected its net_kwargs {sorted(kwargs)} "
                    f"(config.train.remat={config.train.remat}): {e}") from e


def _train_apply(module: nn.Module) -> Callable:
  """`apply(params, *inputs, rng)`: the module in training mode, `rng` for dropout."""
  def apply(params, *inputs):
    *inputs, rng = inputs
    return module.apply({"params": params}, *inputs, train=True, rngs={"dropout": rng})
  return apply


def _init(module: nn.Module, inputs: Callable) -> Callable:
  """init(rng, batch) -> the module's params for inputs shaped like the tuple `inputs(rng,
  batch)`, in one compiled call. The inputs are traced for their shapes only (`jax.eval_shape`):
  computing them eagerly (the observation, a frozen enhancer's latent) compiled op by op, 200+
  small XLA programs for an Ex-Diff signal branch."""
  def init(rng, batch):
    shapes = jax.eval_shape(inputs, rng, batch)
    zeros = lambda: [jnp.zeros(s.shape, s.dtype) for s in shapes]
    return jax.jit(lambda r: module.init({"params": r, "dropout": r}, *zeros())["params"])(rng)
  return init


def frozen_sha256(frozen: Optional[dict]) -> dict:
  """{name: sha256 of its params} of a trainer's frozen networks (`Trainer.frozen`)."""
  return {name: checkpoint.params_sha256(p) for name, p in (frozen or {}).items()}


def _init_or_restore(init: Callable, branch: str, path: str, frozen: Optional[dict]) -> Callable:
  """`init`, or the EMA params of the latest checkpoint under `path` (a workdir) when set; that
  checkpoint must have been trained against the frozen networks `frozen` ({name: params}) and
  hold the parameters `init` makes (CheckpointError naming `checkpoint.init_<branch>`)."""
  if not path:
    return init
  ckpt_dir = os.path.join(path, "checkpoints")

  def restore(rng, batch):
    params = checkpoint.restore_params(ckpt_dir, frozen_sha256=frozen_sha256(frozen))
    difference = checkpoint.tree_difference(params, jax.eval_shape(init, rng, batch))
    if difference:
      raise checkpoint.CheckpointError(
          f"checkpoint.init_{branch}={path} holds other parameters than {branch}.net / "
          f"{branch}.net_kwargs build: {difference}. Set those as in {path}/config.json, or "
          f"point checkpoint.init_{branch} at a run of this network.")
    return params
  return restore


@OBSERVATIONS.register("image")
def image_observation(config: ml_collections.ConfigDict) -> Callable:
  """observe(key, batch) -> (x0, y): clean images [B, H, W, C] and y = corruption(key, x0)."""
  corrupt = data.corruption_from_config(config, config.data.train_split)
  return lambda key, batch: (batch["image"], corrupt(key, batch["image"]))


@OBSERVATIONS.register("audio")
def audio_observation(config: ml_collections.ConfigDict) -> Callable:
  """observe(key, batch) -> (x0, y): compressed spectrograms [B, F, T] of the clean clips
  batch["audio"] [B, L] and of the mixture corruption(key, clean), both divided by the mixture's
  maximum (SGMSE+), on random crops of `audio.train_crop_frames` frames when > 0
  (`audio.make_observe`)."""
  corrupt = data.corruption_from_config(config, config.data.train_split)
  return audio.make_observe(corrupt, audio.Frontend.from_config(config),
                            config.audio.train_crop_frames)


def _observe(config):
  return OBSERVATIONS.get(config.data.modality)(config)


def _frozen_classifier(config):
  """(classify(params, x) -> logits in inference mode, params) of the frozen classifier at
  `config.checkpoint.classifier`; CheckpointError if its record names another network than
  `config.classifier` builds."""
  path = config.checkpoint.classifier
  if not path:
    raise ValueError("This trainer needs a frozen classifier: set config.checkpoint.classifier to "
                     "the `classifier` directory written by the classifier trainer.")
  params, record = checkpoint.load_classifier(path)
  saved = record["config"].get("classifier")   # None: saved by hand, not by the trainer
  trained = {k: (saved or {}).get(k) for k in ("net", "net_kwargs")}
  wanted = {k: v for k, v in json.loads(config.classifier.to_json_best_effort()).items()
            if k in trained}
  if saved is not None and trained != wanted:
    raise checkpoint.CheckpointError(
        f"checkpoint.classifier={path} is a classifier.net={trained['net']!r} with net_kwargs "
        f"{trained['net_kwargs']} (its {checkpoint.PROVENANCE}); this config builds "
        f"{wanted['net']!r} with {wanted['net_kwargs']}. Set classifier.net and net_kwargs as it "
        "was trained.")
  net = _network(config, config.classifier)
  classify = lambda p, x: net.apply({"params": p}, x, train=False)
  return classify, params


def _classifier_accuracy(config, net: nn.Module, input_key: str) -> Callable:
  """(params) -> {"eval_accuracy"} of `net` on the clean `config.data.eval_split` (audio: the
  middle `classifier.crop_samples` of each clip when set)."""
  @functools.cache
  def eval_data():
    return data.load_split(config.data.name, config.data.eval_split, config.data.data_dir,
                           config.data.max_eval_examples, config.data.label_subset,
                           data.audio_length(config))

  predict = jax.jit(lambda p, x: net.apply({"params": p}, x, train=False).argmax(-1))

  def evaluate(params):
    split, size = eval_data(), config.classifier.batch_size
    x, labels = split[input_key], split["label"]
    if input_key == "audio":
      x = audio.center_crop(x, config.classifier.crop_samples)
    preds = np.concatenate([predict(params, x[i:i + size]) for i in range(0, len(x), size)])
    return {"eval_accuracy": float(np.mean(preds == labels))}
  return evaluate


@TRAINERS.register("classifier")
def classifier_trainer(config) -> Trainer:
  """Cross-entropy on clean data; exported to `<workdir>/classifier` as a frozen classifier
  with its provenance record (EMA params, clean eval-split accuracy)."""
  c = config.classifier
  net = _network(config, c)
  input_key = config.data.modality
  if c.crop_samples > 0 and input_key != "audio":
    raise ValueError(f"classifier.crop_samples={c.crop_samples} crops audio clips, but "
                     f"data.modality is {input_key!r}; set classifier.crop_samples=0.")
  evaluate = _classifier_accuracy(config, net, input_key)

  def export(workdir, params, metrics):
    if "eval_accuracy" not in metrics:   # the last checkpoint's evaluation, else one now
      metrics = evaluate(params)
    checkpoint.save_classifier(os.path.join(workdir, "classifier"), params,
                               metrics["eval_accuracy"], config)

  return Trainer(
      loss_fn=functools.partial(losses.classifier_loss, apply=_train_apply(net), input_key=input_key,
                                crop_samples=c.crop_samples),
      init_params=_init(net, lambda rng, batch: (batch[input_key],)),
      num_steps=c.num_steps, batch_size=c.batch_size, evaluate=evaluate, export=export)


def _signal_branch(config, observe):
  """(net, sde, parameterization, init(rng, batch), latent, frozen) of the signal branch;
  `latent` and `frozen` as in `_enhancer_latent`."""
  c = config.signal
  net, sde = _network(config, c), sde_lib.get_sde(c.sde, **c.sde_kwargs)
  k = config.data.num_classes
  latent, frozen = _enhancer_latent(config)

  def inputs(rng, batch):
    x0, y = observe(rng, batch)
    b = x0.shape[0]
    return x0, jnp.zeros((b,)), *losses.signal_conditioning(y, jnp.zeros((b, k)), latent, frozen)
  return net, sde, c.parameterization, _init(net, inputs), latent, frozen


def _enhancer_latent(config):
  """Ex-Diff: (latent(enhancer_params, y) -> features, {"enhancer": params}) of the frozen
  enhancer trained in workdir `config.checkpoint.enhancer`, when the signal net integrates
  latents (`signal.net_kwargs.latent_mode` not "none"); else (None, {}), with a warning when a
  latent mode is set but no enhancer (the net then trains as plain SGMSE+)."""
  mode = config.signal.net_kwargs.get("latent_mode", "none")
  if mode != "none" and not config.checkpoint.enhancer:
    logging.warning("signal.net_kwargs.latent_mode=%r but checkpoint.enhancer is empty: training "
                    "without Ex-Diff latents (plain SGMSE+). Set checkpoint.enhancer to the frozen "
                    "enhancer's workdir, or latent_mode='none' to silence this.", mode)
  if not exdiff.uses_latent(config):
    return None, {}
  return exdiff.latent_fn(config), {"enhancer": exdiff.load_enhancer(config)}


def _logits_branch(config, observe):
  """(net, sde, parameterization, init(rng, batch)) of the logit branch."""
  c = config.logits
  net, sde = _network(config, c), sde_lib.get_sde(c.sde, **c.sde_kwargs)
  k = config.data.num_classes

  def inputs(rng, batch):
    _, y = observe(rng, batch)
    l = jnp.zeros((y.shape[0], k))
    return l, jnp.zeros((y.shape[0],)), l, y
  return net, sde, c.parameterization, _init(net, inputs)


@TRAINERS.register("signal")
def signal_trainer(config) -> Trainer:
  """Signal-branch pre-training on (x0, y = corruption(x0)) with zero logits (or batch["logits"]);
  Ex-Diff (see `_enhancer_latent`): also on the frozen enhancer's latent of y."""
  observe = _observe(config)
  net, sde, param, init, latent, frozen = _signal_branch(config, observe)
  loss_fn = functools.partial(losses.signal_loss, apply=_train_apply(net), sde=sde,
                              observe=observe, num_classes=config.data.num_classes,
                              parameterization=param, latent=latent)
  return Trainer(loss_fn, _init_or_restore(init, "signal", config.checkpoint.init_signal, frozen),
                 config.signal.pretrain_steps, config.signal.batch_size, frozen=frozen or None)


@TRAINERS.register("logits")
def logits_trainer(config) -> Trainer:
  """Logit-branch pre-training on l0 = f(x0) of the frozen classifier, conditioned on y, f(y)."""
  observe = _observe(config)
  classify, classifier_params = _frozen_classifier(config)
  net, sde, param, init = _logits_branch(config, observe)
  loss_fn = functools.partial(losses.logits_loss, apply=_train_apply(net), sde=sde,
                              observe=observe, classify=classify,
                              std=config.logits.standardize_std, parameterization=param)
  frozen = {"classifier": classifier_params}
  return Trainer(loss_fn, _init_or_restore(init, "logits", config.checkpoint.init_logits, frozen),
                 config.logits.pretrain_steps, config.logits.batch_size, frozen=frozen)


@TRAINERS.register("enhancer")
def enhancer_trainer(config) -> Trainer:
  """A discriminative enhancer net(y) -> (x_hat, latent) (section `config.enhancer`: net,
  net_kwargs, num_steps, batch_size), regressed onto the clean signal."""
  c = config.enhancer
  observe = _observe(config)
  net = _network(config, c)
  loss_fn = functools.partial(losses.enhancer_loss, apply=_train_apply(net), observe=observe)
  return Trainer(loss_fn, _init(net, lambda rng, batch: (observe(rng, batch)[1],)),
                 c.num_steps, c.batch_size)


def _joint_lr_scales(config) -> dict:
  """`config.train.joint_lr_scales` {"signal": s, "logits": s}, checked."""
  scales = dict(config.train.joint_lr_scales)
  if sorted(scales) != ["logits", "signal"] or min(scales.values()) < 0:
    raise ValueError(f"train.joint_lr_scales={scales}: give non-negative factors for exactly "
                     "'signal' and 'logits', e.g. dict(signal=1.0, logits=0.1).")
  return scales


@TRAINERS.register("joint")
def joint_trainer(config) -> Trainer:
  """Both branches together (`losses.joint_loss`), each started from its pre-trained workdir
  (`config.checkpoint.init_signal` / `init_logits`) when set; `config.train.joint_steps` steps.
  The signal net's logits: `config.train.joint_logits_cond` (and `joint_switch_t`); the logit
  net's signal: `config.train.joint_signal_cond` (switching at `config.sampling.switch_t`).
  Each branch learns at `config.train.joint_lr_scales` times the schedule. Ex-Diff: the frozen
  enhancer rides in `frozen` next to the classifier."""
  observe = _observe(config)
  classify, classifier_params = _frozen_classifier(config)
  s_net, s_sde, s_param, s_init, latent, frozen = _signal_branch(config, observe)
  l_net, l_sde, l_param, l_init = _logits_branch(config, observe)
  s_init = _init_or_restore(s_init, "signal", config.checkpoint.init_signal, frozen)
  l_init = _init_or_restore(l_init, "logits", config.checkpoint.init_logits,
                            {"classifier": classifier_params})
  loss_fn = functools.partial(
      losses.joint_loss, signal_apply=_train_apply(s_net), logits_apply=_train_apply(l_net),
      signal_sde=s_sde, logits_sde=l_sde, observe=observe, classify=classify,
      std=config.logits.standardize_std, weights=dict(config.train.loss_weights),
      signal_parameterization=s_param, logits_parameterization=l_param,
      logits_cond=config.train.joint_logits_cond, switch_t=config.train.joint_switch_t,
      signal_cond=config.train.joint_signal_cond, signal_switch_t=config.sampling.switch_t,
      x0_range=None if config.signal.x0_clip is None else tuple(config.signal.x0_clip),
      latent=latent)

  def init(rng, batch):
    k_s, k_l = jax.random.split(rng)
    return {"signal": s_init(k_s, batch), "logits": l_init(k_l, batch)}
  return Trainer(loss_fn, init, config.train.joint_steps, config.signal.batch_size,
                 frozen=dict(frozen, classifier=classifier_params),
                 lr_scales=_joint_lr_scales(config))


# ---- the loop -----------------------------------------------------------------------------------
def _check_finite(window: list[dict], first_step: int, last_good: Optional[str]) -> dict:
  """The means of the metrics of steps first_step + 1, first_step + 2, ... (counted from 1, as
  metrics.jsonl does); raises FloatingPointError at the first step with a NaN or Inf in its
  metrics (loss, gradient norm, or the norm of the parameters it updated)."""
  window = jax.device_get(window)
  for i, m in enumerate(window):
    bad = {k: float(v) for k, v in m.items() if not math.isfinite(v)}
    if bad:
      raise FloatingPointError(
          f"Non-finite {bad} in step {first_step + i + 1} (loss {float(m['loss'])}); training "
          f"stopped. The last good checkpoint, kept: "
          f"{last_good or 'none (no checkpoint was saved yet)'}. Lower optim.lr or check the "
          "data, then rerun: it resumes from that checkpoint, or starts over without one. "
          "Switching optim.grad_clip between 0 and > 0 changes the optimizer's state: do that in "
          "a new workdir.")
  return {k: float(np.mean([m[k] for m in window])) for k in window[0]}


class MetricsWriter:
  """Appends metrics records {"step": int, name: float} to workdir/metrics.jsonl, after dropping
  its records past `start` (the resumed checkpoint's step: a run stopped after logging them
  redoes those steps), and, when `tensorboard` is set and the `tensorboard` package is
  installed, writes their values as TensorBoard scalars (tag = name) to an event file in
  workdir/tensorboard."""

  def __init__(self, workdir: str, tensorboard: bool, start: int = 0):
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if json.loads(line)["step"] <= start]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a")
    self._events = None
    if tensorboard:
      try:
        from tensorboard.summary import Writer   # pylint: disable=g-import-not-at-top
      except ImportError:
        pass   # not installed: metrics.jsonl only
      else:
        self._events = Writer(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._events is not None:
      for name, value in record.items():
        if name != "step":
          self._events.add_scalar(name, value, record["step"])
      self._events.flush()

  def close(self) -> None:
    self._jsonl.close()
    if self._events is not None:
      self._events.close()


# trainer -> its config section (steps, batch size and, optionally, the trainer's own `lr`)
SECTIONS = {"classifier": "classifier", "signal": "signal", "logits": "logits",
            "joint": "train", "enhancer": "enhancer"}


def stage_config(config: ml_collections.ConfigDict, trainer_name: str) -> ml_collections.ConfigDict:
  """`config` with `optim.lr` replaced by the trainer's section's own `lr`, when it sets one
  (e.g. `classifier.lr`; the joint trainer reads `train.lr`)."""
  section = config[SECTIONS[trainer_name]] if trainer_name in SECTIONS else {}
  if "lr" not in section:
    return config
  config = copy.deepcopy(config)
  config.optim.lr = section.lr
  return config


def check_num_classes(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError where `data.label_subset` (K labels, relabelled 0..K-1) or a network's
  `net_kwargs.num_classes` (classifier, signal, logits) disagrees with `data.num_classes`."""
  k = config.data.num_classes
  subset = config.data.label_subset
  if subset is not None and len(subset) != k:
    raise ValueError(f"data.label_subset keeps {len(subset)} labels (relabelled 0.."
                     f"{len(subset) - 1}) but data.num_classes={k}: set data.num_classes="
                     f"{len(subset)}.")
  for section in ("classifier", "signal", "logits"):
    n = config[section].net_kwargs.get("num_classes", k)
    if n != k:
      raise ValueError(f"{section}.net_kwargs.num_classes={n} but data.num_classes={k}: the "
                       "classifier's logits, the logit branch and the signal net's logit input "
                       "must have the data's number of classes; set them equal.")


def train(config: ml_collections.ConfigDict, workdir: str, trainer_name: str) -> dict:
  """Trains `trainer_name` (a `TRAINERS` entry) in `workdir`, resuming from its latest checkpoint.

  The optimizer learns at the trainer's own `lr` where its section sets one (`stage_config`).
  Writes workdir/config.json (the resolved config), workdir/metrics.jsonl (one record per
  `train.log_every` steps and per checkpoint; also as TensorBoard scalars in workdir/tensorboard,
  see `MetricsWriter`) and workdir/checkpoints/<step>. Stops with a
  FloatingPointError on a non-finite loss, keeping the last good checkpoint. Returns the last
  metrics record.
  """
  parallel.initialize_distributed()
  for field in ("grad_accum_steps", "log_every", "ckpt_every"):
    if config.train[field] < 1:
      raise ValueError(f"train.{field}={config.train[field]}; it must be at least 1.")
  check_num_classes(config)
  config = stage_config(config, trainer_name)
  mesh = parallel.make_mesh(config)
  trainer = TRAINERS.get(trainer_name)(config)
  parallel.check_batch_size(trainer.batch_size, mesh.size, config.train.grad_accum_steps)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  source = data.get_source(config.data.name, config.data.train_split, config.data.data_dir,
                           config.data.label_subset)
  audio_length = data.audio_length(config)
  batches = iter(data.make_loader(source, trainer.batch_size, seed=config.data.shuffle_seed,
                                  worker_count=config.data.worker_count, audio_length=audio_length,
                                  read_threads=config.data.read_threads,
                                  prefetch_buffer_size=config.data.prefetch_buffer_size,
                                  num_devices=mesh.devices.size))
  optimizer = make_optimizer(config.optim, trainer.num_steps, trainer.lr_scales)
  # Initial params from the "rbg" generator: XLA:CPU compiles threefry initializers ~7x slower.
  k_init = jax.random.key(config.seed, impl="rbg")
  example = jax.tree.map(lambda v: v[None],
                         data.fit_audio(data.standardize(source[0]), audio_length))
  state = parallel.replicate(TrainState.create(
      trainer.init_params(k_init, example), optimizer, jax.random.PRNGKey(config.seed)), mesh)

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), config.checkpoint)
  meta = {"trainer": trainer_name, "frozen_sha256": frozen_sha256(trainer.frozen)}
  last_good = None
  if ckpt.latest_step() is not None:
    last_good = ckpt.path(ckpt.latest_step())
    state, data_state, saved = ckpt.restore(state)
    checkpoint.check_frozen(checkpoint.recorded_frozen(saved), meta["frozen_sha256"],
                            f"Checkpoint {last_good}")
    if data_state is not None:
      try:
        batches.set_state(data_state)
      except ValueError as e:   # grain: another dataset, subset or shuffle than the saved one
        raise checkpoint.CheckpointError(
            f"Checkpoint {last_good} was saved reading other data than this config reads "
            f"({errors.brief(e)}). Resume with the data.* settings of "
            f"{os.path.join(workdir, 'config.json')}, or train in a new workdir.") from e
  if is_main:   # after the restore: a config that cannot resume leaves the old record in place
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  frozen = parallel.replicate(trainer.frozen, mesh)
  train_step = make_train_step(trainer.loss_fn, optimizer, config, mesh)

  start = int(state.step)
  record, window, window_start, tic = {}, [], start, time.perf_counter()
  log = MetricsWriter(workdir, config.train.tensorboard, start) if is_main else None
  try:
    with tqdm(total=trainer.num_steps, initial=start, desc=trainer_name, disable=not is_main,
              dynamic_ncols=True) as bar:
      for step in range(start, trainer.num_steps):
        state, metrics = train_step(state, parallel.global_batch(next(batches), mesh), frozen)
        window.append(metrics)
        bar.update()
        done = step + 1
        save = done % config.train.ckpt_every == 0 or done == trainer.num_steps
        if not (save or done % config.train.log_every == 0):
          continue
        summary = _check_finite(window, window_start, last_good)
        toc = time.perf_counter()
        record = dict(step=done, **summary, steps_per_sec=len(window) / (toc - tic))
        window, window_start, tic = [], done, toc
        if save:
          if trainer.evaluate is not None:
            record.update(trainer.evaluate(state.ema_params))
          ckpt.save(done, state, batches.get_state(), meta, metrics=record)
          last_good = ckpt.path(done)
        bar.set_postfix(loss=f"{record['loss']:.4g}")
        if log:
          log.write(record)
    ckpt.wait()
    if trainer.export is not None:
      trainer.export(workdir, state.ema_params, record)
  except KeyboardInterrupt as e:
    raise KeyboardInterrupt(f"{trainer_name} training in {workdir}; its last checkpoint: "
                            f"{last_good or 'none yet'}. Rerunning the same command resumes "
                            "from it.") from e
  finally:
    ckpt.close()
    if log:
      log.close()
  return record
