"""The train step (sharding, accumulation), optimizers, and the training loop on real data:
accuracy, exact resume in a new process, NaN stop, frozen-classifier hash checks."""
import json
import os
import re
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import checkpoint
from cdjax import data
from cdjax import losses
from cdjax import overrides
from cdjax import nets
from cdjax import parallel
from cdjax import sde as sde_lib
from cdjax import train
from configs import default
from configs import mnist_classifier

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"classifier.net_kwargs.width": 4, "classifier.net_kwargs.depth": 1,
        "classifier.batch_size": 16, "optim.schedule": "constant", "optim.lr": 3e-3,
        "data.max_eval_examples": 64, "train.log_every": 3, "train.ckpt_every": 3,
        "mesh.data": 1}   # one device: faster on a CPU than 8 virtual ones


class TinySignal(nn.Module):
  """net(x_t, t, y, logits) -> [B, H, W, C]: one Dense over the concatenated inputs."""

  @nn.compact
  def __call__(self, x_t, t, y, logits, train=False):
    b = x_t.shape[0]
    h = jnp.concatenate([x_t.reshape(b, -1), y.reshape(b, -1), t[:, None] / 150.0, logits], -1)
    return nn.Dense(x_t[0].size)(h).reshape(x_t.shape)


class TinyClassifier(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(10)(nn.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1))))


class ArraySource:
  """An in-memory random-access source of {"image", "label"} examples."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}

  def __repr__(self):
    return f"ArraySource({len(self)})"


def _apply(module):
  return lambda params, *inputs: module.apply({"params": params}, *inputs[:-1])


def _run_steps(loss_fn, params, batches, config, mesh, frozen=None):
  optimizer = train.make_optimizer(config.optim, len(batches))
  state = parallel.replicate(train.TrainState.create(params, optimizer, jax.random.PRNGKey(1)), mesh)
  step = train.make_train_step(loss_fn, optimizer, config, mesh)
  for b in batches:
    state, metrics = step(state, parallel.global_batch(b, mesh), frozen)
  return jax.device_get(state), jax.device_get(metrics)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (n, 8, 8, 1)).astype(np.float32),
          "label": rng.integers(0, 10, n).astype(np.int32)}


def test_sharded_training_equals_one_device():
  """Signal denoising loss (corruption and noise drawn inside the step): 8 devices == 1."""
  c = default.get_config()
  c.optim.lr = 1e-2
  net = TinySignal()
  corrupt = data.get_corruption("gn_replace", p=0.3)
  loss_fn = lambda p, f, b, r: losses.signal_loss(
      p, f, b, r, apply=_apply(net), sde=sde_lib.get_sde("vp_discrete", N=150),
      observe=lambda k, b: (b["image"], corrupt(k, b["image"])), num_classes=10)
  x = jnp.zeros((1, 8, 8, 1))
  params = jax.device_get(net.init(jax.random.PRNGKey(0), x, jnp.zeros(1), x, jnp.zeros((1, 10))))["params"]
  batches = [{"image": _images(16, s)["image"]} for s in range(5)]
  results = []
  for n in (8, 1):
    c.mesh.data = n
    results.append(_run_steps(loss_fn, params, batches, c, parallel.make_mesh(c)))
  (s8, m8), (s1, m1) = results
  assert int(s8.step) == 5
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s8.params, s8.ema_params)), jax.tree.leaves((s1.params, s1.ema_params))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(s8.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])


def _ynnpack_ops(hlo: str) -> set:
  """The HLO op kinds that a compiled program's YNNPACK fusions hold."""
  called = {re.search(r"calls=(%[\w.\-]+)", line).group(1) for line in hlo.splitlines()
            if '"kind":"__ynn_fusion"' in line}
  ops = set()
  for block in hlo.split("\n\n"):
    name = block.split(" ", 1)[0]
    if name in called:
      ops |= set(re.findall(r"= \S+ ([a-z\-]+)\(", block))
  return ops


