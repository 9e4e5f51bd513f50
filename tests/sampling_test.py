"""Samplers against the analytic score of Gaussian data, determinism, and trace counts."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import sampling
from cdjax import sde as sde_lib

# 64 dimensions: four (mean, std) pairs, each repeated 16 times (Langevin's norms need dims).
DATA_MEAN = jnp.tile(jnp.array([1.0, -0.5, 0.3, 0.0]), 16)
DATA_STD = jnp.tile(jnp.array([0.5, 0.3, 1.0, 0.2]), 16)
Y = jnp.tile(jnp.array([0.2, 0.2, -0.4, 0.5]), 16)   # the observation OUVE reverts to
NUM, DIM = 1000, 64


def _moments(x):
  """Per-pair mean and std of samples x [NUM, DIM], pooling the 16 copies of each pair."""
  x = np.asarray(x).reshape(NUM * 16, 4)
  return x.mean(0), x.std(0)


def gaussian_score(sde, y=None):
  """Exact score of x_t when x0 ~ N(DATA_MEAN, diag(DATA_STD^2))."""
  def score_fn(x, t):
    a, std = sde.coeffs(t)
    mean = sde_lib.bcast(a, x) * DATA_MEAN + sde.mean_shift(a, y)
    var = sde_lib.bcast(a, x) ** 2 * DATA_STD**2 + sde_lib.bcast(std, x) ** 2
    return -(x - mean) / var
  return score_fn


def exact_x_T(sde, key, y):
  """A draw from the exact marginal at the start of the grid (isolates sampler error)."""
  t0 = jnp.full((NUM,), sde.timesteps()[0])
  mean, std = sde.marginal(jnp.broadcast_to(DATA_MEAN, (NUM, DIM)), t0, y)
  a = sde_lib.bcast(sde.coeffs(t0)[0], mean)
  z = jax.random.normal(key, (NUM, DIM))
  return mean + jnp.sqrt(a**2 * DATA_STD**2 + sde_lib.bcast(std, z) ** 2) * z


SDES = {
    "vp_discrete": dict(N=200),
    "ve": dict(sigma_min=0.01, sigma_max=2.0, N=1000),
    "ouve": dict(N=100),
}
PREDICTORS = ["euler_maruyama", "reverse_diffusion", "ancestral", "ddim"]
CORRECTORS = [("none", 0.0), ("langevin", 0.05), ("annealed_langevin", 0.16)]


@functools.lru_cache(maxsize=None)
def _run(sde_name, predictor, corrector, snr):
  sde = sde_lib.get_sde(sde_name, **SDES[sde_name])
  y = jnp.broadcast_to(Y, (NUM, DIM)) if sde.reverts_to_y else None
  step = sampling.get_step_fn(sde, predictor, corrector, snr=snr, n_corrector=1)
  run = jax.jit(lambda key, x: sampling.sample(step, sde, gaussian_score(sde, y), key, x, y)[0])
  x_init = exact_x_T(sde, jax.random.PRNGKey(0), y)
  return np.asarray(run(jax.random.PRNGKey(1), x_init))


@pytest.mark.optimized   # 24 x 1000-step samplers of 1000 x 64 states
@pytest.mark.parametrize("corrector,snr", CORRECTORS)
@pytest.mark.parametrize("predictor", PREDICTORS)
@pytest.mark.parametrize("sde_name", list(SDES))
def test_recovers_gaussian_data(sde_name, predictor, corrector, snr):
  mean, std = _moments(_run(sde_name, predictor, corrector, snr))
  # Monte-Carlo error of the mean is <= 0.008 (1.0 / sqrt(16000)); the rest is discretisation.
  np.testing.assert_allclose(mean, DATA_MEAN[:4], atol=0.04)
  np.testing.assert_allclose(std, DATA_STD[:4], rtol=0.08)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_probability_flow_ode_recovers_gaussian_data(sde_name):
  """The deterministic probability-flow ODE (Euler steps) carries the exact marginal at t = T to
  the data's moments, without noise: the same start gives the same samples for any key."""
  x0 = _run(sde_name, "probability_flow", "none", 0.0)
  mean, std = _moments(x0)
  np.testing.assert_allclose(mean, DATA_MEAN[:4], atol=0.04)
  np.testing.assert_allclose(std, DATA_STD[:4], rtol=0.08)
  sde = sde_lib.get_sde(sde_name, **SDES[sde_name])
  y = jnp.broadcast_to(Y, (NUM, DIM)) if sde.reverts_to_y else None
  step = sampling.get_step_fn(sde, "probability_flow", "none")
  x_init = exact_x_T(sde, jax.random.PRNGKey(0), y)
  other_key = sampling.sample(step, sde, gaussian_score(sde, y), jax.random.PRNGKey(7), x_init, y)[0]
  np.testing.assert_allclose(np.asarray(other_key), x0, atol=1e-5)


