"""The paper's experiment configs cifar10, cifar100, imagenet32_100 and speech_commands, shrunk in
size only (network widths, steps, batches; the same nets, SDE family and N, corruption and
sampling settings): one step of every stage trainer their experiment trains (classifier, signal,
logits, joint; `experiment.train_all`), then the coupled sampler of their sampling config.

Every step and the sampler are traced (`jax.eval_shape`: shapes and dtypes); imagenet32_100 (the
only config with a label subset) also compiles and runs its classifier and joint steps (the joint
loss holds both branch losses) and the sampler: finite losses, moved params, finite outputs, NFE.
Running every stage of every config would cost minutes: XLA:CPU compiles each step in 10-80 s.

Images come through the TFDS catalog path under `tfds.testing.mock_data` (random examples with
the datasets' real feature specs and splits). speech_commands' TFDS builder imports TensorFlow
even under mock_data, and TensorFlow is not installed (tests/data_test.py checks the clear error
`get_source` raises), so its examples are synthetic ones with the dataset's spec (1-s clips,
16 kHz int16, 12 labels), batched by `data.make_loader` without TFDS; its noise clips (for the
noise_reverb corruption) are noise_local's.
"""
import importlib
from unittest import mock

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cdjax import audio
from cdjax import checkpoint
from cdjax import coupled
from cdjax import data
from cdjax import evaluate
from cdjax import experiment
from cdjax import overrides
from cdjax import parallel
from cdjax import speech
from cdjax import train

B = 8            # examples per batch
SAMPLES = 2      # items the coupled sampler enhances and classifies
STAGES = ("classifier", "signal", "logits", "joint")
RUN_STAGES = ("classifier", "joint")   # the joint step runs both branch nets' losses
STEPS = {"classifier.num_steps": 1, "classifier.batch_size": B, "signal.pretrain_steps": 1,
         "signal.batch_size": B, "logits.pretrain_steps": 1, "logits.batch_size": B,
         "train.joint_steps": 1, "optim.warmup_steps": 0,
         "mesh.data": 1}   # one device: 8 virtual ones on 2 CPU cores compile slower
TINY_IMAGES = {"classifier.net_kwargs.widths": (4, 8, 8), "classifier.net_kwargs.blocks": (1, 1, 1),
               "signal.net_kwargs.width": 4, "signal.net_kwargs.num_res_blocks": 1,
               "logits.net_kwargs.hidden": 8, "logits.net_kwargs.depth": 1,
               "logits.net_kwargs.enc_width": 4}
TINY_SPEECH = {"classifier.net_kwargs.width": 4, "signal.net_kwargs.nf": 4,
               "signal.net_kwargs.num_res_blocks": 1, "signal.net_kwargs.logit_hidden": 4,
               "logits.net_kwargs.hidden": 8, "logits.net_kwargs.depth": 1,
               "logits.net_kwargs.enc_width": 4,
               "checkpoint.init_signal": ""}   # no pre-trained SGMSE+ here


def _catalog_batches(config):
  """The first batch of the train and of the eval split, read through `data.get_source` from
  TFDS's mock of the catalog dataset (labels restricted to `data.label_subset`)."""
  c = config.data
  with (tfds.testing.mock_data(num_examples=200),   # ~20 with an ImageNet label < 100
        mock.patch.object(data.sources, "_online", return_value=True)):
    return [_first_batch(data.get_source(c.name, split, label_subset=c.label_subset))
            for split in (c.train_split, c.eval_split)]


def _speech_commands_batches(config):
  """Synthetic train and eval batches with speech_commands' spec: {"audio": int16 [16000],
  "label": int in [0, 12)}."""
  rng = np.random.default_rng(0)
  wave = np.sin(2 * np.pi * rng.uniform(100, 1000, (2 * B, 1)) * np.arange(16000) / 16000)
  clips = (16384 * wave * np.hanning(16000)).astype(np.int16)
  examples = [{"audio": a, "label": k % config.data.num_classes} for k, a in enumerate(clips)]
  return _first_batch(examples[:B]), _first_batch(examples[B:])


def _first_batch(source) -> dict:
  return next(iter(data.make_loader(source, B, seed=0)))


def _call(run: bool):
  """`call(fn, *args)`: fn(*args), compiled (a jitted fn as it is, keeping its donation), when
  `run`, else its output's shapes (`jax.eval_shape`)."""
  def compile_and_run(fn, *args):
    return (fn if hasattr(fn, "lower") else jax.jit(fn))(*args)
  return compile_and_run if run else jax.eval_shape