def test_train_step_on_cpu_compiles_with_mesh_cpu_train_xla_flags():
  """The default cpu_train_xla_flags reach the train step's program, on one device and sharded:
  YNNPACK runs its reductions, XLA its convolutions. Without them (XLA's defaults here) YNNPACK
  runs the convolutions too. All give the same step."""
  net = nn.Conv(32, (3, 3))
  loss_fn = lambda p, f, b, r: (jnp.mean(net.apply({"params": p}, b["image"]) ** 2), {})
  batch = {"image": np.random.default_rng(0).normal(size=(4, 8, 8, 32)).astype(np.float32)}
  params = net.init(jax.random.PRNGKey(0), batch["image"][:1])["params"]
  c = default.get_config()
  kernels = []
  for devices, flags in ((1, c.mesh.cpu_train_xla_flags), (2, c.mesh.cpu_train_xla_flags), (1, "")):
    c.mesh.data, c.mesh.cpu_train_xla_flags = devices, flags
    mesh = parallel.make_mesh(c)
    optimizer = train.make_optimizer(c.optim, 10)
    state = parallel.replicate(train.TrainState.create(params, optimizer, jax.random.PRNGKey(1)), mesh)
    gb = parallel.global_batch(batch, mesh)
    compiled = train.make_train_step(loss_fn, optimizer, c, mesh).lower(state, gb, None).compile()
    ops = _ynnpack_ops(compiled.as_text())
    assert "reduce" in ops and ("convolution" in ops) == (flags == ""), (flags, ops)
    kernels.append(compiled(state, gb, None)[0].params["kernel"])
  for k in kernels[1:]:
    np.testing.assert_allclose(k, kernels[0], rtol=1e-5, atol=1e-7)


