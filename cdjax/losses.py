"""One loss per trainer: `loss(params, frozen, batch, rng) -> (loss, metrics)` once its keyword
arguments (networks, SDE, observation model) are bound by `cdjax.train`.

- `params`: the trained parameters; `frozen`: never-updated inputs (`{"classifier": params}`);
  `batch`: a dict of `[B, ...]` arrays; `rng`: this step's key.
- Networks come as `apply(params, *inputs, rng) -> output` (training mode, `rng` for dropout);
  the frozen classifier as `classify(params, x) -> logits [B, K]` (inference mode, always).
- `observe(key, batch) -> (x0, y)`: the clean signal and its degraded observation, degraded
  inside the step with a key folded from the step's key.
Denoising outputs are parameterized as in `sde.score_from_output`: "eps" (loss: mean
|out - z|^2) or "neg_score" (SGMSE+, score = -out; loss: 0.5 sum |std score + z|^2 over non-batch
dims, mean over the batch).
"""
import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from cdjax import audio
from cdjax import sde as sde_lib
from cdjax.coupled import standardize_logits


def _batch_mean(per_element: jax.Array, reduce: Callable = jnp.mean) -> jax.Array:
  """`reduce` over the non-batch dims of [B, ...], then the mean over the batch."""
  return reduce(per_element.reshape(per_element.shape[0], -1), axis=1).mean()


def denoise(apply: Callable, params, sde: sde_lib.SDE, parameterization: str, key, rng_net,
            x0: jax.Array, y, cond: tuple, t: Optional[jax.Array] = None
            ) -> tuple[jax.Array, jax.Array]:
  """One denoising-score-matching term: x_t ~ p(x_t | x0, y) at times t [B] (default:
  t ~ sde.sample_time), the network `apply(params, x_t, t, *cond, rng_net)`, and its loss.
  Returns (loss, x0_hat [B, ...]), `x0_hat` the Tweedie estimate from the network's output."""
  k_t, k_z = jax.random.split(key)
  t = sde.sample_time(k_t, (x0.shape[0],)) if t is None else t
  mean, std = sde.marginal(x0, t, y)
  z = sde_lib.normal(k_z, x0.shape, x0.dtype)
  x_t = mean + sde_lib.bcast(std, x0) * z
  out = apply(params, x_t, t, *cond, rng_net)
  if parameterization == "eps":
    loss = _batch_mean(jnp.abs(out - z) ** 2)
  elif parameterization == "neg_score":
    loss = 0.5 * _batch_mean(jnp.abs(sde_lib.bcast(std, x0) * -out + z) ** 2, jnp.sum)
  else:
    raise ValueError(f"Unknown parameterization {parameterization!r}; use 'eps' or 'neg_score'.")
  x0_hat = sde.x0_from_score(x_t, sde.score_from_output(out, t, parameterization), t, y)
  return loss, x0_hat


def classifier_loss(params, frozen, batch, rng, *, apply: Callable, input_key: str = "image",
                    crop_samples: int = 0):
  """Cross-entropy of `apply(params, x, rng) -> logits [B, K]` on clean inputs; + accuracy.
  Audio with `crop_samples` > 0: on a random window of that many samples of each clip."""
  del frozen
  x = batch[input_key]
  if crop_samples > 0:
    k_crop, rng = jax.random.split(rng)
    x = audio.random_crop(k_crop, x, crop_samples)
  logits = apply(params, x, rng)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
  accuracy = (logits.argmax(-1) == batch["label"]).mean()
  return loss, {"loss": loss, "accuracy": accuracy}


def signal_loss(params, frozen, batch, rng, *, apply: Callable, sde: sde_lib.SDE,
                observe: Callable, num_classes: int, parameterization: str = "eps",
                latent: Optional[Callable] = None):
  """Signal-branch denoising loss: net(x_t, t, y, logits[, latent]), conditioned on the degraded
  y, on `batch["logits"]` [B, K] when given, else zero logits (pre-training), and (Ex-Diff) on
  `latent(frozen["enhancer"], y)`, a frozen enhancer's features."""
  k_obs, k_noise, k_net = jax.random.split(rng, 3)
  x0, y = observe(k_obs, batch)
  logits = batch.get("logits", jnp.zeros((x0.shape[0], num_classes), jnp.float32))
  cond = signal_conditioning(y, logits, latent, frozen)
  loss, _ = denoise(apply, params, sde, parameterization, k_noise, k_net, x0, y, cond)
  return loss, {"loss": loss}