def test_posterior_mean_keeps_the_mean_and_shrinks_the_spread():
  """The official "DDIM" flag (noise dropped) is not a sampler of the data: it under-disperses."""
  mean, std = _moments(_run("vp_discrete", "posterior_mean", "none", 0.0))
  np.testing.assert_allclose(mean, DATA_MEAN[:4], atol=0.04)
  assert np.all(std < 0.8 * np.asarray(DATA_STD[:4]))


def test_ddim_eta0_is_deterministic():
  sde = sde_lib.get_sde("vp_discrete", N=50)
  step = sampling.get_step_fn(sde, "ddim", predictor_kwargs=dict(eta=0.0))
  x_init = exact_x_T(sde, jax.random.PRNGKey(0), None)
  run = jax.jit(lambda key: sampling.sample(step, sde, gaussian_score(sde), key, x_init)[0])
  np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(2)))
  ancestral = sampling.get_step_fn(sde, "ancestral")
  run_anc = jax.jit(lambda key: sampling.sample(ancestral, sde, gaussian_score(sde), key, x_init)[0])
  assert not np.allclose(run_anc(jax.random.PRNGKey(1)), run_anc(jax.random.PRNGKey(2)))
  np.testing.assert_array_equal(run_anc(jax.random.PRNGKey(1)), run_anc(jax.random.PRNGKey(1)))


@pytest.mark.parametrize("num_steps", [5, 40])
def test_score_fn_is_traced_once_per_compilation(num_steps):
  traces = []
  sde = sde_lib.get_sde("ouve", N=num_steps)
  exact = gaussian_score(sde, None)

  def score_fn(x, t):
    traces.append(1)   # runs at trace time only
    return exact(x, t)

  sampler = sampling.get_sampling_fn(sde, (8, DIM), predictor="reverse_diffusion",
                                     corrector="annealed_langevin", snr=0.5, n_corrector=2)
  y = jnp.zeros((8, DIM))
  x, traj = jax.jit(lambda key: sampler(score_fn, key, y, return_trajectory=True))(jax.random.PRNGKey(0))
  assert len(traces) == 2   # once in the corrector's loop body, once for the predictor
  assert x.shape == (8, DIM) and traj.shape == (num_steps, 8, DIM)
  assert sampler.nfe == 3 * num_steps


def test_x0_transform_bounds_the_returned_estimates():
  sde = sde_lib.get_sde("vp_discrete", N=20)
  sampler = sampling.get_sampling_fn(sde, (64, DIM), predictor="ancestral",
                                     x0_transform=lambda x0: jnp.clip(x0, -0.25, 0.25))
  x, traj = jax.jit(lambda k: sampler(gaussian_score(sde), k, return_trajectory=True))(jax.random.PRNGKey(0))
  assert float(jnp.abs(traj).max()) <= 0.25
  assert float(jnp.abs(x).max()) <= 0.25 + 1e-6   # the last step lands on x0_hat


def test_complex_states_work_with_ouve():
  sde = sde_lib.get_sde("ouve", N=10)
  y = (jnp.ones((2, 3, 4)) * (0.3 + 0.2j)).astype(jnp.complex64)
  sampler = sampling.get_sampling_fn(sde, y.shape, predictor="reverse_diffusion",
                                     corrector="annealed_langevin", snr=0.5)
  x, _ = jax.jit(lambda k: sampler(lambda x, t: -(x - y) / sde_lib.bcast(sde.coeffs(t)[1] ** 2, x), k, y))(
      jax.random.PRNGKey(0))
  assert x.dtype == jnp.complex64
  np.testing.assert_allclose(x, y, atol=0.05)


def test_unknown_predictor_and_corrector():
  sde = sde_lib.get_sde("ve")
  with pytest.raises(KeyError, match="Known: ancestral, ddim, euler_maruyama, posterior_mean, "
                     "probability_flow, reverse_diffusion"):
    sampling.get_step_fn(sde, "heun")
  with pytest.raises(KeyError, match="Known: annealed_langevin, langevin, none"):
    sampling.get_step_fn(sde, "ddim", "ald")


@pytest.mark.parametrize("sde_name,alpha", [("vp_discrete", lambda sde, t: 1 - float(sde.betas[t])),
                                            ("ouve", lambda sde, t: 1.0)])
