"""Command line: config overrides (unknown fields fail with close matches), modes, sweeps, gather."""
import json
import os
import subprocess
import sys

import pytest

from cdjax import main
from cdjax import overrides
from configs import mnist_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_set_fields_and_unknown_fields_list_close_matches():
  config = mnist_classifier.get_config()
  changed = overrides.apply_overrides(config, {"optim.lr": 3e-4, "classifier.net_kwargs.width": 4})
  assert changed.optim.lr == 3e-4 and changed.classifier.net_kwargs.width == 4
  assert config.optim.lr == 1e-2   # the original is untouched
  with pytest.raises(KeyError, match=r"'optim.lrr'.*Closest fields: optim.lr"):
    overrides.apply_overrides(config, {"optim.lrr": 1.0})
  with pytest.raises(KeyError, match=r"'optimm.lr'.*optim.lr"):
    overrides.check_field(config, "optimm.lr")


def test_sections_are_fields_and_a_path_through_a_value_is_unknown():
  """A misspelt section gets the section as its closest field; a path that goes on past a
  value is an unknown field (a KeyError, as every typo)."""
  config = mnist_classifier.get_config()
  paths = overrides.field_paths(config)
  assert {"optim", "optim.lr", "classifier.net_kwargs", "classifier.net_kwargs.width"} <= set(paths)
  assert len(paths) == len(set(paths))
  with pytest.raises(KeyError) as e:
    overrides.check_field(config, "optimm")
  assert e.value.args[0].split("Closest fields: ")[1].rstrip(".").split(", ")[0] == "optim"
  with pytest.raises(KeyError, match=r"Unknown config field 'optim.lr.x'"):
    overrides.check_field(config, "optim.lr.x")
  with pytest.raises(KeyError, match=r"Unknown config field 'optim.lr.x'"):
    overrides.apply_overrides(config, {"optim.lr.x": 1})


@pytest.mark.parametrize("command", [["-m", "cdjax.main", "--config", "configs/mnist_classifier.py"],
                                     ["-m", "cdjax.demo"]])   # the demo: its default config file
