"""Corruptions `(key, clean) -> degraded`: pure, batched, jit-able JAX functions, built by name.

Images are float32 in [-1, 1], [B, H, W, C]; audio is float32 [B, L]. The item at batch
position i draws its randomness from `fold_in(key, i)`, so one key degrades a given batch the
same way every time (every method in a comparison sees the same degraded inputs).
`get_corruption(name, **kwargs)` builds one; `CORRUPTIONS` lists them.
"""
import inspect
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cdjax.data.pipeline import load_split
from cdjax.registry import Registry

Corruption = Callable[[jax.Array, jax.Array], jax.Array]
CORRUPTIONS = Registry("corruption")   # name -> factory(**kwargs) -> Corruption
Range = float | Sequence[float]        # a value, or (low, high) drawn uniformly per item


def get_corruption(name: str, **kwargs) -> Corruption:
  """The corruption `name` with its parameters, e.g. `get_corruption("gn_replace", p=0.3)`."""
  return CORRUPTIONS.get(name)(**kwargs)


def corruption_from_config(config: ml_collections.ConfigDict, split: str) -> Corruption:
  """The corruption of `config.corruption`; noise corruptions get the clips of `split` of
  `config.corruption.noise_dataset` (in `config.data.data_dir`) as float32 [N, Ln], and
  reverberation `config.audio.sample_rate` unless its kwargs name a sample_rate."""
  c = config.corruption
  kwargs = dict(c.kwargs)
  parameters = inspect.signature(CORRUPTIONS.get(c.name)).parameters
  if "noise" in parameters:
    kwargs["noise"] = load_split(c.noise_dataset, split, config.data.data_dir)["audio"]
  if "sample_rate" in parameters:
    kwargs.setdefault("sample_rate", config.audio.sample_rate)
  return get_corruption(c.name, **kwargs)


def clean_gain_from_config(config: ml_collections.ConfigDict) -> float:
  """The gain of the clean signal in the output of `config.corruption`: the direct-path tap of
  the reverberant corruptions' unit-energy RIRs (`direct_path_gain`), else 1. The noisy signal
  minus this times the clean one is what the corruption added (reverberant tail, noise)."""
  c = config.corruption
  parameters = inspect.signature(CORRUPTIONS.get(c.name)).parameters
  if "drr_db" not in parameters:
    return 1.0
  return direct_path_gain(dict(c.kwargs).get("drr_db", parameters["drr_db"].default))


def _per_item(fn: Callable[[jax.Array, jax.Array], jax.Array]) -> Corruption:
  """Lifts fn(key, x) on one item to a jitted batch function, item i using fold_in(key, i)."""
  @jax.jit
  def batched(key, clean):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(clean.shape[0]))
    return jax.vmap(fn)(keys, clean)
  return batched


def _check(name: str, value: Range, low: float, high: float = np.inf, ranged: bool = False):
  """Raises if value (or, when `ranged`, both ends of a (low, high) pair) is outside [low, high]."""
  ends = np.atleast_1d(np.asarray(value, np.float64))
  if (ends.size not in ((1, 2) if ranged else (1,)) or ends[0] > ends[-1]
      or not np.all((low <= ends) & (ends <= high))):
    what = "a number or an increasing (low, high) pair" if ranged else "a number"
    raise ValueError(f"{name} must be {what} in [{low}, {high}], got {value!r}.")


def _draw(key: jax.Array, value: Range) -> jax.Array:
  """value itself, or a uniform draw from the (low, high) range."""
  ends = np.atleast_1d(np.asarray(value, np.float32))
  if ends.size == 1:
    return jnp.asarray(ends[0])
  return jax.random.uniform(key, (), minval=ends[0], maxval=ends[1])


# --- images: [B, H, W, C] in [-1, 1] ---


@CORRUPTIONS.register("gn_replace")
def gn_replace(p: float) -> Corruption:
  """The paper's "p% GN": each element independently (prob. p) replaced by N(0, 1); no clip."""
  _check("gn_replace p", p, 0.0, 1.0)

  def one(key, x):
    k_mask, k_noise = jax.random.split(key)
    mask = jax.random.bernoulli(k_mask, p, x.shape)
    return jnp.where(mask, jax.random.normal(k_noise, x.shape, x.dtype), x)
  return _per_item(one)


@CORRUPTIONS.register("gaussian")
def gaussian(sigma: float) -> Corruption:
  """Additive white Gaussian noise of std sigma; no clip."""
  _check("gaussian sigma", sigma, 0.0)
  return _per_item(lambda key, x: x + sigma * jax.random.normal(key, x.shape, x.dtype))


@CORRUPTIONS.register("salt_pepper")
def salt_pepper(p: float) -> Corruption:
  """Each element independently (prob. p) set to -1 or 1 with equal chance."""
  _check("salt_pepper p", p, 0.0, 1.0)

  def one(key, x):
    k_mask, k_sign = jax.random.split(key)
    mask = jax.random.bernoulli(k_mask, p, x.shape)
    salt = jnp.where(jax.random.bernoulli(k_sign, 0.5, x.shape), 1.0, -1.0).astype(x.dtype)
    return jnp.where(mask, salt, x)
  return _per_item(one)