def test_grad_accumulation_equals_full_batch():
  c = default.get_config()
  c.optim.lr = 1e-2
  net = TinyClassifier()
  loss_fn = lambda p, f, b, r: losses.classifier_loss(p, f, b, r, apply=_apply(net))
  params = jax.device_get(net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))["params"]
  batches = [_images(32, s) for s in range(3)]
  mesh = parallel.make_mesh(c)
  full, m_full = _run_steps(loss_fn, params, batches, c, mesh)
  c.train.grad_accum_steps = 4
  accum, m_accum = _run_steps(loss_fn, params, batches, c, mesh)
  np.testing.assert_allclose(m_full["loss"], m_accum["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(accum.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_each_micro_batch_draws_its_own_randomness():
  """Micro-batch i of step s uses fold_in(fold_in(state rng, s), i): its noise and times differ."""
  c = default.get_config()
  c.train.grad_accum_steps = 4
  loss_fn = lambda p, f, b, r: (jnp.sum(p["w"] * 0.0), {"draw": jax.random.normal(r, ())})
  params = {"w": jnp.zeros(2)}
  state, metrics = _run_steps(loss_fn, params, [{"x": np.zeros((8, 1), np.float32)}] * 2, c,
                              parallel.make_mesh(c))
  rng = train.TrainState.create(params, train.make_optimizer(c.optim, 2), jax.random.PRNGKey(1)).rng
  draws = [float(jax.random.normal(jax.random.fold_in(jax.random.fold_in(rng, 1), i), ()))
           for i in range(4)]
  np.testing.assert_allclose(metrics["draw"], np.mean(draws), rtol=1e-6)   # the last step's mean
  assert np.std(draws) > 0.1


class ConvClassifier(nn.Module):
  """Three 32-channel convolutions: activations, not parameters, fill the step's memory."""

  @nn.compact
  def __call__(self, x, train=False):
    for _ in range(3):
      x = nn.tanh(nn.Conv(32, (3, 3))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


def test_step_metrics_are_the_mean_loss_and_the_norms_of_the_mean_gradient():
  """loss = |w - mean of the micro-batch's rows|^2, 2 micro-batches (rows 0, 2, .. and 1, 3, ..;
  means m0 = (3, -3), m1 = (4, -4)): the logged loss is the micro-batches' mean, grad_norm the
  norm of the global-batch gradient mean_i 2 (w - m_i), param_norm that of the updated params."""
  c = default.get_config()
  c.mesh.data, c.train.grad_accum_steps = 1, 2
  c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", grad_clip=0.0)

  def loss_fn(p, f, b, r):
    loss = jnp.sum((p["w"] - b["x"].mean(0)) ** 2)
    return loss, {"loss": loss}
  x = np.stack([np.arange(8.0), -np.arange(8.0)], -1).astype(np.float32)   # row r = (r, -r)
  w0 = np.ones(2, np.float32)
  state, metrics = _run_steps(loss_fn, {"w": w0}, [{"x": x}], c, parallel.make_mesh(c))
  m0, m1 = np.array([3.0, -3.0]), np.array([4.0, -4.0])
  np.testing.assert_allclose(metrics["loss"], (np.sum((w0 - m0) ** 2) + np.sum((w0 - m1) ** 2)) / 2,
                             rtol=1e-6)
  grad = (2 * (w0 - m0) + 2 * (w0 - m1)) / 2
  np.testing.assert_allclose(metrics["grad_norm"], np.linalg.norm(grad), rtol=1e-6)
  # Adam's first step moves each parameter by lr against the sign of its gradient.
  np.testing.assert_allclose(state.params["w"], w0 - 0.1 * np.sign(grad), rtol=1e-5)
  np.testing.assert_allclose(metrics["param_norm"], np.linalg.norm(state.params["w"]), rtol=1e-6)


def test_grad_accumulation_keeps_one_micro_batch_of_activations():
  """The compiled step's temporary memory shrinks with the micro-batch: micro-batch i + 1 waits
  for micro-batch i's gradient (left alone, XLA:CPU runs the micro-batches' forward passes
  first and keeps all their activations: 0.92x at 4 micro-batches)."""
  c = default.get_config()
  net = ConvClassifier()
  loss_fn = lambda p, f, b, r: losses.classifier_loss(p, f, b, r, apply=_apply(net))
  params = net.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))["params"]
  mesh = parallel.make_mesh(c)
  optimizer = train.make_optimizer(c.optim, 10)
  state = parallel.replicate(train.TrainState.create(params, optimizer, jax.random.PRNGKey(1)), mesh)
  batch = parallel.global_batch(_images(256), mesh)
  temp = {}
  for accum in (1, 4):
    c.train.grad_accum_steps = accum
    step = train.make_train_step(loss_fn, optimizer, c, mesh)
    temp[accum] = step.lower(state, batch, None).compile().memory_analysis().temp_size_in_bytes
  assert temp[4] < 0.5 * temp[1], temp


def test_schedules_and_optimizers():
  c = default.get_config().optim
  c.update(lr=1.0, warmup_steps=10, schedule="cosine")
  lr = train.make_schedule(c, 110)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0) and float(lr(60)) == pytest.approx(0.5, abs=1e-6)
  assert float(lr(110)) == pytest.approx(0.0, abs=1e-6)
  c.schedule = "constant"
  assert [float(train.make_schedule(c, 110)(i)) for i in (5, 100)] == [0.5, 1.0]
  c.warmup_steps = 0
  assert float(train.make_schedule(c, 110)(0)) == 1.0
  c.update(name="adamw", weight_decay=0.1, grad_clip=0.0, warmup_steps=10)
  opt = train.make_optimizer(c, 110)
  params = {"w": jnp.ones(3)}
  updates, _ = opt.update({"w": jnp.zeros(3)}, opt.init(params), params)
  assert float(updates["w"][0]) == 0.0   # step 0 of warmup: lr 0
  c.warmup_steps = 0   # lr 1 from step 0: zero gradients leave adamw's decay -lr * wd * params
  opt = train.make_optimizer(c, 110)
  updates, _ = opt.update({"w": jnp.zeros(3)}, opt.init(params), params)
  np.testing.assert_allclose(updates["w"], -1.0 * 0.1 * np.ones(3), rtol=1e-6)
  c.name = "sgd"
  with pytest.raises(ValueError, match="optim.name 'sgd'"):
    train.make_optimizer(c, 10)
  c.name = "adam"   # adam has no weight decay: a value there would be silently ignored
  with pytest.raises(ValueError, match="weight_decay=0.1 has no effect with optim.name='adam'"):
    train.make_optimizer(c, 10)
  assert float(train.ema_decay(0.999, 0)) == pytest.approx(0.1)
  assert float(train.ema_decay(0.999, 10**6)) == pytest.approx(0.999)