def test_langevin_step_size_is_score_sdes(sde_name, alpha):
  """eps = 2 alpha_t (snr ||z|| / ||score||)^2 with score_sde's alpha_t: 1 - beta_t for DDPM (at
  the cosine schedule's last step 0.001: a thousand times smaller than without it), else 1."""
  sde = sde_lib.get_sde(sde_name, N=10)
  t = float(sde.timesteps()[0])
  score = jnp.full((2, 4), 0.5)   # ||score|| = 1 = ||z|| / 2 per example
  _, x_mean = sampling.CORRECTORS.get("langevin")(sde, jax.random.PRNGKey(0), jnp.zeros((2, 4)),
                                                   jnp.full((2,), t), None, lambda x, t: score, 0.1, 1)
  eps = 2 * alpha(sde, int(t)) * (0.1 * 2.0) ** 2
  np.testing.assert_allclose(x_mean, eps * score, rtol=1e-5)


def test_annealed_langevin_step_is_sgmses():
  """SGMSE+'s `ald`: x_mean = x + eps score and x = x_mean + sqrt(2 eps) z, eps = 2 (snr std(t))^2.
  (The moment checks above cannot see eps: exact-score Langevin keeps the marginal at any step.)"""
  sde = sde_lib.get_sde("ouve", N=10)
  t = jnp.full((2,), 0.6)
  eps = 2 * (0.5 * float(sde.coeffs(t)[1][0])) ** 2
  x, x_mean = sampling.CORRECTORS.get("annealed_langevin")(
      sde, jax.random.PRNGKey(0), jnp.ones((2, 50_000)), t, None, lambda x, t: jnp.full_like(x, 0.5),
      0.5, 1)
  np.testing.assert_allclose(x_mean, 1 + eps * 0.5, rtol=1e-6)
  np.testing.assert_allclose(np.std(x - x_mean), np.sqrt(2 * eps), rtol=0.01)


def test_langevin_corrector_steps_draw_independent_noise():
  """With a zero score, n corrector steps are a random walk: x - x_init ~ N(0, 2 eps n), each
  step's noise independent of the earlier ones (x_mean is the state before the last noise)."""
  sde = sde_lib.get_sde("ouve", N=10)
  t = jnp.full((2,), 0.6)
  eps = 2 * (0.5 * float(sde.coeffs(t)[1][0])) ** 2
  x_init = jnp.ones((2, 50_000))
  x, x_mean = sampling.CORRECTORS.get("annealed_langevin")(
      sde, jax.random.PRNGKey(0), x_init, t, None, lambda x, t: jnp.zeros_like(x), 0.5, 3)
  last, earlier = np.asarray(x - x_mean).ravel(), np.asarray(x_mean - x_init).ravel()
  np.testing.assert_allclose(np.std(last), np.sqrt(2 * eps), rtol=0.02)
  np.testing.assert_allclose(np.std(earlier), np.sqrt(2 * eps * 2), rtol=0.02)
  assert abs(np.corrcoef(last, earlier)[0, 1]) < 0.02


def test_step_runs_the_predictor_from_the_correctors_output():
  """One PC step: the corrector at t (first key), then the predictor from the corrected state
  (second key), with Tweedie's x0_hat at the corrected state. (The moment checks cannot see a
  dropped corrector: the exact-score predictor alone already gets the marginals right.)"""
  sde = sde_lib.get_sde("ouve", N=10)
  y = jnp.broadcast_to(Y, (2, DIM))
  score_fn = gaussian_score(sde, y)
  x = y + jax.random.normal(jax.random.PRNGKey(3), (2, DIM))
  key = jax.random.PRNGKey(4)
  t, t_next = (float(s) for s in sde.timesteps()[2:4])
  step = sampling.get_step_fn(sde, "reverse_diffusion", "annealed_langevin", snr=0.5)
  out = step(key, x, t, t_next, score_fn, y)

  k_corr, k_pred = jax.random.split(key)
  t_b, t_next_b = jnp.full((2,), t), jnp.full((2,), t_next)
  corrected = sampling.annealed_langevin(sde, k_corr, x, t_b, y, score_fn, 0.5, 1)[0]
  score = score_fn(corrected, t_b)
  x0_hat = sde.x0_from_score(corrected, score, t_b, y)
  x_next, x_mean = sampling.reverse_diffusion(sde, k_pred, corrected, t_b, t_next_b, score,
                                              x0_hat, y)
  for got, want in ((out.x, x_next), (out.x_mean, x_mean), (out.x0_hat, x0_hat)):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(corrected - x)).min() > 0   # the corrector did move every element


