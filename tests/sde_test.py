"""SDE marginals against Monte-Carlo simulation of the forward processes, and closed forms."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import sde as sde_lib

NUM_PATHS = 20000


def _check_moments(samples, mean, std, rtol_std=0.03):
  """Sample moments of [P, D] samples equal (mean [D], std) within Monte-Carlo error."""
  samples = np.asarray(samples, np.float64)
  se = np.maximum(std, 1e-6) / math.sqrt(samples.shape[0])
  np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * se + 1e-6)
  np.testing.assert_allclose(samples.std(0), np.broadcast_to(std, samples.shape[1:]), rtol=rtol_std, atol=1e-5)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_vp_discrete_chain_matches_closed_form(schedule):
  sde = sde_lib.get_sde("vp_discrete", N=150, schedule=schedule)
  x0 = jnp.array([1.0, -0.5, 0.0])
  betas = sde.betas

  def step(x, inputs):
    key, beta = inputs
    x = jnp.sqrt(1 - beta) * x + jnp.sqrt(beta) * jax.random.normal(key, x.shape)
    return x, x

  keys = jax.random.split(jax.random.PRNGKey(0), sde.N)
  _, xs = jax.lax.scan(step, jnp.broadcast_to(x0, (NUM_PATHS, 3)), (keys, betas))
  for t in [0, 10, 75, 149]:
    mean, std = sde.marginal(x0[None], jnp.array([float(t)]))
    _check_moments(xs[t], np.asarray(mean[0]), float(std[0]))


def test_vp_discrete_cosine_schedule_values():
  sde = sde_lib.get_sde("vp_discrete", N=150, schedule="cosine")
  abar = np.asarray(sde.alphas_cumprod)
  assert np.all(np.diff(abar) < 0)
  assert float(sde.betas.max()) <= np.float32(0.999)
  # Closed form of Nichol & Dhariwal's cosine schedule away from the clipped end.
  f = lambda t: math.cos((t / 150 + 0.008) / 1.008 * math.pi / 2) ** 2
  np.testing.assert_allclose(abar[74], f(75) / f(0), rtol=1e-5)
  assert abar[-1] < 1e-4
  a, std = sde.coeffs(jnp.array(-1.0))
  assert float(a) == 1.0 and float(std) == 0.0


def _euler_maruyama_forward(sde, x0, y, t_end, num_steps, key):
  dt = t_end / num_steps

  def step(x, inputs):
    i, k = inputs
    t = jnp.full((x.shape[0],), i * dt)
    drift = sde.drift(x, t, y)
    g = sde_lib.bcast(sde.diffusion(t), x)
    return x + drift * dt + g * math.sqrt(dt) * jax.random.normal(k, x.shape, x.dtype), None

  keys = jax.random.split(key, num_steps)
  x, _ = jax.lax.scan(step, x0, (jnp.arange(num_steps), keys))
  return x


@pytest.mark.optimized   # 1000 Euler-Maruyama steps
@pytest.mark.parametrize("name,kwargs,t_end", [
    ("ouve", {}, 0.5), ("ouve", {}, 1.0), ("ve", dict(sigma_min=0.01, sigma_max=5.0), 0.7)])
def test_continuous_marginals_match_simulation(name, kwargs, t_end):
  with jax.enable_x64(True):
    sde = sde_lib.get_sde(name, **kwargs)
    x0 = jnp.broadcast_to(jnp.array([0.8, -0.3], jnp.float64), (NUM_PATHS, 2))
    y = jnp.broadcast_to(jnp.array([0.1, 0.4], jnp.float64), (NUM_PATHS, 2))
    xt = _euler_maruyama_forward(sde, x0, y, t_end, 1000, jax.random.PRNGKey(1))
    mean, std = sde.marginal(x0[:1], jnp.array([t_end]), y[:1])
    _check_moments(xt, np.asarray(mean[0]), float(std[0]))


def test_ouve_closed_forms():
  sde = sde_lib.get_sde("ouve")
  assert (sde.theta, sde.sigma_min, sde.sigma_max, sde.t_eps, sde.N) == (1.5, 0.05, 0.5, 0.03, 30)
  x0, y, t = jnp.array([[2.0, -1.0]]), jnp.array([[0.5, 0.5]]), jnp.array([0.4])
  mean, std = sde.marginal(x0, t, y)
  np.testing.assert_allclose(mean, y + (x0 - y) * np.exp(-1.5 * 0.4), rtol=1e-6)
  # SGMSE+'s _std, written out independently.
  logsig = math.log(10.0)
  var = 0.05**2 * math.exp(-2 * 1.5 * 0.4) * (math.exp(2 * (1.5 + logsig) * 0.4) - 1) * logsig / (1.5 + logsig)
  np.testing.assert_allclose(std, [math.sqrt(var)], rtol=1e-5)
  np.testing.assert_allclose(sde.diffusion(jnp.array(0.4)), 0.05 * 10**0.4 * math.sqrt(2 * logsig), rtol=1e-6)


@pytest.mark.parametrize("name", ["vp_discrete", "ve", "ouve"])
def test_tweedie_inverts_the_marginal(name):
  sde = sde_lib.get_sde(name)
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(2), 3)
  x0, y, z = (jax.random.normal(k, (4, 3, 5)) for k in (k1, k2, k3))
  t = sde.sample_time(jax.random.PRNGKey(3), (4,))
  mean, std = sde.marginal(x0, t, y)
  x = mean + sde_lib.bcast(std, z) * z
  score = sde.score_from_eps(z, t)
  np.testing.assert_allclose(sde.x0_from_score(x, score, t, y), x0, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(sde.eps_from_score(score, t), z, rtol=1e-5, atol=1e-6)


def test_prior_sample_moments():
  y = jnp.full((NUM_PATHS, 2), 0.3)
  ouve = sde_lib.get_sde("ouve")
  _check_moments(ouve.prior_sample(jax.random.PRNGKey(0), y.shape, y), np.full(2, 0.3), float(ouve.coeffs(1.0)[1]))
  vp = sde_lib.get_sde("vp_discrete")
  _check_moments(vp.prior_sample(jax.random.PRNGKey(1), (NUM_PATHS, 2)), np.zeros(2), 1.0)
  with pytest.raises(ValueError, match="pass y"):
    ouve.prior_sample(jax.random.PRNGKey(0), (2, 2))


def test_complex_noise_has_unit_power():
  z = sde_lib.normal(jax.random.PRNGKey(0), (100000,), jnp.complex64)
  assert z.dtype == jnp.complex64
  np.testing.assert_allclose(np.mean(np.abs(z) ** 2), 1.0, rtol=0.02)
  np.testing.assert_allclose(np.var(z.real), 0.5, rtol=0.02)
  # Circular: independent real and imaginary parts, so E z^2 = E zr^2 - E zi^2 + 2i E zr zi = 0.
  assert abs(np.mean(z**2)) < 0.02   # 4 standard errors


def test_sde_is_a_hashable_static_pytree():
  sde = sde_lib.get_sde("vp_discrete", N=10)
  assert jax.tree_util.tree_leaves(sde) == []
  assert hash(sde) == hash(sde_lib.get_sde("vp_discrete", N=10))
  np.testing.assert_allclose(jax.jit(lambda s: s.coeffs(3.0)[0])(sde), sde.coeffs(3.0)[0])


def test_unknown_names_list_the_known_ones():
  with pytest.raises(KeyError, match="Known: ouve, ve, vp_discrete"):
    sde_lib.get_sde("vp_continuous")
  with pytest.raises(KeyError, match="Did you mean 'ouve'"):
    sde_lib.get_sde("ouv")
  with pytest.raises(ValueError, match="schedule"):
    sde_lib.get_sde("vp_discrete", schedule="quadratic")


def test_switch_step_boundary_is_halfway_to_the_previous_step():
  """Joint training uses x0_hat conditioning at times nearer a sampler step after the switch."""
  vp = sde_lib.get_sde("vp_discrete", N=150)
  assert vp.switch_step(0.5) == (75, 74.5)   # DDPM: t <= 74 (t < T/2), steps 75..149
  ouve = sde_lib.get_sde("ouve", N=10, t_eps=0.03)   # grid 1, 0.892, ..., 0.138, 0.03, 0
  i, t_b = ouve.switch_step(0.1)
  assert i == 9 and t_b == pytest.approx((0.03 + 0.03 + 0.97 / 9) / 2)
  assert vp.switch_step(1.0) == (0, float("inf")) and vp.switch_step(0.0)[1] == -0.5
  # The nearest step, not a truncation: 10 (1 - 0.24) = 7.6 and 10 (1 - 0.9) = 0.99999...
  assert ouve.switch_step(0.24)[0] == 8 and ouve.switch_step(0.9)[0] == 1


def test_linear_schedule_is_rescaled_to_n_steps():
  """iDDPM's linear schedule at N steps: betas from 1e-4 to 0.02, both times 1000 / N."""
  sde = sde_lib.get_sde("vp_discrete", N=150, schedule="linear")
  np.testing.assert_allclose(sde.betas, np.linspace(1e-4, 0.02, 150) * 1000 / 150, rtol=1e-6)


