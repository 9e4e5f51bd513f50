"""The coupled experiment: train the stages a workdir lacks, evaluate strategies, write a report.

Layout of a workdir: `classifier/` (the frozen classifier, shared), and per corruption
`<corruption>/signal`, `<corruption>/logits`, `<corruption>/joint` (training workdirs of
`cdjax.train`) and `<corruption>/eval` (each method's saved evaluation progress). Finished
stages and evaluations are reused, unfinished ones resume from their last checkpoint or batch.
`config.evaluation` names the corruptions ({name: corruption kwargs}, a "name" key in the
kwargs picking another corruption than `config.corruption.name`) and the methods ({name:
overrides of config.sampling, nested sections merged}).
"""
import copy
import inspect
import json
import os
from typing import Optional

import jax
import ml_collections
import numpy as np

from cdjax import checkpoint
from cdjax import coupled
from cdjax import data
from cdjax import evaluate
from cdjax import exdiff
from cdjax import overrides as overrides_lib
from cdjax import parallel
from cdjax import sampling
from cdjax import train

BRANCH_STAGES = ("signal", "logits", "joint")
BASELINES = ("noisy", "enhance_then_classify", "card")   # listed first in tables, in this order


def method_order(names) -> list[str]:
  """The baselines first, then the other methods by name (ConfigDicts do not keep order)."""
  rank = lambda n: (BASELINES.index(n), "") if n in BASELINES else (len(BASELINES), n)
  return sorted(names, key=rank)
TABLE_COLUMNS = ["corruption", "method", "accuracy", "ci95", "accuracy_f_x0", "diff_vs_reference",
                 "diff_ci95", "wins", "losses", "nfe", "seconds_per_item"]


def with_corruption(config: ml_collections.ConfigDict, corruption: str) -> ml_collections.ConfigDict:
  """A copy of `config` for one entry of `config.evaluation.corruptions`: its kwargs (and
  corruption name, when the entry sets "name"), and "{corruption}" in `checkpoint.init_signal` /
  `init_logits` / `enhancer` replaced by the entry's name."""
  cfg = copy.deepcopy(config)
  kwargs = dict(config.evaluation.corruptions[corruption])
  with cfg.unlocked():
    cfg.corruption.name = kwargs.pop("name", config.corruption.name)
    cfg.corruption.kwargs = kwargs
    for field in ("init_signal", "init_logits", "enhancer"):
      cfg.checkpoint[field] = config.checkpoint[field].replace("{corruption}", corruption)
  return cfg


def corruption_config(config: ml_collections.ConfigDict, workdir: str, corruption: str):
  """`with_corruption`, and the frozen classifier under `workdir`."""
  cfg = with_corruption(config, corruption)
  cfg.checkpoint.classifier = os.path.join(workdir, "classifier", "classifier")
  return cfg


def _joint_config(cfg, branch_dir: str):
  """The joint stage starts from the pre-trained branches in `branch_dir`."""
  cfg = copy.deepcopy(cfg)
  cfg.checkpoint.init_signal = os.path.join(branch_dir, "signal")
  cfg.checkpoint.init_logits = os.path.join(branch_dir, "logits")
  return cfg


# stage -> the field of its config section (`train.SECTIONS`) with the stage's number of steps
STEPS_FIELDS = {"classifier": "num_steps", "signal": "pretrain_steps", "logits": "pretrain_steps",
                "joint": "joint_steps", "enhancer": "num_steps"}


def num_steps(cfg, stage: str) -> int:
  return cfg[train.SECTIONS[stage]][STEPS_FIELDS[stage]]


# Config fields that do not change what a stage learns (where data are read from, evaluation).
NOT_STAGE_INPUTS = ("data.data_dir", "data.eval_split", "data.max_eval_examples",
                    "data.worker_count", "data.read_threads", "data.prefetch_buffer_size",
                    "train.trainer", "train.remat", "train.log_every", "train.ckpt_every",
                    "train.tensorboard")


def stage_inputs(stage: str) -> tuple[str, ...]:
  """The config sections and fields a trained `stage` depends on: its own section
  (`train.SECTIONS`; the joint stage's is `train`), the joint stage also both branches' and the
  switch its logit net learns, the branch it starts from (`checkpoint.init_*`), and the data,
  corruption (not for the clean-data classifier), seed, optimizer, EMA decay and micro-batches."""
  joint = ("signal", "logits", "sampling.switch_t") if stage == "joint" else ()
  init = (f"checkpoint.init_{stage}",) if stage in ("signal", "logits") else ()
  corruption = ("corruption",) if stage != "classifier" else ()
  return (train.SECTIONS[stage], *joint, *init, "seed", "data", "audio", "optim",
          "train.ema_decay", "train.grad_accum_steps", *corruption)


