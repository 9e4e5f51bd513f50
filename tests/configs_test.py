"""Every experiment config builds, and each of its evaluation methods is a valid sampling config."""
import copy
import importlib
import json
import os
import pkgutil

from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import pytest

import configs
from cdjax import coupled
from cdjax import nets
from cdjax import train
from cdjax.nets.layers import count_params

CONFIGS = sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                 if hasattr(importlib.import_module(f"configs.{m.name}"), "get_config"))


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_its_methods_are_valid(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.data.modality != "image":   # speech configs are built and run in speech_test.py
    return
  for method, overrides in config.evaluation.methods.items():
    sampling = copy.deepcopy(config.sampling)
    sampling.update(overrides)
    coupled.STRATEGIES.get(sampling.strategy)
    assert set(sampling.guidance) == {"signal_scale", "logits_scale", "temperature"}, method
  model = coupled.model_from_config(config)
  assert model.num_classes == config.data.num_classes
  assert model.signal_sde.N == config.signal.sde_kwargs.N


@pytest.mark.parametrize("name", CONFIGS)
def test_audio_classifier_trains_on_the_clip_length_it_is_evaluated_on(name):
  """f trained on 0.5 s windows and applied to 1 s clips lost half its accuracy (speech_keywords)."""
  config = importlib.import_module(f"configs.{name}").get_config()
  if config.classifier.net == "speech_classifier":   # (speech_enhancement has no classifier)
    assert config.classifier.crop_samples == config.evaluation.crop_samples


@pytest.mark.parametrize("name", CONFIGS)
def test_numbers_of_classes_agree(name):
  train.check_num_classes(importlib.import_module(f"configs.{name}").get_config())


@pytest.mark.parametrize("config_name,field,value,message", [
    ("imagenet32_100", "data.num_classes", 10,
     r"data.label_subset keeps 100 labels .* set data.num_classes=100"),
    ("mnist_demo", "logits.net_kwargs.num_classes", 5,
     r"logits.net_kwargs.num_classes=5 but data.num_classes=10"),
    ("mnist_demo", "signal.net_kwargs.num_classes", 5,
     r"signal.net_kwargs.num_classes=5 but data.num_classes=10"),
    ("cifar100", "classifier.net_kwargs.num_classes", 10,
     r"classifier.net_kwargs.num_classes=10 but data.num_classes=100")])
def test_disagreeing_numbers_of_classes_stop_training_before_it_starts(tmp_path, config_name,
                                                                       field, value, message):
  config = importlib.import_module(f"configs.{config_name}").get_config()
  section, *path = field.split(".")
  target = config[section]
  for key in path[:-1]:
    target = target[key]
  target[path[-1]] = value
  with pytest.raises(ValueError, match=message):
    train.train(config, str(tmp_path / "work"), "classifier")
  assert not os.path.exists(tmp_path / "work")


def test_paper_image_configs_match_the_paper():
  """(One step of each of their stages: paper_configs_test.py.)"""
  for name, dataset, k, corruption, eval_split, labels, epoch_steps in [
      ("cifar10", "cifar10", 10, "gn30", "test", None, 391),
      ("cifar100", "cifar100", 100, "gn30", "test", None, 391),
      ("imagenet32_100", "imagenet_resized/32x32", 100, "gn15", "validation", tuple(range(100)),
       1000)]:
    c = importlib.import_module(f"configs.{name}").get_config()
    assert (c.data.name, c.data.num_classes, list(c.evaluation.corruptions)) == (dataset, k, [corruption])
    assert dict(c.corruption.kwargs) == {"p": int(corruption[2:]) / 100}   # a stage run on its own
    assert abs(c.signal.pretrain_steps - 10 * epoch_steps) <= 10   # the official 10 epochs
    assert (c.data.eval_split, c.data.label_subset) == (eval_split, labels)
    assert dict(c.signal.sde_kwargs) == {"N": 150, "schedule": "cosine"}


def test_label_subset_overrides_from_the_command_line():
  """`data.label_subset` (None: every label) takes `--config.data.label_subset=(1,2)`, parsed as
  cdjax.main parses `--config`."""
  for name, override, labels in [("default", None, None), ("cifar10", "(1,2)", (1, 2)),
                                 ("cifar10", "3", (3,)), ("imagenet32_100", "(0,5)", (0, 5))]:
    argv = ["cdjax", f"--config={os.path.join(configs.__path__[0], name)}.py"]
    argv += [f"--config.data.label_subset={override}"] if override else []
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    assert config.data.label_subset == labels, (name, override)
    saved = json.loads(config.to_json_best_effort())["data"]["label_subset"]
    assert saved == (None if labels is None else list(labels))


def test_paper_signal_unet_has_about_4m_parameters():
  c = importlib.import_module("configs.cifar10").get_config()
  net = nets.get_network(c.signal.net, **c.signal.net_kwargs)
  x = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(net.init, jax.random.PRNGKey(0), x, jnp.zeros((1,)), x, jnp.zeros((1, 10)))
  assert 3.5e6 < count_params(shapes["params"]) < 4.5e6