@pytest.mark.parametrize("t", [149, 3])
def test_vp_discretize_is_the_exact_ddpm_transition(t):
  """f = (sqrt(1 - beta_t) - 1) x, G = sqrt(beta_t): exact also where beta_t is large (the
  cosine schedule's last step, clipped at 0.999, where 1 - beta / 2 would be 0.5, not 0.03)."""
  sde = sde_lib.get_sde("vp_discrete", N=150)
  beta = np.float64(sde.betas[t])
  x = jnp.linspace(-2.0, 2.0, 8).reshape(2, 4)
  f, g = sde.discretize(x, jnp.full((2,), float(t)))
  np.testing.assert_allclose(f, (np.sqrt(1 - beta) - 1) * np.asarray(x), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g, np.full(2, np.sqrt(beta)), rtol=1e-6)
  assert (beta > 0.9) == (t == 149)


def test_ve_marginal_std_closed_form():
  """VE: std(t) = sqrt(sigma(t)^2 - sigma_min^2), zero at t = 0 (score_sde: sigma(t))."""
  sde = sde_lib.get_sde("ve", sigma_min=1.0, sigma_max=2.0)
  np.testing.assert_allclose([float(sde.coeffs(t)[1]) for t in (0.0, 0.5, 1.0)],
                             [0.0, 1.0, math.sqrt(3.0)], rtol=1e-6, atol=1e-7)


