"""Joint training of both branches (`losses.joint_loss`, the `joint` trainer): what the signal net
is conditioned on in each `train.joint_logits_cond` mode, and real steps of the trainer.

Stub networks (affine in their inputs, their inputs captured eagerly) keep the conditioning
checks to seconds; the trainer test runs three steps with one-layer stand-in networks.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import checkpoint
from cdjax import losses
from cdjax import parallel
from cdjax import sde as sde_lib
from cdjax import train
from cdjax.coupled import standardize_logits
from configs import default
from configs import speech_commands
from experiment_test import tiny_config

B, K, STD = 2048, 4, 0.8
KEY = jax.random.key(0, impl="rbg")
OUVE = dict(theta=1.5, sigma_min=0.05, sigma_max=0.5, N=10, t_eps=0.03)
PARAMS = {"signal": {"w": jnp.float32(0.3), "v": jnp.float32(0.2)},
          "logits": {"w": jnp.float32(0.5)}}


def _stub_loss(signal_sde, logits_sde, calls, weights=(1.0, 0.0), **kwargs):
  """joint_loss(params, rng) on x0 [B, K] with stub nets recording their inputs in `calls`
  (`calls["logits"]`: one entry per logit-net call): classify(x) = x, y = x0 + 0.5, the logit
  net p["w"] * l_t, the signal net p["w"] * x_t + p["v"] * logits; loss weights (signal, logits)."""
  def logits_apply(p, l_t, t, f_c, c, rng):
    out = p["w"] * l_t
    calls.setdefault("logits", []).append((l_t, t, out, f_c, c))
    return out

  def signal_apply(p, x_t, t, y, logits, rng):
    out = p["w"] * x_t + p["v"] * logits
    calls["signal"] = (t, logits, x_t, out)
    return out

  x0 = jax.random.normal(jax.random.fold_in(KEY, 1), (B, K))
  return lambda params, rng: losses.joint_loss(
      params, {"classifier": None}, {"x": x0}, rng, signal_apply=signal_apply,
      logits_apply=logits_apply, signal_sde=signal_sde, logits_sde=logits_sde,
      observe=lambda k, b: (b["x"], b["x"] + 0.5), classify=lambda p, x: x, std=STD,
      weights=dict(zip(("signal", "logits"), weights)), **kwargs), x0


@pytest.mark.parametrize("signal_sde,fraction", [
    (sde_lib.get_sde("ouve", **OUVE), lambda t: t),                      # OUVE: t / T, T = 1
    (sde_lib.get_sde("vp_discrete", N=10), lambda t: (t + 1) / 10),      # DDPM: (t + 1) / N
])
def test_noised_clean_conditions_on_the_logit_marginal_then_f_y(signal_sde, fraction):
  """The speech recipe: per example, noised l0 from the OU logit SDE's closed-form marginal at
  the signal's fraction of T when that is below 1/2, exactly f(y) otherwise."""
  calls = {}
  loss_fn, x0 = _stub_loss(signal_sde, sde_lib.get_sde("ouve", **OUVE), calls,
                           logits_cond="noised_clean", switch_t=0.5)
  loss, _ = loss_fn(PARAMS, KEY)
  assert np.isfinite(loss)
  t, logits = map(np.asarray, calls["signal"][:2])
  l0, f_y = map(np.asarray, losses.classifier_targets(lambda p, x: x, None, x0, x0 + 0.5, STD))
  r = fraction(t)
  noised = r < 0.5
  assert 0.3 < noised.mean() < 0.6
  np.testing.assert_array_equal(logits[~noised], f_y[~noised])
  # OUVE (theta, sigma_min, sigma_max) on the logits, at s = r * T (T = 1), reverting to f(y):
  s, th, lg = r[noised, None], OUVE["theta"], math.log(OUVE["sigma_max"] / OUVE["sigma_min"])
  mean = f_y[noised] + (l0[noised] - f_y[noised]) * np.exp(-th * s)
  std = np.sqrt(OUVE["sigma_min"] ** 2 * np.expm1(2 * (th + lg) * s) * np.exp(-2 * th * s)
                * lg / (th + lg))
  z = (logits[noised] - mean) / std
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05


def test_estimate_conditions_on_the_stop_gradient_logit_estimate():
  """The image recipe: the signal net sees standardize(l0_hat) of the logit net, and the signal
  loss sends no gradient into the logit branch."""
  calls = {}
  sde = sde_lib.get_sde("vp_discrete", N=10)
  loss_fn, _ = _stub_loss(sde, sde, calls)
  loss_fn(PARAMS, KEY)
  l_t, t_l, out = calls["logits"][0][:3]
  l0_hat = sde.x0_from_score(l_t, sde.score_from_output(out, t_l, "eps"), t_l)
  np.testing.assert_allclose(calls["signal"][1], standardize_logits(l0_hat, STD), atol=1e-6)
  grads, _ = jax.grad(loss_fn, has_aux=True)(PARAMS, KEY)
  assert float(grads["logits"]["w"]) == 0.0
  assert float(grads["signal"]["v"]) != 0.0   # the logits do enter the signal loss