def test_ema_follows_the_updated_parameters():
  """ema_k = d_k ema_(k-1) + (1 - d_k) params_k with d_k = ema_decay(decay, k - 1), ema_0 = params_0."""
  c = default.get_config()
  c.optim.update(lr=0.1, warmup_steps=0, schedule="constant", grad_clip=0.0)
  loss_fn = lambda p, f, b, r: (jnp.sum((p["w"] - b["x"].mean(0)) ** 2), {})
  mesh = parallel.make_mesh(c)
  optimizer = train.make_optimizer(c.optim, 3)
  p0 = {"w": jnp.zeros(3)}
  state = parallel.replicate(train.TrainState.create(p0, optimizer, jax.random.PRNGKey(1)), mesh)
  step = train.make_train_step(loss_fn, optimizer, c, mesh)
  ema = np.zeros(3)
  for k in range(3):
    batch = {"x": np.full((8, 3), k + 1.0, np.float32)}
    state, _ = step(state, parallel.global_batch(batch, mesh), None)
    d = float(train.ema_decay(c.train.ema_decay, k))
    ema = d * ema + (1 - d) * np.asarray(state.params["w"])
    assert np.abs(np.asarray(state.params["w"])).min() > 0.05   # the parameters moved
    np.testing.assert_allclose(state.ema_params["w"], ema, rtol=1e-6)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
  """configs/mnist_classifier trained on mnist_local (one device: faster on a CPU than 8 virtual
  ones): (workdir, final metrics)."""
  workdir = str(tmp_path_factory.mktemp("classifier"))
  config = overrides.apply_overrides(mnist_classifier.get_config(), {"mesh.data": 1})
  return workdir, train.train(config, workdir, "classifier")


@pytest.mark.slow
@pytest.mark.optimized   # 400 steps (the fixture trains under its first test's mark)
def test_mnist_classifier_reaches_95_percent(classifier_dir):
  workdir, final = classifier_dir
  assert final["step"] == 400 and final["eval_accuracy"] >= 0.95
  params, record = checkpoint.load_classifier(os.path.join(workdir, "classifier"))
  assert record["clean_test_accuracy"] == final["eval_accuracy"]
  assert record["sha256"] == checkpoint.params_sha256(params)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == list(range(50, 401, 50))
  assert records[-1]["loss"] < records[0]["loss"]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["classifier"]["num_steps"] == 400


