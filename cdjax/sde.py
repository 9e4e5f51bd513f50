"""SDEs with affine Gaussian marginals, registered by name.

Every SDE here has marginals `x_t = a(t) x0 + (1 - a(t)) y + std(t) z`, where `y` is the
observation the process reverts to (OUVE) and is absent (zero) for VP and VE. So one Tweedie
formula (`x0_from_score`) and one posterior (`sampling.ddim`) serve every SDE.

Times: continuous SDEs use t in [t_eps, T]; the discrete DDPM uses integer indices t in
{0, ..., N-1} (stored as float), with t = -1 meaning "clean" (a = 1, std = 0).
Arrays are batched `[B, ...]`; per-example times are `[B]` and are broadcast with `bcast`.
Complex arrays (speech spectrograms) get complex noise with E|z|^2 = 1, as in SGMSE+.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from cdjax.registry import Registry

SDES = Registry("SDE")


def get_sde(name: str, **kwargs) -> "SDE":
  """Builds the SDE registered as `name` with its fields `kwargs`."""
  return SDES.get(name)(**kwargs)


def bcast(v: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes per-example `v` [B] (or a scalar) to broadcast against `x` [B, ...]."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def normal(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """Standard normal noise; complex dtypes get independent real/imag parts with E|z|^2 = 1."""
  if jnp.issubdtype(dtype, jnp.complexfloating):
    real_dtype = jnp.finfo(dtype).dtype
    zr, zi = jax.random.normal(key, (2,) + tuple(shape), real_dtype)
    return ((zr + 1j * zi) / math.sqrt(2.0)).astype(dtype)
  return jax.random.normal(key, shape, dtype)


class SDE:
  """Base class: subclasses define `coeffs`, `drift`, `diffusion`, `timesteps`, `sample_time`."""

  N: int

  # ---- subclass interface ------------------------------------------------------------------
  def coeffs(self, t):
    """Returns (a(t), std(t)), each shaped like `t`, of the marginal x_t | x0, y."""
    raise NotImplementedError

  def drift(self, x, t, y=None):
    """Forward drift f(x, t) [B, ...]."""
    raise NotImplementedError

  def diffusion(self, t):
    """Forward diffusion coefficient g(t), shaped like `t`."""
    raise NotImplementedError

  def timesteps(self) -> np.ndarray:
    """Sampling grid [N + 1] (a constant): step i goes from timesteps[i] to timesteps[i + 1]."""
    raise NotImplementedError

  def sample_time(self, key, shape) -> jax.Array:
    """Training times, uniform over the SDE's time range."""
    raise NotImplementedError

  def switch_step(self, fraction: float) -> tuple[int, float]:
    """(i, t_b): the first of the last `fraction` of the N sampling steps, i = round(N (1 -
    fraction)), and the time halfway between its grid time and the previous step's (inf when
    i = 0): a training time t < t_b is nearer a step after the switch than one before it. The
    samplers' and joint training's `switch_t`."""
    i = int(round(self.N * (1.0 - fraction)))
    ts = self.timesteps()
    return i, (float("inf") if i == 0 else (float(ts[i - 1]) + float(ts[i])) / 2)

  def langevin_alpha(self, t):
    """score_sde's factor of the Langevin corrector's step size, shaped like `t`: 1 here."""
    return jnp.ones_like(jnp.asarray(t, jnp.float32))

  reverts_to_y = False   # True when the marginal mean moves toward the observation y

  def prior_mean(self, y=None, shape=None):
    """Mean of the prior at t = T: 0, or y for an SDE that reverts to y."""
    if self.reverts_to_y:
      if y is None:
        raise ValueError(f"{type(self).__name__} reverts to the observation y; pass y.")
      return y
    return jnp.zeros(shape)

  # ---- shared ------------------------------------------------------------------------------
  def mean_shift(self, a, y):
    """The observation's part (1 - a) y of the marginal mean (0 for SDEs that ignore y)."""
    if not self.reverts_to_y or y is None:
      return 0.0
    return bcast(1.0 - a, y) * y

  def marginal(self, x0, t, y=None):
    """Mean [B, ...] and std [B] of x_t given x0 [B, ...] (and y) at times t [B]."""
    a, std = self.coeffs(t)
    return bcast(a, x0) * x0 + self.mean_shift(a, y), std

  def prior_sample(self, key, shape, y=None, dtype=jnp.float32):
    """x_T = prior_mean + std(T) z."""
    dtype = dtype if y is None else y.dtype
    _, std = self.coeffs(self.timesteps()[0])
    return self.prior_mean(y, shape) + std * normal(key, shape, dtype)

  def x0_from_score(self, x, score, t, y=None):
    """Tweedie estimate E[x0 | x_t] from the score at (x, t): (x + std^2 score - (1-a) y) / a."""
    a, std = self.coeffs(t)
    return (x + bcast(std**2, x) * score - self.mean_shift(a, y)) / bcast(a, x)

  def score_from_eps(self, eps, t):
    """score = -eps / std(t)."""
    return -eps / bcast(self.coeffs(t)[1], eps)

  def eps_from_score(self, score, t):
    """eps = -std(t) * score."""
    return -bcast(self.coeffs(t)[1], score) * score

  def score_from_output(self, out, t, parameterization: str):
    """Converts a network output into a score: 'eps' (DDPM) or 'neg_score' (SGMSE+: -out)."""
    if parameterization == "eps":
      return self.score_from_eps(out, t)
    if parameterization == "neg_score":
      return -out
    raise ValueError(f"Unknown parameterization {parameterization!r}; use 'eps' or 'neg_score'.")

  def discretize(self, x, t, y=None, dt=None):
    """Euler discretisation of one forward step of size dt [B] (default T / N): (f dt, g sqrt(dt))."""
    dt = self.timesteps()[0] / self.N if dt is None else dt
    return self.drift(x, t, y) * bcast(dt, x), self.diffusion(t) * jnp.sqrt(dt)

  def reverse(self, score_fn, probability_flow: bool = False) -> "ReverseSDE":
    """The reverse-time SDE (or probability-flow ODE) for `score_fn(x, t, y) -> score`."""
    return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
  """dx = [f - g^2 score] dt + g dw-bar, run backwards in time (halved, noiseless for the ODE)."""

  def __init__(self, sde: SDE, score_fn, probability_flow: bool):
    self.sde, self.score_fn, self.probability_flow = sde, score_fn, probability_flow
    self.N = sde.N

  def drift(self, x, t, y=None):
    factor = 0.5 if self.probability_flow else 1.0
    g2 = bcast(self.sde.diffusion(t) ** 2, x)
    return self.sde.drift(x, t, y) - factor * g2 * self.score_fn(x, t, y)

  def diffusion(self, t):
    return jnp.zeros_like(self.sde.diffusion(t)) if self.probability_flow else self.sde.diffusion(t)

  def discretize(self, x, t, y=None, dt=None):
    """Reverse step of size dt: (f_rev, G_rev) so that x_{t-dt} = x - f_rev + G_rev z."""
    f, g = self.sde.discretize(x, t, y, dt)
    factor = 0.5 if self.probability_flow else 1.0
    rev_f = f - factor * bcast(g**2, x) * self.score_fn(x, t, y)
    return rev_f, jnp.zeros_like(g) if self.probability_flow else g