@pytest.mark.parametrize("signal_sde,logits_sde", [
    (sde_lib.get_sde("vp_discrete", N=10), sde_lib.get_sde("vp_discrete", N=10)),
    (sde_lib.get_sde("ouve", **OUVE), sde_lib.get_sde("ouve", **OUVE)),
])
def test_logit_term_sees_the_signal_estimate_below_the_switch(signal_sde, logits_sde):
  """signal_cond='estimate': the logit net's loss pass, at the signal's own time and with the
  same noise, is conditioned per example on the signal's clipped stop-gradient x0_hat and
  f(x0_hat) below the switch fraction, on y and f(y) above; no gradient from the logit loss
  reaches the signal net."""
  calls = {}
  loss_fn, x0 = _stub_loss(signal_sde, logits_sde, calls, signal_switch_t=0.3,
                           x0_range=(-1.0, 1.0))
  loss_fn(PARAMS, KEY)
  (l_t1, t1, _, f_y, y), (l_t2, t2, _, f_c, c) = calls["logits"]
  t_x, _, x_t, out = calls["signal"]
  np.testing.assert_array_equal(t1, t_x)
  np.testing.assert_array_equal(t2, t_x)
  x0_hat = np.clip(signal_sde.x0_from_score(
      x_t, signal_sde.score_from_output(out, t_x, "eps"), t_x, y), -1.0, 1.0)
  # The sampler (N = 10, switch_t = 0.3) conditions on x0_hat at its steps 7, 8, 9 (coupled_test
  # checks index 7); training does at times nearer those steps than step 6 (DDPM: t = 2, 1, 0).
  ts = signal_sde.timesteps()
  below = np.asarray(t_x) < (ts[6] + ts[7]) / 2
  assert 0.15 < below.mean() < 0.45
  if isinstance(signal_sde, sde_lib.VPDiscrete):
    assert set(np.asarray(t_x)[below].tolist()) == {0.0, 1.0, 2.0}
  np.testing.assert_allclose(c[below], x0_hat[below], atol=1e-5)
  np.testing.assert_array_equal(c[~below], y[~below])
  np.testing.assert_allclose(f_c[below], standardize_logits(x0_hat[below], STD), atol=1e-5)
  np.testing.assert_array_equal(f_c[~below], f_y[~below])
  if not logits_sde.reverts_to_y:   # DDPM: the same l_t; OUVE: its mean moves to f(c)
    np.testing.assert_array_equal(l_t1, l_t2)
  only_logits = lambda p, k: loss_fn(p, k)[1]["logits_loss"]
  grads = jax.grad(only_logits)(PARAMS, KEY)
  assert float(grads["signal"]["w"]) == float(grads["signal"]["v"]) == 0.0
  assert float(grads["logits"]["w"]) != 0.0


def test_joint_loss_weighs_each_branch_eps_loss():
  """loss = w_x L_x + w_l L_l, L_x = mean |eps_hat - z|^2 of the signal net, z recovered from its
  input x_t through the DDPM marginal (likewise L_l of the logit net, l0 = f(x0) standardised)."""
  calls = {}
  sde = sde_lib.get_sde("vp_discrete", N=10)
  loss_fn, x0 = _stub_loss(sde, sde, calls, weights=(2.0, 3.0), signal_cond="observation")
  loss, metrics = loss_fn(PARAMS, KEY)

  def eps_loss(target, x_t, t, out):
    a = np.sqrt(np.asarray(sde.alphas_cumprod)[np.asarray(t, int)])[:, None]
    z = (np.asarray(x_t) - a * np.asarray(target)) / np.sqrt(1 - a ** 2)
    return np.mean((np.asarray(out) - z) ** 2)
  t, _, x_t, out = calls["signal"]
  np.testing.assert_allclose(metrics["signal_loss"], eps_loss(x0, x_t, t, out), rtol=1e-4)
  (l_t, t_l, out_l, _, _), = calls["logits"]
  l0 = standardize_logits(x0, STD)
  np.testing.assert_allclose(metrics["logits_loss"], eps_loss(l0, l_t, t_l, out_l), rtol=1e-4)
  np.testing.assert_allclose(
      loss, 2.0 * metrics["signal_loss"] + 3.0 * metrics["logits_loss"], rtol=1e-6)
  assert float(metrics["loss"]) == float(loss)
  # ... and so are the gradients (the signal term sends none into the logit branch).
  grad = lambda term: jax.grad(lambda p: term(*loss_fn(p, KEY)))(PARAMS)
  total = grad(lambda loss, m: loss)
  for branch, w in (("signal", 2.0), ("logits", 3.0)):
    own = grad(lambda loss, m, b=branch: m[f"{b}_loss"])[branch]["w"]
    np.testing.assert_allclose(total[branch]["w"], w * own, rtol=1e-5)
    assert float(own) != 0.0


def test_observation_keeps_the_pretraining_conditioning():
  calls = {}
  sde = sde_lib.get_sde("vp_discrete", N=10)
  loss_fn, x0 = _stub_loss(sde, sde, calls, signal_cond="observation")
  loss_fn(PARAMS, KEY)
  (_, _, _, f_c, c), = calls["logits"]
  np.testing.assert_array_equal(c, x0 + 0.5)