def _cli(workdir, fields):
  args = [f"--config.{k}={v}" for k, v in fields.items()]
  return subprocess.run([sys.executable, "-m", "cdjax.main", "--config",
                         "configs/mnist_classifier.py", "--workdir", workdir, *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_exact_resume_in_a_new_process(tmp_path):
  """train 3 + save + restore in a new process + train 3 == train 6, bitwise (same XLA flags),
  with the state replicated over all 8 devices; the 3-step export is never overwritten."""
  sharded = dict(TINY, **{"mesh.data": -1})
  base = overrides.apply_overrides(mnist_classifier.get_config(), sharded)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train.train(overrides.apply_overrides(base, {"classifier.num_steps": 6}), straight, "classifier")
  train.train(overrides.apply_overrides(base, {"classifier.num_steps": 3}), resumed, "classifier")
  # The CLI adds mesh.xla_flags to XLA_FLAGS; this process runs XLA's own convolutions, and
  # bitwise equality needs the same kernels in both.
  longer = dict(sharded, **{"classifier.num_steps": 6, "mesh.xla_flags": ""})
  out = _cli(resumed, longer)
  # The 3-step run's exported classifier is not replaced (stages may have been trained against
  # it): the longer run trains and checkpoints, then stops before exporting over it.
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith(
      f"cdjax: {os.path.join(resumed, 'classifier')} holds another frozen classifier")
  shutil.rmtree(os.path.join(resumed, "classifier"))
  out = _cli(resumed, longer)   # moved aside: the rerun exports from the last checkpoint
  assert out.returncode == 0, out.stderr[-3000:]
  assert checkpoint.load_classifier(os.path.join(resumed, "classifier"))[1]["sha256"] == (
      checkpoint.load_classifier(os.path.join(straight, "classifier"))[1]["sha256"])
  for ema in (False, True):
    a = checkpoint.restore_params(os.path.join(straight, "checkpoints"), ema=ema)
    b = checkpoint.restore_params(os.path.join(resumed, "checkpoints"), ema=ema)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)
  read = lambda d: [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
  assert [r["loss"] for r in read(straight)] == [r["loss"] for r in read(resumed)]
  for d in (straight, resumed):   # resumed: one event file per process
    assert [r["step"] for r in read(d)] == [3, 6]
    assert _tensorboard_scalars(d) == _as_scalars(read(d))


def _tensorboard_scalars(workdir):
  """{(tag, step): value} of the event files in workdir/tensorboard, read as TensorBoard's
  server reads them (all of them for its scalars plugin)."""
  from tensorboard.backend.event_processing import plugin_event_accumulator
  from tensorboard.util import tensor_util
  events = plugin_event_accumulator.EventAccumulator(os.path.join(workdir, "tensorboard"))
  events.Reload()
  tags = events.Tags()["tensors"]
  assert all(events.SummaryMetadata(t).plugin_data.plugin_name == "scalars" for t in tags)
  return {(t, e.step): tensor_util.make_ndarray(e.tensor_proto).item()
          for t in tags for e in events.Tensors(t)}


def _as_scalars(records):
  """metrics.jsonl records as {(name, step): value}, rounded to float32 as TensorBoard stores."""
  return {(k, r["step"]): float(np.float32(v))
          for r in records for k, v in r.items() if k != "step"}


def test_check_finite_averages_the_window_and_names_the_first_bad_step():
  """A record holds the means over the steps since the last one; a NaN or Inf stops at its
  step, counted from 1 after `first_step`, naming the last good checkpoint."""
  window = [{"loss": np.float32(v), "grad_norm": np.float32(2 * v)} for v in (1.0, 2.0, 6.0)]
  assert train._check_finite(window, 6, None) == {"loss": 3.0, "grad_norm": 6.0}
  window[1]["grad_norm"], window[2]["loss"] = np.float32(np.inf), np.float32(np.nan)
  with pytest.raises(FloatingPointError,
                     match=r"Non-finite \{'grad_norm': inf\} in step 8 \(loss 2.0\).*kept: ck/6\."):
    train._check_finite(window, 6, "ck/6")


def test_metrics_writer_drops_records_a_resumed_run_redoes(tmp_path):
  # A run logged steps 1 and 2, was stopped, and resumes from its checkpoint of step 1.
  workdir, path = str(tmp_path), str(tmp_path / "metrics.jsonl")
  writer = train.MetricsWriter(workdir, False)
  for step in (1, 2):
    writer.write({"step": step, "loss": 1.0 / step})
  writer.close()
  writer = train.MetricsWriter(workdir, False, start=1)
  writer.write({"step": 2, "loss": 0.25})
  writer.close()
  assert [json.loads(l) for l in open(path)] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.25}]


