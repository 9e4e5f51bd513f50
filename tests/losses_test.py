"""The denoising-score-matching loss against a network that knows the answer: the true noise (or
score) gives loss 0 and x0_hat = x0; a zero output gives the closed-form loss of each
parameterization."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import losses
from cdjax import sde as sde_lib


@pytest.mark.parametrize("name, parameterization, dtype, zero_loss", [
    ("vp_discrete", "eps", jnp.float32, lambda d: 1.0),              # mean |z|^2, E|z|^2 = 1
    ("ouve", "neg_score", jnp.complex64, lambda d: 0.5 * d),        # 0.5 sum |z|^2 per item
])
def test_denoising_loss_of_a_perfect_and_of_a_zero_network(name, parameterization, dtype,
                                                            zero_loss):
  sde = sde_lib.get_sde(name)
  shape = (8, 32, 32)
  x0 = sde_lib.normal(jax.random.PRNGKey(1), shape, dtype)
  y = x0 + 0.5 * sde_lib.normal(jax.random.PRNGKey(2), shape, dtype)

  def perfect(params, x_t, t, rng):
    """The output that makes the score exact: eps = (x_t - mean) / std, or -score = eps / std."""
    mean, std = sde.marginal(x0, t, y)
    eps = (x_t - mean) / sde_lib.bcast(std, x_t)
    return eps if parameterization == "eps" else eps / sde_lib.bcast(std, x_t)

  key = jax.random.PRNGKey(0)
  loss, x0_hat = losses.denoise(perfect, None, sde, parameterization, key, None, x0, y, ())
  assert float(loss) < 1e-8
  np.testing.assert_allclose(np.asarray(x0_hat), np.asarray(x0), atol=2e-4)

  zero = lambda params, x_t, t, rng: jnp.zeros_like(x_t)
  loss, _ = losses.denoise(zero, None, sde, parameterization, key, None, x0, y, ())
  expected = zero_loss(32 * 32)
  assert abs(float(loss) - expected) < 0.07 * expected     # 4 sigma of 8 x 1024 draws of |z|^2


def test_logit_loss_denoises_standardised_classifier_logits_toward_f_y():
  """logits_loss's targets, by hand: l0 = f(x0) and the OU prior mean f(y), each re-standardised
  per sample to mean 0 and std `std` (here f = 2 x + 1, so raw logits would not do), the net
  conditioned on (f(y), y). A net that knows exactly those targets has loss 0 and agrees with
  l0 on every argmax."""
  sde = sde_lib.get_sde("ouve", theta=1.5, sigma_min=0.05, sigma_max=0.5, N=10, t_eps=0.03)
  std, shape = 0.8, (256, 10)
  x0 = jax.random.normal(jax.random.PRNGKey(1), shape)
  y = x0 + 0.5 * jax.random.normal(jax.random.PRNGKey(2), shape) + 3.0
  st = lambda v: std * (v - v.mean(-1, keepdims=True)) / (v.std(-1, keepdims=True) + 1e-6)
  l0, f_y = st(2 * x0 + 1), st(2 * y + 1)

  def perfect(params, l_t, t, f_c, c, rng):
    np.testing.assert_allclose(f_c, f_y, atol=1e-5)
    np.testing.assert_array_equal(c, y)
    mean, sd = sde.marginal(l0, t, f_y)
    return (l_t - mean) / sde_lib.bcast(sd, l_t)

  loss, metrics = losses.logits_loss(
      None, {"classifier": None}, {"x": x0, "y": y}, jax.random.PRNGKey(0), apply=perfect,
      sde=sde, observe=lambda k, b: (b["x"], b["y"]), classify=lambda p, x: 2 * x + 1, std=std)
  assert float(loss) < 1e-8
  assert float(metrics["l0_hat_agreement"]) == 1.0