@pytest.mark.parametrize("field,value,allowed", [
    ("logits_cond", "clean", "'estimate', 'noised_clean'"),
    ("signal_cond", "noisy", "'observation', 'estimate'"),
])
def test_unknown_conditioning_is_a_clear_error(field, value, allowed):
  sde = sde_lib.get_sde("vp_discrete", N=10)
  loss_fn, _ = _stub_loss(sde, sde, {}, **{field: value})
  with pytest.raises(ValueError, match=f"'{value}'; use one of {allowed}"):
    loss_fn(PARAMS, KEY)


def test_configs_pick_the_recipe():
  assert default.get_config().train.joint_signal_cond == "estimate"
  assert default.get_config().train.joint_logits_cond == "estimate"
  assert speech_commands.get_config().train.joint_logits_cond == "noised_clean"


class TinyNet(nn.Module):
  """net(first, *rest, train) -> [B, num_outputs] (0: the shape of `first`): one Dense layer over
  all the flattened inputs, standing in for every network of a trainer."""
  num_outputs: int = 0

  @nn.compact
  def __call__(self, first, *rest, train=False):
    b = first.shape[0]
    h = jnp.concatenate([jnp.reshape(x, (b, -1)) for x in (first,) + rest], -1)
    return nn.Dense(self.num_outputs or first[0].size)(h).reshape(
        (b, self.num_outputs) if self.num_outputs else first.shape)


def _joint_steps(tmp_path, monkeypatch, lr_scales=None, plain_optimizer=False):
  """Three steps of `TRAINERS["joint"]` (noised_clean; one-layer networks, so that compiling
  takes seconds), `train.joint_lr_scales` = lr_scales when given: (initial params, final
  params), asserting finite losses. plain_optimizer: `make_optimizer` without per-branch rates."""
  config = tiny_config()
  config.update_from_flattened_dict({"mesh.data": 1, "train.joint_logits_cond": "noised_clean"})
  if lr_scales is not None:
    config.train.joint_lr_scales = lr_scales
  k = config.data.num_classes
  monkeypatch.setattr(train.nets, "get_network", lambda name, **kwargs: TinyNet(
      k if name == config.classifier.net else 0))
  images = np.random.default_rng(0).uniform(-1, 1, (3, 16, 8, 8, 1)).astype(np.float32)
  key = jax.random.key(0, impl="rbg")   # XLA:CPU compiles threefry random bits slowly
  clf_params = TinyNet(k).init(key, images[0, :1])["params"]
  config.checkpoint.classifier = str(tmp_path / "classifier")
  checkpoint.save_classifier(config.checkpoint.classifier, clf_params, 0.1, config)

  trainer = train.TRAINERS.get("joint")(config)
  params = jax.device_get(trainer.init_params(key, {"image": images[0, :1]}))
  optimizer = train.make_optimizer(config.optim, trainer.num_steps,
                                   None if plain_optimizer else trainer.lr_scales)
  mesh = parallel.make_mesh(config)
  state = parallel.replicate(train.TrainState.create(params, optimizer, key), mesh)
  step = train.make_train_step(trainer.loss_fn, optimizer, config, mesh)
  frozen = parallel.replicate(trainer.frozen, mesh)
  for batch in images:
    state, metrics = step(state, parallel.global_batch({"image": batch}, mesh), frozen)
    assert all(np.isfinite(float(metrics[m])) for m in ("loss", "signal_loss", "logits_loss"))
  return params, jax.device_get(state.params)


def test_joint_trainer_steps_update_both_branches(tmp_path, monkeypatch):
  """Both branches' parameters move; with the default per-branch rates (1, 1) the optimizer is
  the plain one, bit for bit."""
  params, new = _joint_steps(tmp_path, monkeypatch)
  for branch in ("signal", "logits"):
    assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(params[branch]),
                                                     jax.tree.leaves(new[branch]))), branch
  _, plain = _joint_steps(tmp_path, monkeypatch, plain_optimizer=True)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)


def test_joint_lr_scales_per_branch(tmp_path, monkeypatch):
  """A branch at rate factor 0 stays exactly as it started while the other learns; factors for
  other keys, or negative ones, are a clear error."""
  params, new = _joint_steps(tmp_path, monkeypatch, dict(signal=1.0, logits=0.0))
  for a, b in zip(jax.tree.leaves(params["logits"]), jax.tree.leaves(new["logits"])):
    np.testing.assert_array_equal(a, b)
  assert not np.allclose(params["signal"]["Dense_0"]["kernel"], new["signal"]["Dense_0"]["kernel"])
  for bad in (dict(signal=1.0), dict(signal=1.0, logit=0.1), dict(signal=1.0, logits=-0.1)):
    config = tiny_config()
    config.train.joint_lr_scales = bad
    with pytest.raises(ValueError, match="train.joint_lr_scales"):
      train._joint_lr_scales(config)