def test_metrics_writer_tensorboard_only_when_asked_and_installed(tmp_path, monkeypatch):
  records = [{"step": 1, "loss": 0.5, "grad_norm": 2.0}, {"step": 2, "loss": 0.1, "grad_norm": 1.0}]

  def write(name, tensorboard):
    workdir = str(tmp_path / name)
    os.makedirs(workdir)
    writer = train.MetricsWriter(workdir, tensorboard)
    for r in records:
      writer.write(r)
    writer.close()
    assert [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))] == records
    return workdir

  assert _tensorboard_scalars(write("on", True)) == _as_scalars(records)
  assert not os.path.exists(os.path.join(write("off", False), "tensorboard"))
  monkeypatch.setitem(sys.modules, "tensorboard.summary", None)   # not installed
  assert not os.path.exists(os.path.join(write("missing", True), "tensorboard"))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  clean = data.load_split("mnist_local", "train", max_examples=64)
  images = clean["image"].copy()
  images[40] = np.nan   # one poisoned example: the step whose batch holds it has a NaN loss
  monkeypatch.setattr(train.data, "get_source", lambda *a, **k: ArraySource(images, clean["label"]))
  config = overrides.apply_overrides(mnist_classifier.get_config(), dict(
      TINY, **{"classifier.num_steps": 12, "train.ckpt_every": 1}))
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"'loss': nan.* in step (\d+).*last good checkp") as info:
    train.train(config, workdir, "classifier")
  step = int(re.search(r"in step (\d+)", str(info.value)).group(1))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert f"{ckpt_dir}/{step - 1}" in str(info.value) or step == 1
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert steps[-1] == step - 1   # checkpoints 1..step-1 saved (the last 3 kept); step never written
  params = checkpoint.restore_params(ckpt_dir, ema=False)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_update_to_inf_parameters_is_never_saved(tmp_path):
  # The loss of step 1 is finite, but its update (at lr 1e40) makes the parameters inf.
  config = overrides.apply_overrides(mnist_classifier.get_config(), dict(
      TINY, **{"classifier.num_steps": 3, "train.ckpt_every": 1, "optim.lr": 1e40,
               "optim.warmup_steps": 0, "optim.schedule": "constant"}))
  with pytest.raises(FloatingPointError, match=r"'param_norm': inf.* in step 1 .*none \(no chec"):
    train.train(config, str(tmp_path), "classifier")
  assert not [d for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()]


def test_batch_not_divisible_fails_at_start_up(tmp_path):
  config = overrides.apply_overrides(mnist_classifier.get_config(), {"classifier.batch_size": 12})
  with pytest.raises(ValueError, match=r"batch size 12 .* 8 devices"):
    train.train(config, str(tmp_path), "classifier")
  for field, value in (("grad_accum_steps", 0), ("log_every", 0), ("ckpt_every", -1)):
    bad = overrides.apply_overrides(mnist_classifier.get_config(), {f"train.{field}": value})
    with pytest.raises(ValueError, match=rf"train.{field}={value}; it must be at least 1"):
      train.train(bad, str(tmp_path), "classifier")
  assert not os.listdir(tmp_path)


def test_best_metric_not_in_the_metrics_is_a_clear_error_before_writing(tmp_path):
  config = overrides.apply_overrides(mnist_classifier.get_config(), dict(
      TINY, **{"classifier.num_steps": 2, "train.ckpt_every": 1,
               "checkpoint.best_metric": "eval_acuracy"}))
  with pytest.raises(ValueError, match=r"best_metric='eval_acuracy' is not a metric.*eval_accuracy"):
    train.train(config, str(tmp_path), "classifier")
  assert not os.listdir(os.path.join(tmp_path, "checkpoints"))
  with pytest.raises(ValueError, match="best_mode='largest'"):
    checkpoint.Checkpointer(str(tmp_path / "c"), overrides.apply_overrides(
        config, {"checkpoint.best_mode": "largest"}).checkpoint)


