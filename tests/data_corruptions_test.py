"""Corruptions: requested fractions and SNRs, RIR statistics, reproducibility per key, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
import scipy.signal

from cdjax.data import corruptions
from cdjax.data.corruptions import get_corruption
from configs import default

KEY = jax.random.key(0)


def _images(value=0.25, shape=(16, 32, 32, 3)):
  return jnp.full(shape, value, jnp.float32)


def _speech(batch=8, length=16000, seed=0):
  """Speech-like test signals [B, L]: amplitude-modulated tones plus a little noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(length) / 16000
  f0 = rng.uniform(100, 300, (batch, 1))
  x = np.sin(2 * np.pi * f0 * t) * (1 + np.sin(2 * np.pi * 3 * t))
  x += 0.01 * rng.normal(size=(batch, length))
  return jnp.asarray(x * rng.uniform(0.01, 1, (batch, 1)), jnp.float32)


def _snr_db(clean, noisy):
  clean, noisy = np.asarray(clean, np.float64), np.asarray(noisy, np.float64)
  return 10 * np.log10((clean ** 2).sum(-1) / ((noisy - clean) ** 2).sum(-1))


@pytest.mark.parametrize("p", [0.15, 0.3])
def test_gn_replace_fraction_and_values(p):
  x = _images()
  y = np.asarray(get_corruption("gn_replace", p=p)(KEY, x))
  replaced = y != 0.25
  assert abs(replaced.mean() - p) < 0.01            # 5 sigma over 49,152 elements
  # Every element on its own (C x H x W), not whole pixels: all 3 channels replaced w.p. p^3.
  assert abs(replaced.all(-1).mean() - p ** 3) < 0.01
  assert abs(y[replaced].mean()) < 0.03 and abs(y[replaced].std() - 1) < 0.03
  assert np.abs(y).max() > 3                        # N(0, 1) samples are not clipped


def test_gaussian_std():
  y = get_corruption("gaussian", sigma=0.2)(KEY, _images())
  assert abs(float(jnp.std(y - 0.25)) - 0.2) < 0.005


def test_salt_pepper_fraction_and_values():
  y = np.asarray(get_corruption("salt_pepper", p=0.1)(KEY, _images()))
  changed = y != 0.25
  assert abs(changed.mean() - 0.1) < 0.007
  assert set(np.unique(y[changed])) == {-1.0, 1.0}
  assert abs((y[changed] == 1).mean() - 0.5) < 0.03


def test_blur_matches_scipy_gaussian_filter():
  x = jax.random.uniform(KEY, (2, 12, 10, 3), minval=-1, maxval=1)
  y = get_corruption("blur", sigma=1.2, size=5)(KEY, x)
  expected = scipy.ndimage.gaussian_filter(np.asarray(x, np.float64), sigma=(0, 1.2, 1.2, 0),
                                           mode="nearest", truncate=2 / 1.2)
  np.testing.assert_allclose(y, expected, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [("gn_replace", dict(p=0.3)), ("gaussian", dict(sigma=0.1)),
                                         ("salt_pepper", dict(p=0.2))])
def test_image_corruptions_reproducible_per_key(name, kwargs):
  fn = get_corruption(name, **kwargs)
  x = _images(shape=(4, 8, 8, 1))
  y = fn(KEY, x)
  np.testing.assert_array_equal(y, fn(KEY, x))
  assert not np.array_equal(y, fn(jax.random.key(1), x))
  assert not np.array_equal(y[0], y[1])                    # items get different noise


def test_item_randomness_depends_on_key_and_position_only():
  fn = get_corruption("gn_replace", p=0.3)
  x = jax.random.uniform(KEY, (4, 8, 8, 1), minval=-1, maxval=1)
  y = fn(KEY, x)
  np.testing.assert_array_equal(y[:2], fn(KEY, x[:2]))
  np.testing.assert_array_equal(y, jax.jit(lambda k, x: fn(k, x))(KEY, x))   # nests in jit


def test_add_noise_exact_snr_and_random_crops():
  clean = _speech()
  noise = np.random.default_rng(0).normal(size=(5, 20000)).astype(np.float32)
  noisy = jax.jit(get_corruption("add_noise", snr_db=5.0, noise=noise))(KEY, clean)
  np.testing.assert_allclose(_snr_db(clean, noisy), 5.0, atol=1e-3)
  # The added noise is a scaled crop of one clip: find it by correlation.
  residual = np.asarray(noisy, np.float64) - np.asarray(clean, np.float64)
  found = []
  for r in residual:
    corr = np.stack([scipy.signal.correlate(c, r, mode="valid") for c in noise])
    clip, start = np.unravel_index(np.argmax(corr), corr.shape)
    crop = noise[clip, start:start + 16000]
    assert abs(np.corrcoef(crop, r)[0, 1]) > 0.9999
    found.append((clip, start))
  assert len({c for c, _ in found}) > 1 and len({s for _, s in found}) == len(found)