def signal_conditioning(y, logits, latent: Optional[Callable], frozen) -> tuple:
  """The signal net's conditioning inputs: (y, logits), plus (Ex-Diff) the frozen enhancer's
  latent `latent(frozen["enhancer"], y)` when `latent` is given."""
  return (y, logits) if latent is None else (y, logits, latent(frozen["enhancer"], y))


def classifier_targets(classify: Callable, classifier_params, x0, y, std: float):
  """The logit branch's target l0 = f(x0) and conditioning f(y), both [B, K], standardised as in
  sampling (`coupled.standardize_logits`), without gradient into the frozen classifier."""
  l0, f_y = (standardize_logits(classify(classifier_params, x), std) for x in (x0, y))
  return jax.lax.stop_gradient(l0), jax.lax.stop_gradient(f_y)


def logits_loss(params, frozen, batch, rng, *, apply: Callable, sde: sde_lib.SDE,
                observe: Callable, classify: Callable, std: float,
                parameterization: str = "eps"):
  """Logit-branch denoising loss on l0 = f(x0) from the frozen classifier `frozen["classifier"]`:
  net(l_t, t, f(y), y), conditioned on the degraded y and f(y) (also the OU prior mean)."""
  k_obs, k_noise, k_net = jax.random.split(rng, 3)
  x0, y = observe(k_obs, batch)
  l0, f_y = classifier_targets(classify, frozen["classifier"], x0, y, std)
  loss, l0_hat = denoise(apply, params, sde, parameterization, k_noise, k_net, l0, f_y, (f_y, y))
  accuracy = (l0_hat.argmax(-1) == l0.argmax(-1)).mean()
  return loss, {"loss": loss, "l0_hat_agreement": accuracy}


def enhancer_loss(params, frozen, batch, rng, *, apply: Callable, observe: Callable):
  """Regression loss of a discriminative enhancer `apply(params, y, rng) -> (x_hat, latent)`:
  mean |x_hat - x0|^2 (complex spectrograms: squared magnitude of the complex error)."""
  del frozen
  k_obs, k_net = jax.random.split(rng)
  x0, y = observe(k_obs, batch)
  x_hat, _ = apply(params, y, k_net)
  loss = _batch_mean(jnp.abs(x_hat - x0) ** 2)
  return loss, {"loss": loss}


def _time_range(sde: sde_lib.SDE) -> tuple[float, float]:
  """(clean time, prior time): the ends of the SDE's sampling grid (DDPM: -1 and N - 1)."""
  ts = sde.timesteps()
  return float(ts[-1]), float(ts[0])


def time_fraction(sde: sde_lib.SDE, t: jax.Array) -> jax.Array:
  """t's fraction of the SDE's time range: 0 clean, 1 prior (`train.joint_switch_t`'s scale)."""
  clean, prior = _time_range(sde)
  return (t - clean) / (prior - clean)


def matched_time(t: jax.Array, from_sde: sde_lib.SDE, to_sde: sde_lib.SDE) -> jax.Array:
  """The time of `to_sde` at t's fraction of `from_sde`'s range; exactly t when the ranges match."""
  (c_f, p_f), (c_t, p_t) = _time_range(from_sde), _time_range(to_sde)
  return c_t + (t - c_f) * ((p_t - c_t) / (p_f - c_f))


def noised_clean_logits(key, signal_sde: sde_lib.SDE, logits_sde: sde_lib.SDE, t: jax.Array,
                        l0: jax.Array, f_y: jax.Array, switch_t: float) -> jax.Array:
  """The speech recipe's logit conditioning [B, K] of the signal net at its times t [B]: per
  example, a sample of the logit SDE's marginal p(l_s | l0, f(y)) at the matching time s when
  t's fraction of the signal's range is below `switch_t`, else f(y). l0, f_y: [B, K]."""
  mean, std = logits_sde.marginal(l0, matched_time(t, signal_sde, logits_sde), f_y)
  l_s = mean + sde_lib.bcast(std, l0) * sde_lib.normal(key, l0.shape, l0.dtype)
  return jnp.where(sde_lib.bcast(time_fraction(signal_sde, t) < switch_t, l0), l_s, f_y)