def _cosine_betas(N: int, s: float, max_beta: float) -> np.ndarray:
  steps = np.arange(N + 1, dtype=np.float64) / N
  abar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  return np.clip(1.0 - abar[1:] / abar[:-1], 0.0, max_beta)


def _linear_betas(N: int, beta_min: float, beta_max: float) -> np.ndarray:
  scale = 1000.0 / N   # keeps the schedule's total noise fixed when N changes (iDDPM)
  return np.linspace(scale * beta_min, scale * beta_max, N, dtype=np.float64)


@SDES.register("vp_discrete")
@struct.dataclass
class VPDiscrete(SDE):
  """DDPM: x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) z, t in {0..N-1}; abar_t = prod(1 - beta)."""
  N: int = struct.field(pytree_node=False, default=150)
  schedule: str = struct.field(pytree_node=False, default="cosine")
  cosine_s: float = struct.field(pytree_node=False, default=0.008)
  max_beta: float = struct.field(pytree_node=False, default=0.999)
  beta_min: float = struct.field(pytree_node=False, default=1e-4)
  beta_max: float = struct.field(pytree_node=False, default=0.02)

  def __post_init__(self):
    if self.schedule not in ("cosine", "linear"):
      raise ValueError(f"Unknown beta schedule {self.schedule!r}; use 'cosine' or 'linear'.")

  def _betas64(self) -> np.ndarray:
    if self.schedule == "cosine":
      return _cosine_betas(self.N, self.cosine_s, self.max_beta)
    return _linear_betas(self.N, self.beta_min, self.beta_max)

  @property
  def betas(self) -> jax.Array:
    """beta_t [N], computed in float64 (constants under jit)."""
    return jnp.asarray(self._betas64(), jnp.float32)

  @property
  def alphas_cumprod(self) -> jax.Array:
    """abar_t [N] = prod_{s <= t} (1 - beta_s), computed in float64."""
    return jnp.asarray(np.cumprod(1.0 - self._betas64()), jnp.float32)

  def _index(self, t):
    return jnp.clip(jnp.asarray(t).astype(jnp.int32), 0, self.N - 1)

  def langevin_alpha(self, t):
    """1 - beta_t (score_sde's VP factor of the Langevin step size)."""
    return 1.0 - self.betas[self._index(t)]

  def coeffs(self, t):
    t = jnp.asarray(t, jnp.float32)
    abar = jnp.where(t < 0, 1.0, self.alphas_cumprod[self._index(t)])
    return jnp.sqrt(abar), jnp.sqrt(1.0 - abar)

  def drift(self, x, t, y=None):
    return -0.5 * bcast(self.betas[self._index(t)], x) * x

  def diffusion(self, t):
    return jnp.sqrt(self.betas[self._index(t)])

  def discretize(self, x, t, y=None, dt=None):
    """The exact DDPM transition (score_sde): f = sqrt(1 - beta) x - x, G = sqrt(beta)."""
    beta = self.betas[self._index(t)]
    return bcast(jnp.sqrt(1.0 - beta), x) * x - x, jnp.sqrt(beta)

  def timesteps(self):
    return np.arange(self.N - 1, -2, -1, dtype=np.float32)

  def sample_time(self, key, shape):
    return jax.random.randint(key, shape, 0, self.N).astype(jnp.float32)