def test_training_times_cover_the_sampling_range():
  """sample_time is uniform over the times the sampler visits: DDPM's step indices 0..N-1 (the
  grid less its final -1), each 1/N of the draws; a continuous SDE's [t_eps, T]."""
  n = 20000
  vp = sde_lib.get_sde("vp_discrete", N=10)
  t = np.asarray(vp.sample_time(jax.random.PRNGKey(0), (n,)))
  assert set(t.tolist()) == set(vp.timesteps()[:-1].tolist())
  np.testing.assert_allclose(np.bincount(t.astype(int)) / n, 0.1, atol=5 * math.sqrt(0.09 / n))
  for name, kwargs, lo, hi in [("ve", dict(t_eps=0.2), 0.2, 1.0),
                               ("ouve", dict(t_eps=0.1, T=0.6), 0.1, 0.6)]:
    t = np.asarray(sde_lib.get_sde(name, **kwargs).sample_time(jax.random.PRNGKey(1), (n,)))
    # n uniform draws come within (hi - lo) * 25 / n of either end with probability 1 - e^-25.
    assert lo <= t.min() < lo + 1e-3 and hi - 1e-3 < t.max() <= hi, (name, t.min(), t.max())
    assert abs(t.mean() - (lo + hi) / 2) < 5 * (hi - lo) / math.sqrt(12 * n)


def test_complex_prior_sample_has_complex_noise():
  """OUVE on a complex y (spectrograms): x_T = y + std(T) z with complex z, E|z|^2 = 1, so the
  real and imaginary parts each have variance std(T)^2 / 2."""
  sde = sde_lib.get_sde("ouve")
  y = jnp.full((NUM_PATHS, 2), 0.3 - 0.2j, jnp.complex64)
  x = np.asarray(sde.prior_sample(jax.random.PRNGKey(0), y.shape, y))
  assert x.dtype == np.complex64
  std = float(sde.coeffs(1.0)[1])
  _check_moments(x.real, np.full(2, 0.3), std / math.sqrt(2))
  _check_moments(x.imag, np.full(2, -0.2), std / math.sqrt(2))