@pytest.mark.parametrize("t", [5, 0])
def test_ancestral_step_is_the_ddpm_posterior(t):
  """DDPM t -> t-1 (Ho et al. eqs. 6-7): mean sqrt(abar_{t-1}) beta_t / (1 - abar_t) x0_hat
  + sqrt(1 - beta_t) (1 - abar_{t-1}) / (1 - abar_t) x_t, noise std
  sqrt(beta_t (1 - abar_{t-1}) / (1 - abar_t)) (abar_{-1} = 1: x0_hat itself at the last step);
  posterior_mean is that mean without the noise."""
  sde = sde_lib.get_sde("vp_discrete", N=10)
  beta, abar = (np.asarray(a, np.float64) for a in (sde.betas, sde.alphas_cumprod))
  abar_prev = abar[t - 1] if t > 0 else 1.0
  x = jax.random.normal(jax.random.PRNGKey(0), (2, DIM))
  x0_hat = jax.random.normal(jax.random.PRNGKey(1), (2, DIM))
  key = jax.random.PRNGKey(2)
  args = (sde, key, x, jnp.full((2,), float(t)), jnp.full((2,), t - 1.0), None, x0_hat, None)
  x_next, x_mean = sampling.PREDICTORS.get("ancestral")(*args)
  mean = (np.sqrt(abar_prev) * beta[t] / (1 - abar[t]) * np.asarray(x0_hat, np.float64)
          + np.sqrt(1 - beta[t]) * (1 - abar_prev) / (1 - abar[t]) * np.asarray(x, np.float64))
  std = np.sqrt(beta[t] * (1 - abar_prev) / (1 - abar[t]))
  np.testing.assert_allclose(x_mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_next - x_mean, std * sde_lib.normal(key, x.shape, x.dtype),
                             rtol=1e-3, atol=1e-5)
  assert (std > 0.05) == (t > 0)
  np.testing.assert_array_equal(sampling.PREDICTORS.get("posterior_mean")(*args),
                                (x_mean, x_mean))


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_keeps_the_noise_direction_and_adds_eta_times_the_posterior_std(eta):
  """OUVE (mean a x0 + (1 - a) y): from x_t = a_t x0 + (1 - a_t) y + std_t eps with x0_hat = x0,
  a DDIM step lands on a_s x0 + (1 - a_s) y + sqrt(std_s^2 - sigma^2) eps + sigma z, sigma = eta
  times the std of q(x_s | x_t, x0): 1 / sigma_post^2 = 1 / std_s^2 + (a_t/a_s)^2 / v, with
  v = std_t^2 - (a_t/a_s)^2 std_s^2 the variance of x_t | x_s."""
  sde = sde_lib.get_sde("ouve", N=10)
  t, s = (float(v) for v in sde.timesteps()[2:4])
  (a_t, std_t), (a_s, std_s) = (np.asarray(sde.coeffs(jnp.float32(v)), np.float64) for v in (t, s))
  x0, eps, y = (jax.random.normal(jax.random.PRNGKey(i), (2, DIM)) for i in range(3))
  x = a_t * x0 + (1 - a_t) * y + std_t * eps
  key = jax.random.PRNGKey(3)
  x_next, x_mean = sampling.PREDICTORS.get("ddim")(
      sde, key, x, jnp.full((2,), t), jnp.full((2,), s), None, x0, y, eta=eta)
  a_ts = a_t / a_s
  sigma = eta / np.sqrt(1 / std_s**2 + a_ts**2 / (std_t**2 - a_ts**2 * std_s**2))
  x0, eps, y = (np.asarray(v, np.float64) for v in (x0, eps, y))
  np.testing.assert_allclose(x_mean, a_s * x0 + (1 - a_s) * y + np.sqrt(std_s**2 - sigma**2) * eps,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_next - x_mean, sigma * sde_lib.normal(key, x.shape, x.dtype),
                             rtol=1e-3, atol=1e-5)
  assert (sigma > 0.1 * std_s) == (eta > 0)


def test_sample_returns_the_last_steps_mean_and_every_x0_hat():
  """sample() chains each step's noisy state into the next and returns the last step's mean."""
  step = lambda key, x, t, t_next, score_fn, y: sampling.StepOutput(x + 100, x + 1, x)
  sde = sde_lib.get_sde("vp_discrete", N=4)   # 4 steps: t = 3, 2, 1, 0
  x, traj = sampling.sample(step, sde, None, jax.random.PRNGKey(0), jnp.zeros((1, 2)),
                            return_trajectory=True)
  np.testing.assert_array_equal(x, [[301.0, 301.0]])
  np.testing.assert_array_equal(traj[:, 0, 0], [0.0, 100.0, 200.0, 300.0])