def test_add_noise_draws_every_crop_start():
  """With noise one sample longer than the audio, both crops (start 0 and start 1) are drawn."""
  clean = _speech(batch=16, length=1000)
  noise = np.random.default_rng(1).normal(size=(1, 1001)).astype(np.float32)
  residual = np.asarray(get_corruption("add_noise", snr_db=0.0, noise=noise)(KEY, clean) - clean)
  corr = np.array([[np.corrcoef(r, noise[0, s:s + 1000])[0, 1] for s in (0, 1)] for r in residual])
  assert np.all(corr.max(axis=1) > 0.9999)
  assert set(corr.argmax(axis=1)) == {0, 1}


def test_add_noise_draws_every_clip():
  """With two clips as long as the audio, each item adds a scaled copy of one: both are drawn."""
  clean = _speech(batch=16, length=1000)
  noise = np.random.default_rng(2).normal(size=(2, 1000)).astype(np.float32)
  residual = np.asarray(get_corruption("add_noise", snr_db=0.0, noise=noise)(KEY, clean) - clean)
  corr = np.array([[np.corrcoef(r, n)[0, 1] for n in noise] for r in residual])
  assert np.all(corr.max(axis=1) > 0.9999)
  assert set(corr.argmax(axis=1)) == {0, 1}


def test_add_noise_snr_range():
  noise = np.random.default_rng(0).normal(size=(3, 16000)).astype(np.float32)
  clean = _speech(batch=64)
  snr = _snr_db(clean, get_corruption("add_noise", snr_db=(0.0, 20.0), noise=noise)(KEY, clean))
  assert snr.min() >= -1e-3 and snr.max() <= 20 + 1e-3 and snr.std() > 4   # uniform: std 5.8


def test_add_noise_rejects_short_noise():
  fn = get_corruption("add_noise", snr_db=0.0, noise=np.ones((2, 100), np.float32))
  with pytest.raises(ValueError, match="100 samples, fewer than the 200"):
    fn(KEY, jnp.ones((1, 200)))


def _rt60_schroeder(h, sample_rate=16000):
  """RT60 from the T20 slope (-5 to -25 dB) of the Schroeder decay curve of h [N]."""
  edc = 10 * np.log10(np.cumsum(h[::-1] ** 2)[::-1] / np.sum(h ** 2))
  t = np.arange(len(h)) / sample_rate
  fit = (edc < -5) & (edc > -25)
  return -60 / np.polyfit(t[fit], edc[fit], 1)[0]


@pytest.mark.parametrize("rt60", [0.3, 0.6])
def test_room_impulse_response(rt60):
  h = np.asarray(corruptions.room_impulse_response(KEY, rt60, int(1.5 * rt60 * 16000), 3.0, 16000),
                 np.float64)
  assert abs(np.sum(h ** 2) - 1) < 1e-5
  assert abs(10 * np.log10(h[0] ** 2 / np.sum(h[1:] ** 2)) - 3.0) < 1e-3
  assert abs(_rt60_schroeder(h[1:]) / rt60 - 1) < 0.1


def test_reverb_is_convolution_with_the_rir():
  fn = get_corruption("reverb", rt60=0.25, drr_db=0.0)
  impulse = jnp.zeros((2, 8000)).at[:, 0].set(1.0)
  h = np.asarray(fn(KEY, impulse))
  assert abs(np.sum(h[0] ** 2) - 1) < 1e-4 and not np.allclose(h[0], h[1])
  assert abs(_rt60_schroeder(h[0, 1:4000]) / 0.25 - 1) < 0.1
  x = _speech(batch=2, length=8000)
  np.testing.assert_allclose(fn(KEY, x)[0], np.convolve(x[0], h[0])[:8000], atol=1e-4)