def _one_step(cfg, stage: str, batch: dict, run: bool):
  """(initial params, state after, metrics) of one step of `stage`'s trainer on `batch`; only
  shapes unless `run`."""
  call = _call(run)
  trainer = train.TRAINERS.get(stage)(train.stage_config(cfg, stage))
  optimizer = train.make_optimizer(cfg.optim, trainer.num_steps)
  mesh = parallel.make_mesh(cfg)
  rbg = lambda seed: jax.random.key(seed, impl="rbg")   # XLA:CPU compiles threefry ~7x slower
  params = call(trainer.init_params, rbg(cfg.seed), jax.tree.map(lambda v: v[:1], batch))
  state = call(lambda p: train.TrainState.create(p, optimizer, rbg(1)), params)
  step = train.make_train_step(trainer.loss_fn, optimizer, cfg, mesh)
  params = jax.device_get(params)   # the state is donated
  frozen = parallel.replicate(trainer.frozen, mesh)
  state, metrics = call(step, parallel.replicate(state, mesh) if run else state,
                        parallel.global_batch(batch, mesh), frozen)
  return params, jax.device_get(state), jax.device_get(metrics)


def _to_model(cfg, y):
  """Waveforms [N, L] -> the networks' compressed spectrograms [N, F, T] (`speech.run_keywords`)."""
  frontend = audio.Frontend.from_config(cfg)
  return frontend.analyze(audio.center_crop(y, cfg.evaluation.crop_samples))[0]


CASES = {   # config -> (size overrides, train and eval batches, run: compile and run, else
            # shapes, the stages stepped; speech: the joint step holds both branch nets' losses,
            # tracing each NCSN++ stage apart costs ~10 s)
    "cifar10": (TINY_IMAGES, _catalog_batches, False, STAGES),
    "cifar100": (TINY_IMAGES, _catalog_batches, False, STAGES),
    "imagenet32_100": (TINY_IMAGES, _catalog_batches, True, STAGES),
    "speech_commands": (TINY_SPEECH, _speech_commands_batches, False, ("classifier", "joint")),
}


@pytest.mark.parametrize("name", CASES)
def test_paper_config_trains_every_stage_and_samples(name, tmp_path):
  tiny, batches, run, stages = CASES[name]
  call = _call(run)
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.train.joint_steps > 0   # the paper trains the branches jointly
  config = overrides.apply_overrides(config, {**STEPS, **tiny})
  (corruption,) = config.evaluation.corruptions
  cfg = experiment.corruption_config(config, str(tmp_path), corruption)   # as train_all does
  k, modality = config.data.num_classes, config.data.modality
  batch, eval_batch = batches(config)
  for b in (batch, eval_batch):
    assert b[modality].shape == (B,) + tuple(config.data.shape)
    assert b["label"].dtype == np.int32 and 0 <= b["label"].min() and b["label"].max() < k

  shapes = lambda tree: jax.tree.map(lambda v: (v.shape, v.dtype), tree)
  states = {}
  for stage in stages:
    run_stage = run and stage in RUN_STAGES
    before, state, metrics = _one_step(cfg, stage, batch, run_stage)
    assert metrics["loss"].shape == () and metrics["loss"].dtype == np.float32, stage
    assert shapes(state.params) == shapes(before), stage
    if run_stage:
      assert np.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0, stage
      assert int(state.step) == 1, stage
      moved = jax.tree.map(lambda a, b: not np.allclose(a, b), before, state.params)
      assert any(jax.tree.leaves(moved)), stage
    if stage == "classifier":   # frozen for the other stages
      frozen = state.ema_params if run_stage else jax.tree.map(
          lambda v: np.zeros(v.shape, v.dtype), state.ema_params)
      checkpoint.save_classifier(cfg.checkpoint.classifier, frozen, 0.0, cfg)
    states[stage] = state

  # The coupled sampler on the joint stage's EMA parameters (as `experiment.load_params`).
  corrupt = data.corruption_from_config(cfg, cfg.data.eval_split)
  y = call(corrupt, jax.random.key(2), eval_batch[modality][:SAMPLES])
  if modality == "audio":
    model, y = speech.coupled_model(cfg), call(lambda w: _to_model(cfg, w), y)
  else:
    model = coupled.model_from_config(cfg)
  out = call(jax.jit(coupled.get_coupled_fn(model, cfg.sampling)), states["joint"].ema_params,
             states["classifier"].ema_params, jax.random.key(3), y)
  assert out.x0.shape == y.shape and out.x0.dtype == y.dtype
  assert out.logits.shape == out.classifier_logits.shape == (SAMPLES, k)
  if run:
    assert all(np.all(np.isfinite(v)) for v in (out.x0, out.logits, out.classifier_logits))
    assert int(out.nfe) == 2 * config.signal.sde_kwargs.N   # one signal, one logit call per step
