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


def test_signal_loss_conditions_on_y_the_batch_logits_and_the_enhancer_latent():
  """The signal net reads (y, logits[, latent]): zero logits [B, K] by default, batch["logits"]
  when the batch has them, and (Ex-Diff) latent(frozen["enhancer"], y)."""
  sde = sde_lib.get_sde("vp_discrete", N=10)
  x0 = jax.random.normal(jax.random.PRNGKey(1), (4, 6))
  y = x0 + 1.0
  seen = {}

  def apply(params, x_t, t, *cond):
    seen["cond"] = cond[:-1]   # the last input is the dropout key
    return jnp.zeros_like(x_t)

  def loss(batch, **kwargs):
    return losses.signal_loss(None, {"enhancer": 3.0}, batch, jax.random.PRNGKey(0), apply=apply,
                              sde=sde, observe=lambda k, b: (b["x"], b["x"] + 1.0), num_classes=5,
                              **kwargs)
  loss({"x": x0})
  c, logits = seen["cond"]
  np.testing.assert_array_equal(c, y)
  np.testing.assert_array_equal(logits, np.zeros((4, 5), np.float32))
  batch_logits = jnp.arange(20.0).reshape(4, 5)
  loss({"x": x0, "logits": batch_logits}, latent=lambda p, v: p * v[:, :2])
  c, logits, latent = seen["cond"]
  np.testing.assert_array_equal(c, y)
  np.testing.assert_array_equal(logits, batch_logits)
  np.testing.assert_array_equal(latent, 3.0 * y[:, :2])


def test_enhancer_loss_is_the_mean_squared_magnitude_of_the_complex_error():
  """enhancer_loss regresses net(y) onto x0: mean |x_hat - x0|^2 over all elements, complex
  errors by their squared magnitude (here x_hat = g y, g a parameter)."""
  key_x, key_n = jax.random.split(jax.random.PRNGKey(3))
  x0 = sde_lib.normal(key_x, (3, 4, 5), jnp.complex64)
  y = x0 + 0.7 * sde_lib.normal(key_n, (3, 4, 5), jnp.complex64)
  apply = lambda params, v, rng: (params["g"] * v, None)
  g = jnp.complex64(0.6 - 0.2j)
  loss, metrics = losses.enhancer_loss({"g": g}, None, {"x": x0, "y": y}, jax.random.PRNGKey(0),
                                       apply=apply, observe=lambda k, b: (b["x"], b["y"]))
  x, v = np.asarray(x0, np.complex128), np.asarray(y, np.complex128)
  err = complex(g) * v - x
  expected = np.mean(err.real ** 2 + err.imag ** 2)
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(metrics["loss"]) == float(loss)


def test_classifier_loss_is_the_cross_entropy_and_accuracy_of_the_logits():
  """Mean -log softmax(logits)[label] and the fraction of argmax hits, on fixed logits."""
  logits = jnp.array([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 2.0, 0.0]])
  labels = jnp.array([0, 1, 0, 0])   # hit, hit, miss, miss
  loss, metrics = losses.classifier_loss(
      None, None, {"image": logits, "label": labels}, jax.random.PRNGKey(0),
      apply=lambda params, x, rng: x)
  z = np.asarray(logits, np.float64)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  np.testing.assert_allclose(float(loss), -log_p[np.arange(4), labels].mean(), rtol=1e-6)
  assert float(metrics["accuracy"]) == 0.5 and float(metrics["loss"]) == float(loss)