def test_resume_with_another_network_names_the_difference_and_keeps_the_run(tmp_path):
  config = overrides.apply_overrides(mnist_classifier.get_config(), dict(
      TINY, **{"classifier.num_steps": 3}))
  config.classifier.lr = 0.02   # the trainer's own learning rate (as --mode train runs it)
  workdir = str(tmp_path)
  train.train(config, workdir, "classifier")
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["optim"]["lr"] == 0.02
  wider = overrides.apply_overrides(config, {"classifier.net_kwargs.width": 8,
                                        "classifier.num_steps": 6})
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"checkpoints/3 holds a different train state.*other shapes"):
    train.train(wider, workdir, "classifier")
  with open(os.path.join(workdir, "config.json")) as f:   # the record of the run is kept
    assert json.load(f)["classifier"]["net_kwargs"]["width"] == 4
  assert checkpoint.restore_params(os.path.join(workdir, "checkpoints"))   # and its checkpoint


@pytest.mark.slow
def test_resuming_with_other_data_names_the_checkpoint_and_leaves_the_workdir(classifier_dir,
                                                                             files_under):
  """A checkpoint saved reading other data (here: another shuffle) does not resume; the error
  names it and the config.json to resume with, and nothing in the workdir changes."""
  workdir = classifier_dir[0]
  before = files_under(workdir)
  config = overrides.apply_overrides(mnist_classifier.get_config(),
                                     {"mesh.data": 1, "data.shuffle_seed": 5})
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"Checkpoint {re.escape(workdir)}/checkpoints/400 was saved reading other data .* the "
      rf"data.\* settings of {re.escape(workdir)}/config.json")):
    train.train(config, workdir, "classifier")
  assert files_under(workdir) == before


@pytest.mark.slow
def test_logits_trainer_records_and_checks_classifier(classifier_dir, tmp_path):
  """A logit branch trained against classifier A refuses to resume or load with classifier B; a
  classifier or init_logits run of another network is refused, naming the fields."""
  clf_a = os.path.join(classifier_dir[0], "classifier")
  params, record = checkpoint.load_classifier(clf_a)
  clf_b = str(tmp_path / "other_classifier")
  checkpoint.save_classifier(clf_b, jax.tree.map(lambda x: x * 1.01, params), 0.5,
                             mnist_classifier.get_config())
  config = overrides.apply_overrides(mnist_classifier.get_config(), {
      "logits.net_kwargs": dict(num_classes=10, hidden=16, depth=1, heads=1, enc_width=8,
                                enc_depth=2),
      "logits.pretrain_steps": 2, "logits.batch_size": 16, "train.ckpt_every": 2, "mesh.data": 1,
      "checkpoint.classifier": clf_a})
  workdir = str(tmp_path / "logits")
  final = train.train(config, workdir, "logits")
  assert final["step"] == 2 and np.isfinite(final["loss"])
  ckpt_dir = os.path.join(workdir, "checkpoints")
  checkpoint.restore_params(ckpt_dir, frozen_sha256={"classifier": record["sha256"]})
  _, record_b = checkpoint.load_classifier(clf_b)
  with pytest.raises(checkpoint.CheckpointError, match=record_b["sha256"]):
    checkpoint.restore_params(ckpt_dir, frozen_sha256={"classifier": record_b["sha256"]})
  with pytest.raises(checkpoint.CheckpointError, match="trained against the frozen classifier"):
    train.train(overrides.apply_overrides(config, {"checkpoint.classifier": clf_b,
                                              "logits.pretrain_steps": 4}), workdir, "logits")
  # Networks other than the checkpoints hold: named by their config fields, before training.
  with pytest.raises(checkpoint.CheckpointError, match=(
      r"checkpoint.classifier=.* is a classifier.net='cnn_classifier' with net_kwargs .*'width': "
      r"8.*provenance.json\); this config builds 'cnn_classifier' with .*'width': 16")):
    train.train(overrides.apply_overrides(config, {"classifier.net_kwargs.width": 16}),
                str(tmp_path / "wider_classifier"), "logits")
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"checkpoint.init_logits={re.escape(workdir)} holds other parameters than logits.net / "
      r"logits.net_kwargs build: \d+ other shapes")):
    train.train(overrides.apply_overrides(config, {"checkpoint.init_logits": workdir,
                                                   "logits.net_kwargs.hidden": 32}),
                str(tmp_path / "wider_logits"), "logits")


