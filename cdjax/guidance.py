"""Optional gradient guidance through the frozen classifier (scale 0 = off = the official method).

Both terms are added to a branch's score:
- signal: `s_x * grad_x0 sum_c w_c log softmax(f(x0_hat))_c`, with class weights
  `w = softmax(l0_hat / tau)` from the logit branch, added to the score of x_t as it is: the
  gradient at the Tweedie estimate x0_hat, with d x0_hat / d x_t taken as the identity. The true
  Jacobian is (a / std^2) Cov[x0 | x_t]: about I / a(t) at low noise, tending to 0 as a(t) -> 0.
  Dropping only the score network's part of it would leave I / a(t), which grows without bound
  at high noise (about 500 / 3000 at t = T of the 25- / 150-step cosine schedules). For complex
  x0_hat (speech spectrograms) the term is (d/dRe + i d/dIm) / 2, half the conjugate of what
  `jax.grad` returns: the convention of the SDEs' complex scores (noise with E|z|^2 = 1, so
  log N(m, s^2) has score -(x - m) / s^2), so that s_x = 1 adds log p(c | x0)'s score;
- logits: `s_l * grad_l0 [-0.5 ||l0_hat - f(x0_hat)||^2] = s_l (f(x0_hat) - l0_hat)`, pulling the
  logit branch toward what the classifier says of the signal branch's estimate.
"""
import jax
import jax.numpy as jnp


def signal_guidance(classify, x0_hat, l0_hat, scale: float, temperature: float):
  """Guidance term [B, ...] for the signal score; `classify(x) -> logits [B, K]`."""
  weights = jax.nn.softmax(jax.lax.stop_gradient(l0_hat) / temperature, axis=-1)

  def log_likelihood(x):
    return jnp.sum(weights * jax.nn.log_softmax(classify(x), axis=-1))

  grad = jax.grad(log_likelihood)(x0_hat)
  return scale * (jnp.conj(grad) / 2 if jnp.iscomplexobj(grad) else grad)


def logits_guidance(l0_hat, classifier_logits, scale: float):
  """Guidance term [B, K] for the logit score, toward `classifier_logits = f(x0_hat)`."""
  target = jax.lax.stop_gradient(classifier_logits)
  return scale * jax.grad(lambda l: -0.5 * jnp.sum((l - target) ** 2))(l0_hat)