def _changed_fields(cfg, stage_dir: str, stage: str) -> list[str]:
  """The fields of `stage_inputs(stage)` (less `NOT_STAGE_INPUTS`) in which the stage's config
  (`train.stage_config`) differs from its record, stage_dir/config.json."""
  path = os.path.join(stage_dir, "config.json")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    saved = json.load(f)

  def flat(d, prefix=""):
    if not isinstance(d, dict):
      return {prefix: d}
    return {k: v for key, value in d.items()
            for k, v in flat(value, f"{prefix}.{key}" if prefix else key).items()}
  a = flat(saved)
  b = flat(json.loads(train.stage_config(cfg, stage).to_json_best_effort()))
  wanted = lambda k: k not in NOT_STAGE_INPUTS and any(
      k == p or k.startswith(p + ".") for p in stage_inputs(stage))
  return sorted(k for k in a.keys() | b.keys() if wanted(k) and a.get(k) != b.get(k))


def train_stage(cfg, stage_dir: str, stage: str) -> None:
  """Trains `stage` (a `train.TRAINERS` name) in `stage_dir` unless its final checkpoint (and,
  for the classifier, the exported classifier's record) is already there; a reused stage
  whose inputs (`stage_inputs`) have changed since is named with the changed fields (its folder
  must be deleted to retrain it). An exported classifier is never trained further
  (CheckpointError): the other stages are trained against it."""
  parallel.initialize_distributed()   # before the Checkpointer below starts JAX's backend
  steps = num_steps(cfg, stage)
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  latest = None
  if os.path.isdir(ckpt_dir):
    with checkpoint.Checkpointer(ckpt_dir, cfg.checkpoint) as ckpt:
      latest = ckpt.latest_step()
  done = latest == steps
  if stage == "classifier":   # written last: an export cut short is redone from the checkpoint
    exported = os.path.exists(os.path.join(stage_dir, "classifier", checkpoint.PROVENANCE))
    if exported and not done:
      raise checkpoint.CheckpointError(
          f"[classifier] {stage_dir} holds a frozen classifier that this workdir's stages are "
          f"trained against, from its checkpoint at step {latest}; classifier.num_steps="
          f"{steps} asks for another. Set classifier.num_steps={latest}, or delete {stage_dir} "
          "and the stages trained on it to start over.")
    done = done and exported
  if done:
    changed = _changed_fields(cfg, stage_dir, stage)
    print(f"[{stage}] reusing {stage_dir}" + (
        f", trained with other {', '.join(changed)}: delete the folder to train it again"
        if changed else ""))
    return
  train.train(cfg, stage_dir, stage)