@CORRUPTIONS.register("blur")
def blur(sigma: float, size: int = 5) -> Corruption:
  """Gaussian blur (std sigma pixels, odd kernel `size`), per channel, edges replicated."""
  _check("blur sigma", sigma, 1e-6)
  if size < 1 or size % 2 == 0:
    raise ValueError(f"blur size must be a positive odd kernel width, got {size}.")
  offsets = np.arange(size) - size // 2
  kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
  kernel = jnp.asarray(kernel / kernel.sum(), jnp.float32)

  def one(key, x):   # x: [H, W, C]
    del key
    h, w = x.shape[:2]
    r = size // 2
    x = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    x = sum(kernel[i] * x[i:i + h] for i in range(size))
    return sum(kernel[i] * x[:, i:i + w] for i in range(size))
  return _per_item(one)


# --- audio: [B, L] ---


def direct_path_gain(drr_db: float) -> float:
  """Tap 0 of `room_impulse_response` at direct-to-reverberant ratio drr_db: 1 / sqrt(1 +
  10^(-drr_db / 10)) (unit energy)."""
  return float(1.0 / np.sqrt(1.0 + 10.0 ** (-drr_db / 10.0)))


def room_impulse_response(key: jax.Array, rt60: jax.Array, num_taps: int, drr_db: float,
                          sample_rate: int) -> jax.Array:
  """A synthetic RIR [num_taps] with unit energy: a direct path (tap 0) plus Gaussian noise
  whose energy decays by 60 dB in rt60 seconds, scaled to the direct-to-reverberant ratio."""
  t = jnp.arange(num_taps) / sample_rate
  tail = jax.random.normal(key, (num_taps,)) * 10.0 ** (-3.0 * t / rt60)
  tail = tail.at[0].set(0.0)
  tail = tail * jnp.sqrt(10.0 ** (-drr_db / 10.0) / jnp.sum(tail ** 2))
  h = tail.at[0].set(1.0)
  return h / jnp.linalg.norm(h)


@CORRUPTIONS.register("reverb")
def reverb(rt60: Range, drr_db: float = 0.0, sample_rate: int = 16000) -> Corruption:
  """Convolution with a synthetic RIR (see `room_impulse_response`); rt60 in seconds, a value
  or a (low, high) range drawn per item; output [B, L] keeps the first L samples."""
  _check("reverb rt60", rt60, 1e-3, ranged=True)
  num_taps = int(np.ceil(np.max(rt60) * sample_rate))

  def one(key, x):
    k_rt60, k_rir = jax.random.split(key)
    h = room_impulse_response(k_rir, _draw(k_rt60, rt60), num_taps, drr_db, sample_rate)
    n = x.shape[-1] + num_taps - 1
    return jnp.fft.irfft(jnp.fft.rfft(x, n) * jnp.fft.rfft(h, n), n)[:x.shape[-1]]
  return _per_item(one)


@CORRUPTIONS.register("add_noise")
def add_noise(snr_db: Range, noise: jax.typing.ArrayLike) -> Corruption:
  """Adds a random crop of a random clip of noise [N, Ln] (Ln >= L), scaled to exactly snr_db
  (a value, or a (low, high) range drawn per item) relative to the clean item."""
  _check("add_noise snr_db", snr_db, -np.inf, ranged=True)
  noise = jnp.asarray(noise, jnp.float32)
  if noise.ndim != 2 or noise.shape[0] == 0:
    raise ValueError(f"add_noise needs noise clips [N, Ln] with N >= 1, got shape {noise.shape}.")

  def one(key, x):
    k_clip, k_start, k_snr = jax.random.split(key, 3)
    clip = noise[jax.random.randint(k_clip, (), 0, noise.shape[0])]
    start = jax.random.randint(k_start, (), 0, noise.shape[1] - x.shape[-1] + 1)
    n = jax.lax.dynamic_slice(clip, (start,), (x.shape[-1],))
    gain = jnp.sqrt(jnp.sum(x ** 2) / jnp.maximum(jnp.sum(n ** 2), 1e-20)
                    * 10.0 ** (-_draw(k_snr, snr_db) / 10.0))
    return x + gain * n

  batched = _per_item(one)

  def fn(key, clean):
    if clean.shape[-1] > noise.shape[1]:
      raise ValueError(f"Noise clips have {noise.shape[1]} samples, fewer than the "
                       f"{clean.shape[-1]} of the clean audio; use longer noise clips.")
    return batched(key, clean)
  return fn


@CORRUPTIONS.register("noise_reverb")
def noise_reverb(rt60: Range, snr_db: Range, noise: jax.typing.ArrayLike, drr_db: float = 0.0,
                 sample_rate: int = 16000) -> Corruption:
  """`reverb`, then `add_noise` at snr_db relative to the reverberant signal."""
  reverberate = reverb(rt60, drr_db, sample_rate)
  add = add_noise(snr_db, noise)

  def fn(key, clean):
    k_reverb, k_noise = jax.random.split(key)
    return add(k_noise, reverberate(k_reverb, clean))
  return fn
