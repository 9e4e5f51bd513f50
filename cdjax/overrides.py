"""Config overrides from the command line: `--config.<field>=value` must name an existing field.

Every entry point runs through `run` (`app.run` with `parse_flags`), so a misspelt field fails at
once with one line naming the closest fields.
"""
import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, Optional

from absl import app
from absl import flags
import ml_collections

from cdjax import checkpoint


def field_paths(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Every dotted field path of `config`, sections included (e.g. "optim", "optim.lr")."""
  paths = []
  for key, value in config.items():
    paths.append(prefix + key)
    if isinstance(value, ml_collections.ConfigDict):
      paths += field_paths(value, f"{prefix}{key}.")
  return paths


def check_field(config: ml_collections.ConfigDict, path: str) -> None:
  """Raises KeyError naming `path` and its closest existing fields unless `config` has it."""
  node = config
  for key in path.split("."):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      close = difflib.get_close_matches(path, field_paths(config), n=5, cutoff=0.5)
      hint = f" Closest fields: {', '.join(close)}." if close else ""
      raise KeyError(f"Unknown config field {path!r}.{hint}")
    node = node[key]


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]):
  """A copy of `config` with {dotted field: value} set (each field must exist)."""
  config = ml_collections.ConfigDict(config.to_dict())
  for path, value in overrides.items():
    check_field(config, path)
    *parents, key = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[key] = value
  return config


def load_module(config_arg: str):
  """The Python module of a `--config` value (`path.py` or `path.py:arg`), and the arg."""
  path, _, arg = config_arg.partition(":")
  spec = importlib.util.spec_from_file_location("cdjax_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, arg


def config_name() -> str:
  """The parsed `--config` flag's file name less ".py", with its argument if any:
  "configs/cifar10.py" -> "cifar10", "configs/fashion_mnist.py:cpu" -> "fashion_mnist_cpu"."""
  path, _, arg = flags.FLAGS["config"].config_filename.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}_{arg}" if arg else name


def experiment_paths(workdir: Optional[str], out: Optional[str]) -> tuple[str, str]:
  """An experiment's (workdir, results prefix): as given, else runs/<config_name()> and
  experiments/results/<config_name()>, so that two configs never share trained stages or
  results files."""
  name = config_name()
  return workdir or os.path.join("runs", name), out or os.path.join("experiments", "results", name)


def _config_arg(argv: list[str]):
  """The value of --config in argv, or None."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a.split("=", 1)[1]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, after checking that each `--config.<field>` names a field of the
  `--config` file."""
  config_arg = _config_arg(argv)
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]
  if config_arg and overrides:
    module, arg = load_module(config_arg)
    config = module.get_config(arg) if arg else module.get_config()
    for path in overrides:
      try:
        check_field(config, path)
      except KeyError as e:
        sys.exit(f"cdjax: {e.args[0]}")
  return flags.FLAGS(argv)


def run(main: Callable, default_config: Optional[str] = None) -> None:
  """`app.run(main)` with `parse_flags`, adding `--config=<default_config>` when the command
  line gives none (define the `config` flag without a default: ml_collections applies a
  default file's overrides as the flag is defined, before any check could name a typo); Ctrl-C
  and a `CheckpointError` end it with one line."""
  def parser(argv):
    if default_config and _config_arg(argv) is None:
      argv = argv[:1] + [f"--config={default_config}"] + argv[1:]
    return parse_flags(argv)

  def interruptible(argv):   # Ctrl-C: one line (what was interrupted, how to go on)
    try:
      return main(argv)
    except KeyboardInterrupt as e:
      sys.exit(f"cdjax: interrupted{': ' + str(e) if str(e) else '.'}")
    except checkpoint.CheckpointError as e:   # the last line, after the storage layer's noise
      sys.exit(f"cdjax: {e}")
  app.run(interruptible, flags_parser=parser)