def test_cli_unknown_override_fails_before_running(tmp_path, command):
  out = subprocess.run(
      [sys.executable, *command, "--workdir", str(tmp_path), "--config.train.ckpt_evry=5"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1].startswith(
      "cdjax: Unknown config field 'train.ckpt_evry'. Closest fields: train.ckpt_every")
  assert not os.listdir(tmp_path)


def test_a_checkpoint_error_ends_the_command_with_one_line():
  """A CheckpointError (a corrupt checkpoint, a full disk) ends a command with its message as
  one line, after whatever the storage layer printed."""
  code = ("from cdjax import checkpoint, overrides\n"
          "def main(argv):\n"
          "  raise checkpoint.CheckpointError('Checkpoint /w/4 is unreadable (cause).')\n"
          "overrides.run(main)")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode == 1
  assert out.stderr.strip().splitlines() == ["cdjax: Checkpoint /w/4 is unreadable (cause)."]


@pytest.mark.parametrize("args,paths", [
    ([], "runs/fashion_mnist experiments/results/fashion_mnist"),   # the default config file
    (["--config", "configs/cifar10.py"], "runs/cifar10 experiments/results/cifar10"),
    (["--config=configs/fashion_mnist.py:cpu", "--out", "o"], "runs/fashion_mnist_cpu o")])
def test_experiment_paths_default_to_the_configs_name(args, paths):
  """The experiments' workdir and results prefix default to the config's name (and argument), so
  that another config never reuses fashion_mnist's trained stages or overwrites its results."""
  code = ("from absl import flags\n"
          "from ml_collections import config_flags\n"
          "from cdjax import overrides\n"
          "config_flags.DEFINE_config_file('config', None, '')\n"
          "workdir = flags.DEFINE_string('workdir', None, '')\n"
          "out = flags.DEFINE_string('out', None, '')\n"
          "overrides.run(lambda argv: print(*overrides.experiment_paths(workdir.value, out.value)),\n"
          "              'configs/fashion_mnist.py')")
  out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == paths


def test_sweep_members_product_times_zip(tmp_path):
  """Members: product lists times zip rows; either part alone gives its own members, an empty
  sweep the one base run."""
  sweep = dict(product={"optim.lr": [1e-3, 3e-3]}, zip={"seed": [0, 1], "optim.b1": [0.9, 0.8]})
  members = main.sweep_members(sweep, "/w")
  assert len(members) == 4
  assert members[1] == ("/w/optim.lr=0.001,seed=1,optim.b1=0.8",
                        {"optim.lr": 1e-3, "seed": 1, "optim.b1": 0.8})
  assert main.sweep_members(dict(product={"seed": [0, 1]}), "/w") == [
      ("/w/seed=0", {"seed": 0}), ("/w/seed=1", {"seed": 1})]
  assert main.sweep_members(dict(zip={"seed": [2]}), "/w") == [("/w/seed=2", {"seed": 2})]
  assert main.sweep_members({}, "/w") == [("/w/base", {})]
  with pytest.raises(ValueError, match="equal lengths"):
    main.sweep_members(dict(zip={"seed": [0, 1], "optim.b1": [0.9]}), "/w")


def test_run_sweep_prints_members_and_runs_them_in_turn(tmp_path, capsys):
  config_file = os.path.join(ROOT, "configs", "mnist_classifier.py")
  ran = []
  members = main.run_sweep(mnist_classifier.get_config(), config_file, str(tmp_path), True,
                           mode=lambda cfg, workdir: ran.append((workdir, cfg.optim.lr, cfg.seed)))
  lines = capsys.readouterr().out.strip().splitlines()
  assert len(lines) == len(members) == 4
  assert lines[0] == f"{tmp_path}/optim.lr=0.003,seed=0 --config.optim.lr=0.003 --config.seed=0"
  assert ran[3] == (f"{tmp_path}/optim.lr=0.01,seed=1", 0.01, 1)


def test_run_sweep_checks_every_member_before_running_any(tmp_path):
  """An unknown field fails even without `execute`; a bad value in the last member fails before
  the first member runs."""
  config_file = tmp_path / "config.py"
  for sweep, error in ((dict(zip={"seed": [0, 1], "optim.lrr": [1e-3, 1e-2]}), KeyError),
                       (dict(product={"seed": [0, "one"]}), TypeError)):
    config_file.write_text(f"def sweep():\n  return {sweep!r}\n")
    for execute in (False, True):
      ran = []
      with pytest.raises(error):
        main.run_sweep(mnist_classifier.get_config(), str(config_file), str(tmp_path), execute,
                       mode=lambda cfg, workdir: ran.append(workdir))
      assert not ran


def test_main_gathers_and_refuses_other_arguments(tmp_path, capsys):
  os.makedirs(tmp_path / "a")
  (tmp_path / "a" / "metrics.jsonl").write_text(json.dumps({"step": 3, "loss": 0.5}) + "\n")
  main.main(["cdjax", "gather", str(tmp_path / "a")])
  assert capsys.readouterr().out.splitlines()[0] == "| workdir | step | loss |"
  with pytest.raises(main.app.UsageError, match=r"Unexpected arguments \['train'\]"):
    main.main(["cdjax", "train"])


def test_cli_needs_config_and_workdir():
  command = [sys.executable, "-m", "cdjax.main", "--config", "configs/mnist_classifier.py"]
  out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0
  assert "--config and --workdir are required" in out.stderr


def test_modes_registry_and_gather(tmp_path, capsys):
  assert "train" in main.MODES
  for i, name in enumerate(["a", "b"]):
    os.makedirs(tmp_path / name)
    with open(tmp_path / name / "metrics.jsonl", "w") as f:
      f.write(json.dumps({"step": 1, "loss": 2.0}) + "\n")
      f.write(json.dumps({"step": 2, "loss": 1.0 + i}) + "\n")
  os.makedirs(tmp_path / "c")
  (tmp_path / "c" / "metrics.jsonl").write_text("\n")   # started, nothing recorded yet
  rows = main.gather([str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "c")])
  assert rows[2] == {"workdir": str(tmp_path / "c")}
  rows = rows[:2]
  assert [r["loss"] for r in rows] == [1.0, 2.0] and rows[0]["workdir"] == str(tmp_path / "a")
  table = main.format_table(rows)
  assert table.splitlines()[0] == "| workdir | step | loss |" and len(table.splitlines()) == 4
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    main.gather([str(tmp_path / "missing")])