def test_frozen_classifier_loads_in_inference_mode_and_refuses_another_network(tmp_path):
  """The frozen classifier is the saved params applied by the config's network (train=False);
  a config building another network is refused, naming both (the slow logits test: in training)."""
  config = mnist_classifier.get_config()
  config.classifier.net_kwargs.dropout = 0.5   # in training mode, the logits would differ
  net = nets.get_network(config.classifier.net, **config.classifier.net_kwargs)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 1)), jnp.float32)
  params = jax.jit(net.init)(jax.random.PRNGKey(0), x[:1])["params"]
  config.checkpoint.classifier = str(tmp_path / "classifier")
  checkpoint.save_classifier(config.checkpoint.classifier, params, 0.5, config)
  classify, loaded = train._frozen_classifier(config)
  np.testing.assert_allclose(jax.jit(classify)(loaded, x),
                             jax.jit(net.apply, static_argnames="train")({"params": params}, x,
                                                                         train=False),
                             rtol=1e-6)
  config.classifier.net_kwargs.width = 16
  with pytest.raises(checkpoint.CheckpointError, match=(
      r"is a classifier.net='cnn_classifier' with net_kwargs .*'width': 8.*this config builds "
      r"'cnn_classifier' with .*'width': 16")):
    train._frozen_classifier(config)


def test_remat_from_config_reaches_the_networks():
  config = mnist_classifier.get_config()
  config.train.remat = True
  assert train._network(config, config.signal).remat
  # One config trains every stage: the classifier (no remat field) is built as configured.
  assert train._network(config, config.classifier) == nets.get_network(
      config.classifier.net, **config.classifier.net_kwargs)
  config.classifier.net_kwargs.widht = 8
  with pytest.raises(TypeError, match="'cnn_classifier' rejected its net_kwargs.*widht"):
    train._network(config, config.classifier)


def test_classifier_loss_crops_audio_to_random_windows():
  wave = jnp.tile(jnp.arange(100, dtype=jnp.float32), (4, 1))
  seen = []

  def apply(params, x, rng):
    seen.append(x)
    return jnp.zeros((x.shape[0], 3))
  batch = {"audio": wave, "label": jnp.zeros((4,), jnp.int32)}
  loss, _ = losses.classifier_loss({}, None, batch, jax.random.PRNGKey(0), apply=apply,
                                   input_key="audio", crop_samples=16)
  np.testing.assert_allclose(loss, np.log(3), rtol=1e-6)
  x = np.asarray(seen[-1])
  assert x.shape == (4, 16)
  np.testing.assert_array_equal(np.diff(x, axis=-1), 1.0)   # contiguous windows
  losses.classifier_loss({}, None, batch, jax.random.PRNGKey(0), apply=apply, input_key="audio")
  assert seen[-1] is wave   # crop_samples=0: whole clips


@pytest.mark.parametrize("trainer", ["logits", "joint"])
def test_logit_targets_standardised_with_the_configured_std(trainer, monkeypatch):
  """The logit and joint trainers' losses standardise the classifier's logits (targets and
  conditioning) with `logits.standardize_std`, as the sampler does (losses_test checks the
  standardisation itself)."""
  monkeypatch.setattr(train, "_frozen_classifier", lambda config: (lambda p, x: x, {}))
  c = default.get_config()
  c.logits.standardize_std = 0.3
  assert train.TRAINERS.get(trainer)(c).loss_fn.keywords["std"] == 0.3


def test_classifier_crop_reaches_the_loss_and_on_images_is_a_clear_error():
  """`classifier.crop_samples` of an audio config is the crop of the trainer's loss; on images
  it is an error."""
  c = default.get_config()
  c.data.modality = "audio"
  c.classifier.crop_samples = 8064
  assert train.TRAINERS.get("classifier")(c).loss_fn.keywords["crop_samples"] == 8064
  c = default.get_config()
  c.classifier.crop_samples = 8064
  with pytest.raises(ValueError, match="crops audio clips.*crop_samples=0"):
    train.TRAINERS.get("classifier")(c)