def test_reverb_rt60_range_is_drawn_per_item_with_full_length_rirs():
  """rt60=(low, high): each item's RT60 is drawn from the range, and every RIR lasts `high`
  seconds, so even a slow decay keeps its late tail (the share of the energy after 0.3 s)."""
  impulse = jnp.zeros((8, 12000)).at[:, 0].set(1.0)
  h = np.asarray(get_corruption("reverb", rt60=(0.3, 0.6))(KEY, impulse), np.float64)
  rt60 = np.array([_rt60_schroeder(r[1:9600]) for r in h])
  assert np.all((0.27 < rt60) & (rt60 < 0.66)) and rt60.std() > 0.04   # uniform: std 0.087
  decay = lambda t: 10 ** (-6 * t / rt60)                                # energy envelope
  late = (h[:, 4800:9600] ** 2).sum(1) / (h[:, 1:9600] ** 2).sum(1)
  expected = (decay(0.3) - decay(0.6)) / (1 - decay(0.6))
  np.testing.assert_allclose(np.log10(late / expected), 0, atol=0.5)
  assert np.abs(h[:, 9600:]).max() < 1e-6                               # 0.6 s of taps


def test_noise_reverb_snr_is_relative_to_reverberant_signal():
  noise = np.random.default_rng(0).normal(size=(4, 20000)).astype(np.float32)
  clean = _speech(batch=4)
  noisy = get_corruption("noise_reverb", rt60=(0.2, 0.5), snr_db=10.0, noise=noise)(KEY, clean)
  k_reverb, _ = jax.random.split(KEY)
  reverberant = get_corruption("reverb", rt60=(0.2, 0.5))(k_reverb, clean)
  np.testing.assert_allclose(_snr_db(reverberant, noisy), 10.0, atol=1e-3)


def test_corruption_from_config(tmp_path):
  config = default.get_config()
  y = corruptions.corruption_from_config(config, "train")(KEY, _images())
  assert abs(float(jnp.mean(y != 0.25)) - 0.3) < 0.01
  config.data.data_dir = str(tmp_path)
  config.corruption.name, config.corruption.kwargs = "add_noise", dict(snr_db=2.0)
  clean = _speech(batch=4)
  noisy = corruptions.corruption_from_config(config, "test")(KEY, clean)
  np.testing.assert_allclose(_snr_db(clean, noisy), 2.0, atol=1e-3)
  # Reverberation at the audio section's rate: at 48 kHz an RT60 of 0.25 s is 3x the samples.
  config.audio.sample_rate = 48_000
  config.corruption.name, config.corruption.kwargs = "reverb", dict(rt60=0.25, drr_db=0.0)
  impulse = jnp.zeros((1, 24000)).at[:, 0].set(1.0)
  h = np.asarray(corruptions.corruption_from_config(config, "test")(KEY, impulse))[0]
  assert abs(_rt60_schroeder(h[1:12000], sample_rate=48_000) / 0.25 - 1) < 0.1
  config.corruption.kwargs = dict(rt60=0.25, drr_db=0.0, sample_rate=16_000)   # named: kept
  h = np.asarray(corruptions.corruption_from_config(config, "test")(KEY, impulse))[0]
  assert abs(_rt60_schroeder(h[1:4000]) / 0.25 - 1) < 0.1


def test_unknown_corruption_lists_known():
  with pytest.raises(KeyError, match="gn_replace.*salt_pepper"):
    get_corruption("gn_replce")


@pytest.mark.parametrize("name,kwargs,match", [
    ("gn_replace", dict(p=1.5), "gn_replace p must be"),
    ("blur", dict(sigma=1.0, size=4), "odd"),
    ("reverb", dict(rt60=(0.6, 0.2)), "increasing"),
    ("gaussian", dict(sigma=-0.1), r"gaussian sigma must be a number in \[0.0, inf\], got -0.1"),
    ("blur", dict(sigma=0.0), "blur sigma must be"),
    ("salt_pepper", dict(p=(0.1, 0.2)), r"salt_pepper p must be a number in \[0.0, 1.0\]"),
    ("add_noise", dict(snr_db=(10.0, 0.0), noise=np.ones((1, 9), np.float32)), "increasing"),
    ("add_noise", dict(snr_db=0.0, noise=np.ones(9, np.float32)), r"noise clips \[N, Ln\].*\(9,\)"),
    ("add_noise", dict(snr_db=0.0, noise=np.ones((0, 9), np.float32)), "N >= 1"),
])
def test_invalid_parameters_are_named(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    get_corruption(name, **kwargs)


@pytest.mark.parametrize("name", ["gn_replace", "salt_pepper"])
def test_replacement_probability_ends_are_allowed_and_exact(name):
  """p=0 changes nothing and p=1 replaces every element (both ends of [0, 1] are valid)."""
  x = _images(shape=(2, 8, 8, 3))
  np.testing.assert_array_equal(get_corruption(name, p=0.0)(KEY, x), x)
  assert not np.any(np.asarray(get_corruption(name, p=1.0)(KEY, x)) == 0.25)
