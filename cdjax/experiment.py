"""The coupled experiment: train the stages a workdir lacks, evaluate strategies, write a report.

Layout of a workdir: `classifier/` (the frozen classifier, shared), and per corruption
`<corruption>/signal`, `<corruption>/logits`, `<corruption>/joint` (training workdirs of
`cdjax.train`). Finished stages are reused, unfinished ones resume from their last checkpoint.
`config.evaluation` names the corruptions ({name: corruption kwargs}) and the methods
({name: flattened overrides of config.sampling}).
"""
import copy
import json
import os
import sys

import jax
import ml_collections
import numpy as np

from cdjax import checkpoint
from cdjax import coupled
from cdjax import data
from cdjax import evaluate
from cdjax import train

BRANCH_STAGES = ("signal", "logits", "joint")
TABLE_COLUMNS = ["corruption", "method", "accuracy", "ci95", "accuracy_f_x0", "diff_vs_reference",
                 "diff_ci95", "wins", "losses", "nfe", "seconds_per_item"]


def corruption_config(config: ml_collections.ConfigDict, workdir: str, corruption: str):
  """A copy of `config` for one corruption of `config.evaluation.corruptions`, with the
  checkpoint paths of its stages under `workdir`."""
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.corruption.kwargs = dict(config.evaluation.corruptions[corruption])
    cfg.checkpoint.classifier = os.path.join(workdir, "classifier", "classifier")
    cfg.checkpoint.init_signal = os.path.join(workdir, corruption, "signal")
    cfg.checkpoint.init_logits = os.path.join(workdir, corruption, "logits")
  return cfg


def _num_steps(cfg, stage):
  return {"classifier": cfg.classifier.num_steps, "signal": cfg.signal.pretrain_steps,
          "logits": cfg.logits.pretrain_steps, "joint": cfg.train.joint_steps}[stage]


def _train_stage(cfg, stage_dir: str, stage: str) -> None:
  """Trains `stage` in `stage_dir` unless its final checkpoint is already there."""
  steps = _num_steps(cfg, stage)
  ckpt_dir = os.path.join(stage_dir, "checkpoints")
  done = (os.path.isdir(ckpt_dir)
          and checkpoint.Checkpointer(ckpt_dir, cfg.checkpoint).latest_step() == steps)
  if stage == "classifier":
    done = done and os.path.isdir(os.path.join(stage_dir, "classifier"))
  if done:
    print(f"[{stage}] reusing {stage_dir}")
    return
  train.train(cfg, stage_dir, stage)


def train_all(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Trains the classifier once and, per corruption, the signal, logit and joint stages."""
  _train_stage(config, os.path.join(workdir, "classifier"), "classifier")
  for corruption in config.evaluation.corruptions:
    cfg = corruption_config(config, workdir, corruption)
    for stage in BRANCH_STAGES:
      if _num_steps(cfg, stage) > 0:
        _train_stage(cfg, os.path.join(workdir, corruption, stage), stage)


def load_params(cfg: ml_collections.ConfigDict):
  """(params {"signal", "logits"}, classifier params) for a `corruption_config`: the joint
  stage's EMA parameters when it was trained, else each pre-trained branch's."""
  classifier_params, record = checkpoint.load_classifier(cfg.checkpoint.classifier)
  sha = record["sha256"]
  if cfg.train.joint_steps > 0:
    joint_dir = os.path.join(os.path.dirname(cfg.checkpoint.init_signal), "joint", "checkpoints")
    params = checkpoint.restore_params(joint_dir, classifier_sha256=sha)
  else:
    params = {"signal": checkpoint.restore_params(os.path.join(cfg.checkpoint.init_signal, "checkpoints")),
              "logits": checkpoint.restore_params(os.path.join(cfg.checkpoint.init_logits, "checkpoints"),
                                                  classifier_sha256=sha)}
  return params, classifier_params


def evaluate_corruption(config, workdir: str, corruption: str, methods: dict):
  """Rows and per-method results of `methods` on the eval split degraded by `corruption`."""
  cfg = corruption_config(config, workdir, corruption)
  params, classifier_params = load_params(cfg)
  model = coupled.model_from_config(cfg)
  split = data.load_split(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir,
                          cfg.data.max_eval_examples)
  clean, labels = split[cfg.data.modality], split["label"]
  corrupt = data.corruption_from_config(cfg, cfg.data.eval_split)
  y = evaluate.degrade(corrupt, jax.random.PRNGKey(cfg.evaluation.corruption_seed), clean)
  results = []
  for name, overrides in methods.items():
    sampling_cfg = copy.deepcopy(cfg.sampling)
    sampling_cfg.update_from_flattened_dict(dict(overrides))
    results.append(evaluate.run_method(
        name, model, sampling_cfg, params, classifier_params, y,
        jax.random.PRNGKey(cfg.evaluation.sampling_seed), cfg.sampling.batch_size))
    print(f"[{corruption}] {name}: accuracy {np.mean(results[-1].predictions == labels):.4f}")
  rows = evaluate.result_rows(results, labels, corruption=corruption)
  return rows, dict(clean=clean, y=y, labels=labels, results=results)


def run(config: ml_collections.ConfigDict, workdir: str, out_prefix: str) -> list[dict]:
  """Trains what is missing, evaluates every method on every corruption, and writes
  `<out_prefix>.json` (command, config, rows), `<out_prefix>.md` and `<out_prefix>.png`."""
  train_all(config, workdir)
  rows, figure_data = [], None
  for corruption in config.evaluation.corruptions:
    corruption_rows, outputs = evaluate_corruption(
        config, workdir, corruption, dict(config.evaluation.methods))
    rows += corruption_rows
    figure_data = (corruption, outputs)
  command = " ".join([os.path.basename(sys.executable)] + sys.argv)
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  with open(out_prefix + ".json", "w") as f:
    json.dump(dict(command=command, config=json.loads(config.to_json_best_effort()), rows=rows),
              f, indent=2)
  table = evaluate.markdown_table(rows, TABLE_COLUMNS)
  with open(out_prefix + ".md", "w") as f:
    f.write(f"Command: `{command}`\n\n{table}\n")
  evaluate.plot_examples(*figure_data, path=out_prefix + ".png",
                         methods=config.evaluation.figure_methods)
  print(table)
  print(f"Wrote {out_prefix}.json, .md and .png")
  return rows