@SDES.register("ve")
@struct.dataclass
class VE(SDE):
  """score_sde VE: dx = sigma(t) sqrt(2 log(smax/smin)) dw, sigma(t) = smin (smax/smin)^t.

  The marginal std is the exact sqrt(sigma(t)^2 - sigma_min^2) (score_sde uses sigma(t)).
  """
  sigma_min: float = struct.field(pytree_node=False, default=0.01)
  sigma_max: float = struct.field(pytree_node=False, default=50.0)
  N: int = struct.field(pytree_node=False, default=1000)
  t_eps: float = struct.field(pytree_node=False, default=1e-5)

  def _sigma(self, t):
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** jnp.asarray(t, jnp.float32)

  def coeffs(self, t):
    std = jnp.sqrt(jnp.maximum(self._sigma(t) ** 2 - self.sigma_min**2, 0.0))
    return jnp.ones_like(std), std

  def drift(self, x, t, y=None):
    return jnp.zeros_like(x)

  def diffusion(self, t):
    return self._sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

  def timesteps(self):
    return np.append(np.linspace(1.0, self.t_eps, self.N), 0.0).astype(np.float32)

  def sample_time(self, key, shape):
    return jax.random.uniform(key, shape, minval=self.t_eps, maxval=1.0)


@SDES.register("ouve")
@struct.dataclass
class OUVE(SDE):
  """SGMSE+ OUVE: dx = theta (y - x) dt + g(t) dw, g(t) = smin (smax/smin)^t sqrt(2 log(smax/smin)).

  Mean y + (x0 - y) exp(-theta t); variance
  smin^2 (exp(2 (theta + L) t) - 1) exp(-2 theta t) L / (theta + L), with L = log(smax/smin).
  """
  theta: float = struct.field(pytree_node=False, default=1.5)
  sigma_min: float = struct.field(pytree_node=False, default=0.05)
  sigma_max: float = struct.field(pytree_node=False, default=0.5)
  N: int = struct.field(pytree_node=False, default=30)
  t_eps: float = struct.field(pytree_node=False, default=0.03)
  T: float = struct.field(pytree_node=False, default=1.0)
  reverts_to_y = True

  @property
  def _logsig(self):
    return math.log(self.sigma_max / self.sigma_min)

  def coeffs(self, t):
    t = jnp.asarray(t, jnp.float32)
    th, L = self.theta, self._logsig
    var = self.sigma_min**2 * jnp.expm1(2 * (th + L) * t) * jnp.exp(-2 * th * t) * L / (th + L)
    return jnp.exp(-th * t), jnp.sqrt(var)

  def drift(self, x, t, y=None):
    if y is None:
      raise ValueError("OUVE needs the observation y: its drift is theta * (y - x).")
    return self.theta * (y - x)

  def diffusion(self, t):
    t = jnp.asarray(t, jnp.float32)
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t * math.sqrt(2 * self._logsig)

  def timesteps(self):
    return np.append(np.linspace(self.T, self.t_eps, self.N), 0.0).astype(np.float32)

  def sample_time(self, key, shape):
    return jax.random.uniform(key, shape, minval=self.t_eps, maxval=self.T)