JOINT_LOGITS_CONDS = ("estimate", "noised_clean")
JOINT_SIGNAL_CONDS = ("observation", "estimate")


def _check_choice(value: str, allowed: tuple, field: str):
  if value not in allowed:
    raise ValueError(f"Unknown {field} {value!r}; use one of {', '.join(map(repr, allowed))}.")


def joint_loss(params, frozen, batch, rng, *, signal_apply: Callable, logits_apply: Callable,
               signal_sde: sde_lib.SDE, logits_sde: sde_lib.SDE, observe: Callable,
               classify: Callable, std: float, weights: dict,
               signal_parameterization: str = "eps", logits_parameterization: str = "eps",
               logits_cond: str = "estimate", switch_t: float = 0.5,
               signal_cond: str = "estimate", signal_switch_t: float = 0.5,
               x0_range: Optional[tuple] = None, latent: Optional[Callable] = None):
  """Joint training of `params = {"signal", "logits"}`, both branches at one time t [B] (the
  logit SDE's at the matching fraction), as in the Parallel sampler. Returns (loss, metrics).

  The signal term is conditioned, by `logits_cond`, on "estimate" (image Parallel recipe): the
  logit branch's stop-gradient l0_hat [B, K] from its observation-conditioned pass; or
  "noised_clean" (speech): the noised clean logits or f(y), by t (`noised_clean_logits`,
  `switch_t`). The logit term is conditioned, by `signal_cond`, on "observation": (f(y), y) as
  in pre-training; or "estimate": at times nearer a sampler step after its switch than one
  before it (`signal_sde.switch_step(signal_switch_t)`, the sampler's `switch_t`), the signal's
  stop-gradient x0_hat (clipped to `x0_range`) and f(x0_hat), as the sampler's logit branch sees
  them; else (f(y), y).
  Ex-Diff (`latent` given): the signal net also reads `latent(frozen["enhancer"], y)`.
  Loss: weights["signal"] L_x + weights["logits"] L_l."""
  _check_choice(logits_cond, JOINT_LOGITS_CONDS, "joint logits conditioning (train.joint_logits_cond)")
  _check_choice(signal_cond, JOINT_SIGNAL_CONDS, "joint signal conditioning (train.joint_signal_cond)")
  k_obs, k_l, k_x, k_lnet, k_xnet, k_cond = jax.random.split(rng, 6)
  k_t, k_z = jax.random.split(k_cond)
  x0, y = observe(k_obs, batch)
  l0, f_y = classifier_targets(classify, frozen["classifier"], x0, y, std)
  t_x = signal_sde.sample_time(k_t, (x0.shape[0],))
  t_l = matched_time(t_x, signal_sde, logits_sde)
  logits_term = functools.partial(denoise, logits_apply, params["logits"], logits_sde,
                                  logits_parameterization, k_l, k_lnet, l0, t=t_l)
  loss_l, l0_hat = logits_term(f_y, (f_y, y))
  if logits_cond == "estimate":
    logits = jax.lax.stop_gradient(standardize_logits(l0_hat, std))
  else:
    logits = noised_clean_logits(k_z, signal_sde, logits_sde, t_x, l0, f_y, switch_t)
  loss_x, x0_hat = denoise(signal_apply, params["signal"], signal_sde, signal_parameterization,
                           k_x, k_xnet, x0, y, signal_conditioning(y, logits, latent, frozen), t_x)
  if signal_cond == "estimate":
    x0_hat = jax.lax.stop_gradient(x0_hat if x0_range is None else jnp.clip(x0_hat, *x0_range))
    below = t_x < signal_sde.switch_step(signal_switch_t)[1]   # as the sampler's nearest step
    c = jnp.where(sde_lib.bcast(below, y), x0_hat, y)
    f_x0_hat = standardize_logits(classify(frozen["classifier"], x0_hat), std)
    f_c = jax.lax.stop_gradient(jnp.where(below[:, None], f_x0_hat, f_y))
    loss_l, _ = logits_term(f_c, (f_c, c))   # same l_t noise and t; replaces the pass above
  loss = weights["signal"] * loss_x + weights["logits"] * loss_l
  return loss, {"loss": loss, "signal_loss": loss_x, "logits_loss": loss_l}
