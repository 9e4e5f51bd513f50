"""Command line.

  python -m cdjax.main --config configs/<exp>.py --workdir DIR --mode train|sweep
  python -m cdjax.main --config configs/speech_enhancement.py --workdir runs/speech_enhancement/noise \
      --mode enhance --input in.wav --output out.wav
  python -m cdjax.main gather DIR...          (a table of each run's final metrics)

Any config field is overridable (`--config.optim.lr=3e-4`); an unknown field fails at once,
listing the closest field names. A mode is a function `fn(config, workdir)` in `MODES`; add one
with `@MODES.register("name")`. `--mode sweep` prints one line per member of the config file's
`sweep()` (its workdir and overrides); with `--sweep_run` it also trains the members in turn.
A config file's `sweep()` returns `dict(product={field: values}, zip={field: values})`: the
product of the `product` lists times the rows of the (equal-length) `zip` lists.
"""
import itertools
import json
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from cdjax import parallel
from cdjax import train as train_lib
from cdjax import overrides as overrides_lib
from cdjax.registry import Registry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (checkpoints, metrics).")
_MODE = flags.DEFINE_string("mode", "train", "What to run: one of MODES, or 'sweep'.")
_SWEEP_RUN = flags.DEFINE_bool("sweep_run", False, "With --mode sweep: train every member in turn.")
_INPUT = flags.DEFINE_string("input", None, "With --mode enhance: the audio file (any sample rate).")
_OUTPUT = flags.DEFINE_string("output", None, "With --mode enhance: the enhanced WAV to write.")

MODES = Registry("mode")   # name -> fn(config, workdir)


@MODES.register("train")
def train_mode(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.train.trainer` in `workdir` (resuming when it holds a checkpoint)."""
  return train_lib.train(config, workdir, config.train.trainer)


@MODES.register("enhance")
def enhance_mode(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Enhances --input with the speech models trained in `workdir` (one condition of
  experiments/speech_enhancement.py: enhancer/, sgmse/, exdiff/; Ex-Diff when trained) and
  writes --output (`cdjax.speech.enhance_file`)."""
  from cdjax import speech   # pylint: disable=g-import-not-at-top
  if not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError("--mode enhance needs --input in.wav and --output out.wav.")
  return speech.enhance_file(config, workdir, _INPUT.value, _OUTPUT.value)


# ---- sweeps -------------------------------------------------------------------------------------
def sweep_members(sweep: dict, workdir: str) -> list[tuple[str, dict]]:
  """(member workdir, {field: value}) for each member of `sweep` (see the module docstring)."""
  product, zipped = sweep.get("product", {}), sweep.get("zip", {})
  lengths = {len(v) for v in zipped.values()}
  if len(lengths) > 1:
    raise ValueError(f"The zip lists of a sweep must have equal lengths, got "
                     f"{ {k: len(v) for k, v in zipped.items()} }.")
  rows = [dict(zip(zipped, values)) for values in zip(*zipped.values())] or [{}]
  members = []
  for values in itertools.product(*product.values()):
    for row in rows:
      overrides = {**dict(zip(product, values)), **row}
      name = ",".join(f"{k}={v}" for k, v in overrides.items()) or "base"
      members.append((os.path.join(workdir, name), overrides))
  return members


def override_string(overrides: dict) -> str:
  return " ".join(f"--config.{k}={v}" for k, v in overrides.items())


def run_sweep(config: ml_collections.ConfigDict, config_arg: str, workdir: str, execute: bool,
              mode: Callable = train_mode) -> list[tuple[str, dict]]:
  """Prints each member of the config file's `sweep()`; with `execute`, runs `mode` on each."""
  module, _ = overrides_lib.load_module(config_arg)
  if not hasattr(module, "sweep"):
    raise ValueError(f"{config_arg} defines no sweep(); add one returning "
                     "dict(product={field: values}, zip={field: values}).")
  members = sweep_members(module.sweep(), workdir)
  for member_workdir, overrides in members:
    overrides_lib.apply_overrides(config, overrides)   # fails early on an unknown field
    print(f"{member_workdir} {override_string(overrides)}", flush=True)
  if execute:
    for member_workdir, overrides in members:
      mode(overrides_lib.apply_overrides(config, overrides), member_workdir)
  return members


def gather(workdirs: list[str]) -> list[dict]:
  """One row per run: its workdir and the last record of its metrics.jsonl."""
  rows = []
  for workdir in workdirs:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist; is {workdir} a training run?")
    with open(path) as f:
      lines = [line for line in f if line.strip()]
    rows.append(dict(workdir=workdir, **(json.loads(lines[-1]) if lines else {})))
  return rows


def format_table(rows: list[dict]) -> str:
  """A Markdown table of `rows` (columns: every key, in order of appearance)."""
  from cdjax.evaluate import markdown_table
  columns = list(dict.fromkeys(k for row in rows for k in row))
  return markdown_table(rows, columns)


# ---- entry points -------------------------------------------------------------------------------
def main(argv: list[str]) -> None:
  if len(argv) > 1 and argv[1] == "gather":
    print(format_table(gather(argv[2:])))
    return
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments {argv[1:]}; only `gather DIR...` takes any.")
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required.")
  if not flags.FLAGS["verbosity"].present:   # orbax's INFO lines would break the progress bar
    logging.set_verbosity(logging.WARNING)
  parallel.configure_xla(config.mesh)
  if _MODE.value == "sweep":
    run_sweep(config, config_flags.get_config_filename(flags.FLAGS["config"]), workdir,
              _SWEEP_RUN.value)
  else:
    MODES.get(_MODE.value)(config, workdir)


def run() -> None:
  """Console script `cdjax`."""
  overrides_lib.run(main)


if __name__ == "__main__":
  run()
