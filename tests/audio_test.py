"""Tests for cdjax.audio: STFT against librosa, exact round trips, log-mel against librosa."""
import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from cdjax import audio
from configs import speech_keywords


@pytest.fixture(scope="module")
def wave():
  return (0.3 * np.random.default_rng(0).standard_normal((2, 16000))).astype(np.float32)


def test_stft_matches_torch_convention(wave):
  # librosa with reflect padding and a periodic Hann window equals torch.stft(normalized=False).
  spec = np.asarray(audio.stft(wave))
  ref = librosa.stft(wave, n_fft=510, hop_length=128, pad_mode="reflect")
  assert spec.shape == (2, 256, audio.num_frames(16000)) == ref.shape
  assert spec.dtype == np.complex64
  np.testing.assert_allclose(spec, ref, atol=1e-6 * np.abs(ref).max())


def test_round_trip_wave_spec_wave(wave):
  spec = audio.to_spec(wave)
  back = audio.to_wave(spec, wave.shape[-1])
  np.testing.assert_allclose(np.asarray(back), wave, atol=1e-5)


def test_compression_is_exactly_invertible_with_finite_gradients():
  c = jnp.array([0.0, 1.0, -4.0j, 3.0 + 4.0j], jnp.complex64)
  comp = audio.compress(c, alpha=0.5, beta=0.15)
  np.testing.assert_allclose(np.abs(comp), 0.15 * np.sqrt(np.abs(c)), rtol=1e-6)
  np.testing.assert_allclose(np.angle(comp[1:]), np.angle(c[1:]), atol=1e-6)
  np.testing.assert_allclose(audio.decompress(comp, alpha=0.5, beta=0.15), c, rtol=1e-5,
                             atol=1e-7)
  grad = jax.grad(lambda s: jnp.sum(jnp.abs(audio.compress(audio.decompress(s)))))(c)
  assert np.all(np.isfinite(np.asarray(grad)))


def test_normalize_by_noisy_and_pad_frames():
  y = jnp.array([[0.5, -2.0, 1.0], [0.1, 0.2, -0.4]])
  y_n, x_n, m = audio.normalize_by_noisy(y, 2 * y)
  np.testing.assert_allclose(np.asarray(m)[:, 0], [2.0, 0.4])
  np.testing.assert_allclose(np.abs(np.asarray(y_n)).max(axis=-1), 1.0)
  np.testing.assert_allclose(x_n, 2 * y_n)
  spec = jnp.ones((2, 256, 126), jnp.complex64)
  padded = audio.pad_frames(spec, 64)
  assert padded.shape == (2, 256, 128)
  np.testing.assert_array_equal(np.asarray(padded[..., 126:]), 0)
  assert audio.num_frames(audio.frames_to_samples(256)) == 256


def test_log_mel_matches_librosa(wave):
  mel = np.asarray(audio.mel_spectrogram(wave, 16000, n_fft=512, hop_length=160, n_mels=64))
  ref = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=512, hop_length=160, n_mels=64)
  assert mel.shape == ref.shape == (2, 64, 101)
  np.testing.assert_allclose(mel, ref, rtol=1e-4, atol=1e-5 * ref.max())
  np.testing.assert_allclose(np.asarray(audio.log_mel(wave)), np.log(ref + 1e-6), atol=1e-3)


def test_istft_rejects_wrong_bins():
  with pytest.raises(ValueError, match="frequency bins"):
    audio.istft(jnp.zeros((1, 100, 10), jnp.complex64), 1000)


def test_stft_rejects_short_signals_and_istft_zero_fills_past_the_last_frame():
  """Uncentered, 400 < n_fft samples make no frame: an error, not an empty spectrogram. The
  centered STFT of 1024 samples has 9 frames, covering (9 - 1) * 128 + 510 - 255 = 1279
  samples of the input (its reflected tail included); istft to 1500 samples zero-fills the rest."""
  with pytest.raises(ValueError, match="shorter than n_fft=510"):
    audio.stft(np.zeros(400, np.float32), center=False)
  wave = np.random.default_rng(1).standard_normal(1024).astype(np.float32)
  back = np.asarray(audio.istft(audio.stft(wave), 1500))
  assert back.shape == (1500,)
  np.testing.assert_allclose(back[:1024], wave, atol=1e-5)
  # The reflected tail (the last ~20 samples, under one window's near-zero edge, lose precision).
  np.testing.assert_allclose(back[1024:1250], wave[-2:-228:-1], atol=1e-5)
  np.testing.assert_array_equal(back[1279:], 0.0)


def test_center_and_random_crops_are_windows_of_each_row():
  wave = np.arange(3 * 100, dtype=np.float32).reshape(3, 100)
  np.testing.assert_array_equal(audio.center_crop(wave, 10), wave[:, 45:55])
  assert audio.center_crop(wave, 0) is wave and audio.center_crop(wave, 100) is wave
  crops = np.stack([np.asarray(audio.random_crop(jax.random.PRNGKey(s), jnp.asarray(wave), 10))
                    for s in range(20)])
  assert crops.shape == (20, 3, 10)
  starts = crops[..., 0] - wave[:, 0]   # each crop is a contiguous window of its own row
  np.testing.assert_array_equal(crops, starts[..., None] + wave[:, :1] + np.arange(10))
  assert starts.min() >= 0 and starts.max() <= 90 and len(np.unique(starts)) > 10
  assert len(np.unique(starts[0])) > 1   # rows get independent starts
  assert audio.random_crop(jax.random.PRNGKey(0), wave, 100) is wave
  # Every start is drawn, the last one (L - length) included.
  short = jnp.asarray(wave[:, :11])
  starts = [int(audio.random_crop(jax.random.PRNGKey(s), short, 10)[0, 0]) for s in range(20)]
  assert set(starts) == {0, 1}


@pytest.mark.parametrize("frame_multiple", [64, 32, 1])
def test_padded_length_is_the_fewest_samples_of_whole_frame_multiples(frame_multiple):
  """padded_length(L): >= L samples whose centered STFT has a multiple of frame_multiple frames,
  and the fewest such (one multiple fewer would not cover L), for every L up to 20000."""
  frontend = audio.Frontend(frame_multiple=frame_multiple)
  hop = frontend.hop_length
  lengths = np.arange(1, 20001)
  padded = np.array([frontend.padded_length(int(n)) for n in lengths])
  assert np.all(padded >= lengths)
  assert np.all(padded % hop == 0) and np.all((padded // hop + 1) % frame_multiple == 0)
  assert np.all(padded - frame_multiple * hop < lengths)
  if frame_multiple == 64:   # 8192 samples = 64 hops: 65 frames needed, so 128 (not 64)
    assert frontend.padded_length(8192) == 127 * hop


def test_frontend_from_config_checks_the_classifiers_stft_settings():
  config = speech_keywords.get_config()
  assert audio.Frontend.from_config(config) == audio.Frontend(frame_multiple=32)
  config.audio.alpha = 0.667   # e.g. the EARS setting, with the classifier left at SGMSE+'s
  with pytest.raises(ValueError, match=r"spec_alpha=0.5 vs audio.alpha=0.667"):
    audio.Frontend.from_config(config)
  config.classifier.net_kwargs.spec_alpha = 0.667
  assert audio.Frontend.from_config(config).alpha == 0.667
