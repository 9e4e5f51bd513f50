"""Predictors, correctors and the compiled predictor-corrector sampler.

A predictor is `fn(sde, key, x, t, t_next, score, x0_hat, y, **kwargs) -> (x_next, x_next_mean)`;
a corrector is `fn(sde, key, x, t, y, score_fn, snr, n_steps) -> (x, x_mean)`, where
`score_fn(x, t) -> score` and `t` is per-example [B]. Both live in registries, so a new one is
one decorated function. `get_step_fn` composes one PC step; `sample` runs all steps as one
`jax.lax.scan` (per-step keys `fold_in(key, i)`), meant to be called inside a single `jax.jit`.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from cdjax import sde as sde_lib
from cdjax.registry import Registry
from cdjax.sde import bcast

PREDICTORS = Registry("predictor")
CORRECTORS = Registry("corrector")


# ---- predictors --------------------------------------------------------------------------------
@PREDICTORS.register("euler_maruyama")
def euler_maruyama(sde, key, x, t, t_next, score, x0_hat, y, probability_flow: bool = False):
  """x_{t-dt} = x - [f - g^2 score] dt + g sqrt(dt) z; with `probability_flow`, an Euler step
  of the probability-flow ODE, x - [f - g^2 score / 2] dt (score_sde's flag)."""
  del x0_hat
  dt = bcast(t - t_next, x)
  rsde = sde.reverse(lambda *_: score, probability_flow)
  x_mean = x - rsde.drift(x, t, y) * dt
  noise = bcast(rsde.diffusion(t), x) * jnp.sqrt(dt) * sde_lib.normal(key, x.shape, x.dtype)
  return x_mean + noise, x_mean


PREDICTORS.register("probability_flow")(functools.partial(euler_maruyama, probability_flow=True))


@PREDICTORS.register("reverse_diffusion")
def reverse_diffusion(sde, key, x, t, t_next, score, x0_hat, y):
  """Reverse of the SDE's own discretisation: x_mean = x - f + G^2 score; x = x_mean + G z."""
  del x0_hat
  rev_f, rev_g = sde.reverse(lambda *_: score).discretize(x, t, y, t - t_next)
  x_mean = x - rev_f
  return x_mean + bcast(rev_g, x) * sde_lib.normal(key, x.shape, x.dtype), x_mean


@PREDICTORS.register("ddim")
def ddim(sde, key, x, t, t_next, score, x0_hat, y, eta: float = 0.0, noise: bool = True):
  """Generalised DDIM step on the affine marginals: with u = x - (1 - a) y,
  u_s = a_s x0_hat + sqrt(std_s^2 - sigma^2) eps_hat + sigma z, eps_hat = (u_t - a_t x0_hat) / std_t,
  sigma^2 = eta^2 * posterior variance. eta = 1 is the DDPM posterior q(x_s | x_t, x0_hat).
  """
  del score
  a_t, std_t = sde.coeffs(t)
  a_s, std_s = sde.coeffs(t_next)
  eps_hat = (x - sde.mean_shift(a_t, y) - bcast(a_t, x) * x0_hat) / bcast(std_t, x)
  a_ts = a_t / a_s
  post_var = (std_t**2 - a_ts**2 * std_s**2) * std_s**2 / std_t**2
  sigma = eta * jnp.sqrt(jnp.maximum(post_var, 0.0))
  x_mean = (bcast(a_s, x) * x0_hat + sde.mean_shift(a_s, y)
            + bcast(jnp.sqrt(jnp.maximum(std_s**2 - sigma**2, 0.0)), x) * eps_hat)
  if not noise:
    return x_mean, x_mean
  return x_mean + bcast(sigma, x) * sde_lib.normal(key, x.shape, x.dtype), x_mean


PREDICTORS.register("ancestral")(functools.partial(ddim, eta=1.0))
# The official code's "DDIM" flag: the posterior mean of q(x_s | x_t, x0_hat), noise dropped.
PREDICTORS.register("posterior_mean")(functools.partial(ddim, eta=1.0, noise=False))


# ---- correctors --------------------------------------------------------------------------------
@CORRECTORS.register("none")
def no_corrector(sde, key, x, t, y, score_fn, snr, n_steps):
  return x, x


def _langevin(step_size_fn, sde, key, x, t, y, score_fn, snr, n_steps):
  """n_steps of x <- x + eps score + sqrt(2 eps) z, with eps = step_size_fn(x, score)."""
  def body(i, carry):
    x, _ = carry
    score = score_fn(x, t)
    step = bcast(step_size_fn(x, score), x)
    x_mean = x + step * score
    return x_mean + jnp.sqrt(2 * step) * sde_lib.normal(jax.random.fold_in(key, i), x.shape, x.dtype), x_mean
  return jax.lax.fori_loop(0, n_steps, body, (x, x))


@CORRECTORS.register("langevin")
def langevin(sde, key, x, t, y, score_fn, snr, n_steps):
  """score_sde's Langevin corrector: eps = 2 alpha_t (snr ||z|| / ||score||)^2, norms per
  example, alpha_t = `sde.langevin_alpha(t)` (DDPM: 1 - beta_t, else 1)."""
  def step_size(x, score):
    norm = lambda v: jnp.sqrt(jnp.sum(jnp.abs(v.reshape(v.shape[0], -1)) ** 2, axis=-1))
    return 2 * sde.langevin_alpha(t) * (snr * jnp.sqrt(x[0].size) / norm(score)) ** 2
  return _langevin(step_size, sde, key, x, t, y, score_fn, snr, n_steps)


@CORRECTORS.register("annealed_langevin")
def annealed_langevin(sde, key, x, t, y, score_fn, snr, n_steps):
  """SGMSE+'s annealed Langevin dynamics: eps = 2 (snr std(t))^2."""
  std = sde.coeffs(t)[1]
  return _langevin(lambda x, score: 2 * (snr * std) ** 2, sde, key, x, t, y, score_fn, snr, n_steps)


# ---- the sampler -------------------------------------------------------------------------------
class StepOutput(NamedTuple):
  x: jax.Array        # next state, noise included
  x_mean: jax.Array   # next state without the last noise
  x0_hat: jax.Array   # clean estimate at the current step


def get_step_fn(sde, predictor: str = "reverse_diffusion", corrector: str = "none",
                snr: float = 0.16, n_corrector: int = 1, x0_transform=None,
                predictor_kwargs=None) -> Callable:
  """One PC step `step(key, x, t, t_next, score_fn, y=None) -> StepOutput` (t scalars).

  The corrector runs first at t (as in score_sde and SGMSE+), then the predictor from t to
  t_next. `x0_transform` (e.g. `clip(-1, 1)` for images, per-sample standardisation for
  logits) maps the Tweedie estimate used by the x0-based predictors and returned for coupling.
  `step.nfe` is the number of score evaluations per step.
  """
  predictor_fn = functools.partial(PREDICTORS.get(predictor), **dict(predictor_kwargs or {}))
  corrector_fn = CORRECTORS.get(corrector)

  def step(key, x, t, t_next, score_fn, y=None) -> StepOutput:
    k_corr, k_pred = jax.random.split(key)
    t_b = jnp.full((x.shape[0],), t, jnp.float32)
    t_next_b = jnp.full((x.shape[0],), t_next, jnp.float32)
    x, _ = corrector_fn(sde, k_corr, x, t_b, y, score_fn, snr, n_corrector)
    score = score_fn(x, t_b)
    x0_hat = sde.x0_from_score(x, score, t_b, y)
    if x0_transform is not None:
      x0_hat = x0_transform(x0_hat)
    x_next, x_mean = predictor_fn(sde, k_pred, x, t_b, t_next_b, score, x0_hat, y)
    return StepOutput(x_next, x_mean, x0_hat)

  step.nfe = 1 + (0 if corrector == "none" else n_corrector)
  return step


def sample(step_fn, sde, score_fn, key, x_init, y=None, return_trajectory: bool = False):
  """Runs every step of `sde.timesteps()` as one scan from `x_init` [B, ...].

  Returns (x_final_mean, trajectory), the trajectory being the clean estimates x0_hat
  [N, B, ...] (or None). The final state is the last step's mean (noise dropped).
  """
  ts = sde.timesteps()

  def body(carry, inputs):
    x, _ = carry
    i, t, t_next = inputs
    out = step_fn(jax.random.fold_in(key, i), x, t, t_next, score_fn, y)
    return (out.x, out.x_mean), (out.x0_hat if return_trajectory else None)

  steps = (jnp.arange(len(ts) - 1), ts[:-1], ts[1:])
  (_, x_mean), traj = jax.lax.scan(body, (x_init, x_init), steps)
  return x_mean, traj


def get_sampling_fn(sde, shape, **step_kwargs) -> Callable:
  """`sampler(score_fn, key, y=None, return_trajectory=False) -> (x0, trajectory)` from the prior.

  `shape` is the batch shape [B, ...]; `step_kwargs` go to `get_step_fn`.
  """
  step_fn = get_step_fn(sde, **step_kwargs)

  def sampler(score_fn, key, y=None, return_trajectory=False):
    k_prior, k_steps = jax.random.split(key)
    x_init = sde.prior_sample(k_prior, shape, y)
    return sample(step_fn, sde, score_fn, k_steps, x_init, y, return_trajectory)

  sampler.nfe = step_fn.nfe * sde.N
  return sampler