def train_all(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the classifier once and, per corruption, the signal, logit and joint stages."""
  check_runs_exist(config, workdir)   # not after the classifier has trained
  train_stage(config, os.path.join(workdir, "classifier"), "classifier")
  for corruption in config.evaluation.corruptions:
    cfg = corruption_config(config, workdir, corruption)
    branch_dir = os.path.join(workdir, corruption)
    for stage in BRANCH_STAGES:
      if num_steps(cfg, stage) > 0:
        stage_cfg = _joint_config(cfg, branch_dir) if stage == "joint" else cfg
        train_stage(stage_cfg, os.path.join(branch_dir, stage), stage)


def check_runs_exist(config: ml_collections.ConfigDict, workdir: str) -> None:
  """CheckpointError naming the field where, for some corruption, a run that `workdir` needs is
  missing: the frozen Ex-Diff enhancer (`checkpoint.enhancer`, when the signal net reads its
  latent), or the run a branch starts from (`checkpoint.init_signal` / `init_logits`) while that
  branch has not started training in `workdir` ("{corruption}" replaced as `with_corruption`
  does)."""
  started = lambda corruption, stage: os.path.isdir(
      os.path.join(workdir, corruption, stage, "checkpoints"))
  for corruption in config.evaluation.corruptions:
    cfg = with_corruption(config, corruption)
    needed = dict(enhancer=exdiff.uses_latent(cfg),
                  init_signal=num_steps(cfg, "signal") > 0 and not started(corruption, "signal"),
                  init_logits=num_steps(cfg, "logits") > 0 and not started(corruption, "logits"))
    for field, need in needed.items():
      path = cfg.checkpoint[field]
      if need and path and not os.path.isdir(os.path.join(path, "checkpoints")):
        raise checkpoint.CheckpointError(
            f"checkpoint.{field}={config.checkpoint[field]!r}: no run in {path} (corruption "
            f"{corruption!r}). Train that run first (the config's docstring names its command), "
            f"or set --config.checkpoint.{field}=<its workdir> (\"{{corruption}}\" stands for the "
            "corruption's name).")


def param_sources(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parameter sources `load_params` returns: "pretrained", and "joint" when it trains."""
  return ("pretrained",) + (("joint",) if cfg.train.joint_steps > 0 else ())


def load_params(cfg: ml_collections.ConfigDict, branch_dir: str,
                signal_frozen: Optional[dict] = None):
  """({source: params {"signal", "logits"}}, classifier params) of the stages in `branch_dir`
  (EMA parameters): source "pretrained" (each pre-trained branch) and, when the joint stage
  was trained, "joint". Each stage must have been trained against the frozen classifier of
  `cfg.checkpoint.classifier` (logits, joint) and the frozen networks `signal_frozen`
  ({name: sha256}, e.g. an Ex-Diff enhancer's; signal, joint)."""
  classifier_params, record = checkpoint.load_classifier(cfg.checkpoint.classifier)
  classifier, signal_frozen = {"classifier": record["sha256"]}, signal_frozen or {}
  restore = lambda stage, frozen: checkpoint.restore_params(
      os.path.join(branch_dir, stage, "checkpoints"), frozen_sha256=frozen)
  params = {"pretrained": {"signal": restore("signal", signal_frozen),
                           "logits": restore("logits", classifier)}}
  if "joint" in param_sources(cfg):
    params["joint"] = restore("joint", {**signal_frozen, **classifier})
  return params, classifier_params


def method_params(params: dict, name: str, overrides: dict) -> tuple[dict, dict]:
  """(The parameters method `name` samples with, its `sampling` overrides): `overrides["params"]`
  ("pretrained" | "joint"; baselines such as enhance_then_classify and card use the pre-trained
  branches), by default the joint stage's when trained."""
  source = overrides.get("params", "joint" if "joint" in params else "pretrained")
  if source not in params:
    raise ValueError(f"evaluation.methods.{name}.params={source!r}: no such parameters; use one "
                     f"of {sorted(params)} (joint needs train.joint_steps > 0).")
  return params[source], {k: v for k, v in overrides.items() if k != "params"}


def method_sampling(sampling_cfg: ml_collections.ConfigDict,
                    overrides: dict) -> ml_collections.ConfigDict:
  """A copy of `sampling_cfg` with a method's overrides (`method_params`) merged in, nested
  sections field by field."""
  cfg = copy.deepcopy(sampling_cfg)
  cfg.update(overrides)
  return cfg


# sampling fields -> the lookup that rejects an unknown name (suggesting close ones)
SAMPLING_NAMES = {"strategy": coupled.STRATEGIES.get, "signal_predictor": sampling.PREDICTORS.get,
                  "logits_predictor": sampling.PREDICTORS.get,
                  "corrector": sampling.CORRECTORS.get,
                  "logits_corrector": lambda name: name == "same" or sampling.CORRECTORS.get(name)}


def check_setting(field: str, value, check) -> None:
  """`check(value)`; a KeyError / ValueError it raises is raised again naming `field=value`."""
  try:
    check(value)
  except (KeyError, ValueError) as e:
    raise ValueError(f"{field}={value!r}: {e.args[0]}") from e


def _check_override_fields(sampling_cfg: ml_collections.ConfigDict, overrides, where: str):
  """ValueError naming `where.<field>` and the closest `sampling` fields for each key of
  `overrides` that `sampling_cfg` lacks; nested sections are checked field by field, except
  open ones (empty by default, e.g. predictor_kwargs)."""
  for key, value in overrides.items():
    try:
      overrides_lib.check_field(sampling_cfg, key)
    except KeyError as e:
      raise ValueError(f"{where}.{key}: not a sampling field, so it would be ignored. "
                       f"{e.args[0]}") from None
    field = sampling_cfg[key]
    if isinstance(value, dict) and isinstance(field, ml_collections.ConfigDict) and field:
      _check_override_fields(field, value, f"{where}.{key}")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config field, where a method of `config.evaluation.methods`
  (merged over `config.sampling` as `evaluate_corruption` merges it) overrides a field that
  `sampling` lacks, picks parameters that do not train, an unknown strategy, predictor or
  corrector, Parallel settings it cannot run (`coupled.parallel_schedule`) or a batch size the
  devices of the mesh do not divide; where an entry of `evaluation.corruptions` names an unknown
  corruption or an argument it does not take; where the numbers of classes disagree
  (`train.check_num_classes`); and where `data.shape` is not the shape of the dataset's images.
  `run` checks before anything trains."""
  train.check_num_classes(config)
  _check_corruptions(config)
  if config.data.modality == "image":
    d = config.data
    shape = tuple(data.get_source(d.name, d.train_split, d.data_dir)[0]["image"].shape)
    if shape != tuple(d.shape):
      raise ValueError(f"data.shape={tuple(d.shape)}, but {d.name}'s images are {shape}: set "
                       f"data.shape={shape}.")
  parallel.initialize_distributed()   # before the mesh starts JAX's backend
  mesh = parallel.make_mesh(config)
  model = coupled.model_from_config(config)
  checks = dict(SAMPLING_NAMES, batch_size=lambda b: parallel.check_batch_size(b, mesh.size))
  for name in method_order(config.evaluation.methods):
    _, overrides = method_params(dict.fromkeys(param_sources(config)), name,
                                 config.evaluation.methods[name].to_dict())
    _check_override_fields(config.sampling, overrides, f"evaluation.methods.{name}")
    cfg = method_sampling(config.sampling, overrides)
    for key, check in checks.items():
      where = f"evaluation.methods.{name}" if key in overrides else "sampling"
      check_setting(f"{where}.{key}", cfg[key], check)
    if cfg.strategy == "parallel":
      check_setting(f"evaluation.methods.{name}.strategy", cfg.strategy,
                    lambda _: coupled.parallel_schedule(model, cfg))


def _check_corruptions(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the entry of `config.evaluation.corruptions` whose corruption is unknown
  or does not take one of its arguments."""
  for name, entry in config.evaluation.corruptions.items():
    cfg = with_corruption(config, name)
    where = f"evaluation.corruptions.{name}"
    check_setting(f"{where}.name" if "name" in entry else "corruption.name", cfg.corruption.name,
                  data.CORRUPTIONS.get)
    signature = inspect.signature(data.CORRUPTIONS.get(cfg.corruption.name))
    try:
      signature.bind_partial(**cfg.corruption.kwargs)
    except TypeError as e:
      raise ValueError(f"{where}: {e} (corruption {cfg.corruption.name!r} takes "
                       f"{', '.join(signature.parameters)}).") from None


def evaluate_corruption(config, workdir: str, corruption: str, methods: dict, to_model=None,
                        model=coupled.model_from_config, load=load_params):
  """Rows and per-method results of `methods` on the eval split degraded by `corruption`.

  `to_model` maps the degraded data [N, ...] to the networks' input (speech: waveforms ->
  compressed spectrograms; default: identity); `model(cfg)` builds the CoupledModel and
  `load(cfg, branch_dir)` its parameters (as `load_params`)."""
  cfg = corruption_config(config, workdir, corruption)
  params, classifier_params = load(cfg, os.path.join(workdir, corruption))
  model = model(cfg)
  split = data.load_split(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir,
                          cfg.data.max_eval_examples, cfg.data.label_subset, data.audio_length(cfg))
  clean, labels = split[cfg.data.modality], split["label"]
  corrupt = data.corruption_from_config(cfg, cfg.data.eval_split)
  y = evaluate.degrade(corrupt, jax.random.PRNGKey(cfg.evaluation.corruption_seed), clean)
  if to_model is not None:
    y = to_model(y)
  mesh = parallel.make_mesh(cfg)
  options = parallel.sample_compiler_options(cfg.mesh, mesh.devices.flat)
  model_config = ml_collections.ConfigDict(
      {s: cfg[s] for s in ("signal", "logits", "classifier", "enhancer") if s in cfg})
  results = []
  for name in method_order(methods):
    branch_params, overrides = method_params(params, name, methods[name])
    sampling_cfg = method_sampling(cfg.sampling, overrides)
    results.append(evaluate.run_method(
        name, model, sampling_cfg, branch_params, classifier_params, y,
        jax.random.PRNGKey(cfg.evaluation.sampling_seed), sampling_cfg.batch_size, mesh,
        cache_dir=os.path.join(workdir, corruption, "eval"),
        compiler_options=options, model_config=model_config))
    print(f"[{corruption}] {name}: accuracy {np.mean(results[-1].predictions == labels):.4f}")
  rows = evaluate.result_rows(results, labels, corruption=corruption)
  return rows, dict(clean=clean, y=y, labels=labels, results=results)


def run(config: ml_collections.ConfigDict, workdir: str, out_prefix: str) -> list[dict]:
  """Trains what is missing, evaluates every method on every corruption, and writes
  `<out_prefix>.json` (command, config, rows), `<out_prefix>.md` and `<out_prefix>.png`."""
  parallel.configure_xla(config.mesh)
  check_config(config)   # not after hours of training
  evaluate.check_writable(out_prefix)
  train_all(config, workdir)
  rows, figure_data = [], None
  for corruption in config.evaluation.corruptions:
    corruption_rows, outputs = evaluate_corruption(
        config, workdir, corruption, dict(config.evaluation.methods))
    rows += corruption_rows
    figure_data = (corruption, outputs)
  table = evaluate.write_results(out_prefix, config, rows, TABLE_COLUMNS)
  evaluate.plot_examples(*figure_data, path=out_prefix + ".png",
                         methods=config.evaluation.figure_methods)
  print(table)
  print(f"Wrote {out_prefix}.json, .md and .png")
  return rows
