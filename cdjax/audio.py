"""Audio features in JAX: SGMSE+'s compressed complex STFT, its exact inverse, and log-mel.

Spectrograms are `[..., F, T]` (frequency bins, frames). Defaults are SGMSE+'s (16 kHz): n_fft
510 (256 bins), hop 128, periodic Hann window, centered with reflect padding, no
normalisation (torch.stft's `normalized=False`, as sgmse uses), then amplitude compression
`beta * |c|^alpha * exp(i angle c)` with alpha 0.5, beta 0.15. The iSTFT is torch.istft's
windowed overlap-add divided by the summed squared window. `Frontend` bundles the whole path
(noisy-maximum normalisation, padding, compressed STFT and back); `make_observe` is the trainers'
speech observation model.
"""
import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import librosa
import numpy as np

SAMPLE_RATE = 16_000
N_FFT = 510
HOP_LENGTH = 128
ALPHA = 0.5   # spectrogram amplitude exponent
BETA = 0.15   # spectrogram scale factor


def hann_window(n: int) -> np.ndarray:
  """Periodic Hann window [n] (torch.hann_window(n, periodic=True), scipy 'hann', fftbins)."""
  return (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)).astype(np.float32)


def num_frames(length: int, hop_length: int = HOP_LENGTH) -> int:
  """Frames of a centered STFT of `length` samples: 1 + length // hop_length."""
  return 1 + length // hop_length


def frames_to_samples(frames: int, hop_length: int = HOP_LENGTH) -> int:
  """Samples whose centered STFT has exactly `frames` frames (SGMSE+'s training crop)."""
  return (frames - 1) * hop_length


def _frame_index(frames: int, n_fft: int, hop_length: int) -> np.ndarray:
  return np.arange(frames)[:, None] * hop_length + np.arange(n_fft)[None]


def stft(wave: jax.Array, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
         center: bool = True, pad_mode: str = "reflect") -> jax.Array:
  """Complex STFT with a periodic Hann window: wave [..., L] -> complex64 [..., n_fft//2+1, T].

  T = 1 + L // hop_length when centered (the signal padded by n_fft // 2 on both sides with
  `pad_mode`: "reflect" as torch.stft, "constant" as librosa), else 1 + (L - n_fft) // hop.
  """
  wave = jnp.asarray(wave, jnp.float32)
  if center:
    pad = [(0, 0)] * (wave.ndim - 1) + [(n_fft // 2, n_fft // 2)]
    wave = jnp.pad(wave, pad, mode=pad_mode)
  if wave.shape[-1] < n_fft:
    raise ValueError(f"stft: signal of {wave.shape[-1]} samples (after padding) is shorter "
                     f"than n_fft={n_fft}.")
  frames = 1 + (wave.shape[-1] - n_fft) // hop_length
  segments = wave[..., _frame_index(frames, n_fft, hop_length)] * hann_window(n_fft)
  return jnp.swapaxes(jnp.fft.rfft(segments, axis=-1), -1, -2).astype(jnp.complex64)


def istft(spec: jax.Array, length: int, n_fft: int = N_FFT,
          hop_length: int = HOP_LENGTH) -> jax.Array:
  """Inverse of the centered `stft`: complex [..., n_fft//2+1, T] -> wave float32 [..., length].

  Windowed overlap-add divided by the overlap-added squared window (torch.istft); samples past
  the last frame are zero.
  """
  if spec.shape[-2] != n_fft // 2 + 1:
    raise ValueError(f"istft: expected {n_fft // 2 + 1} frequency bins for n_fft={n_fft}, got "
                     f"spec of shape {list(spec.shape)}.")
  frames = spec.shape[-1]
  window = hann_window(n_fft)
  segments = jnp.fft.irfft(jnp.swapaxes(spec, -1, -2), n=n_fft, axis=-1) * window
  index = _frame_index(frames, n_fft, hop_length)
  total = (frames - 1) * hop_length + n_fft
  wave = jnp.zeros(spec.shape[:-2] + (total,), jnp.float32).at[..., index].add(segments)
  envelope = np.bincount(index.ravel(), np.tile(window**2, frames), minlength=total)
  wave = wave / np.where(envelope > 1e-11, envelope, 1.0)
  wave = wave[..., n_fft // 2:n_fft // 2 + length]
  return jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])])


def _power_magnitude(c: jax.Array, power: float, gain: float) -> jax.Array:
  """gain * |c|^power * exp(i angle c), exactly 0 at c = 0 with finite gradients there."""
  mag2 = jnp.real(c)**2 + jnp.imag(c)**2
  safe = jnp.where(mag2 > 0, mag2, 1.0)
  return gain * c * safe**((power - 1.0) / 2)


def compress(spec: jax.Array, alpha: float = ALPHA, beta: float = BETA) -> jax.Array:
  """Amplitude compression beta * |c|^alpha * exp(i angle c), elementwise on complex spec."""
  return _power_magnitude(spec, alpha, beta)


def decompress(spec: jax.Array, alpha: float = ALPHA, beta: float = BETA) -> jax.Array:
  """Exact inverse of `compress`: |c / beta|^(1/alpha) * exp(i angle c)."""
  return _power_magnitude(spec / beta, 1.0 / alpha, 1.0)


def to_spec(wave: jax.Array, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
            alpha: float = ALPHA, beta: float = BETA) -> jax.Array:
  """Waveform [..., L] -> compressed complex spectrogram [..., n_fft//2+1, 1 + L//hop]."""
  return compress(stft(wave, n_fft, hop_length), alpha, beta)


def to_wave(spec: jax.Array, length: int, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
            alpha: float = ALPHA, beta: float = BETA) -> jax.Array:
  """Compressed complex spectrogram [..., F, T] -> waveform [..., length] (inverse of to_spec)."""
  return istft(decompress(spec, alpha, beta), length, n_fft, hop_length)


def normalize_by_noisy(y: jax.Array, *others: jax.Array, eps: float = 1e-8):
  """Divides the noisy waveform y [..., L] and `others` (e.g. the clean x) by max |y| per item.

  Returns (y / m, *(o / m for o in others), m) with m [..., 1]; multiply an estimate by m to
  restore the original scale. `eps` guards all-zero signals.
  """
  m = jnp.maximum(jnp.max(jnp.abs(y), axis=-1, keepdims=True), eps)
  return (y / m, *(o / m for o in others), m)


def pad_frames(spec: jax.Array, multiple: int = 64, mode: str = "constant") -> jax.Array:
  """Pads the frame axis of spec [..., F, T] at the end up to a multiple of `multiple`.

  mode: a jnp.pad mode ("constant" = zeros, "reflect", "edge"); SGMSE+ pads to a multiple of
  64 frames at inference. Crop the output back with `[..., :T]`.
  """
  pad = [(0, 0)] * (spec.ndim - 1) + [(0, -spec.shape[-1] % multiple)]
  return jnp.pad(spec, pad, mode=mode)


@functools.lru_cache(maxsize=None)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
  """librosa's (Slaney) mel filterbank [n_mels, n_fft//2+1], as a float32 constant."""
  return librosa.filters.mel(sr=sample_rate, n_fft=n_fft, n_mels=n_mels, fmin=fmin,
                             fmax=fmax).astype(np.float32)


def mel_spectrogram(wave: jax.Array, sample_rate: int = SAMPLE_RATE, n_fft: int = 512,
                    hop_length: int = 160, n_mels: int = 64, fmin: float = 0.0,
                    fmax: float | None = None) -> jax.Array:
  """Mel power spectrogram, wave [..., L] -> [..., n_mels, 1 + L//hop].

  Equals librosa.feature.melspectrogram (periodic Hann, centered with zero padding, power 2).
  """
  power = jnp.abs(stft(wave, n_fft, hop_length, pad_mode="constant"))**2
  return jnp.einsum("mf,...ft->...mt", mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax),
                    power)


def log_mel(wave: jax.Array, sample_rate: int = SAMPLE_RATE, n_fft: int = 512,
            hop_length: int = 160, n_mels: int = 64, fmin: float = 0.0,
            fmax: float | None = None, eps: float = 1e-6) -> jax.Array:
  """log(mel_spectrogram + eps): wave [..., L] -> [..., n_mels, 1 + L//hop]."""
  return jnp.log(mel_spectrogram(wave, sample_rate, n_fft, hop_length, n_mels, fmin, fmax) + eps)


@dataclasses.dataclass(frozen=True)
class Frontend:
  """The SGMSE+ signal path between waveforms and the networks' compressed spectrograms.

  `analyze(y, *others)`: divide every waveform [B, L] by the noisy maximum max |y| (per item),
  zero-pad to `padded_length(L)` samples (so the centered STFT has a multiple of
  `frame_multiple` frames) and take `to_spec`. `synthesize(spec, length, scale)` inverts it.
  """
  n_fft: int = N_FFT
  hop_length: int = HOP_LENGTH
  alpha: float = ALPHA
  beta: float = BETA
  frame_multiple: int = 64

  @classmethod
  def from_config(cls, config) -> "Frontend":
    """From the `audio` section of a config (fields n_fft, hop_length, alpha, beta,
    frame_multiple). A `speech_classifier` inverts the signal branch's spectrograms with its
    net_kwargs spec_n_fft, spec_hop_length, spec_alpha, spec_beta (defaults: the SGMSE+ ones,
    as here); a ValueError names any that differ from the audio section."""
    a = config.audio
    if config.classifier.net == "speech_classifier":
      kwargs = config.classifier.net_kwargs
      given = {f: kwargs.get("spec_" + f, getattr(cls, f)) for f in ("n_fft", "hop_length", "alpha", "beta")}
      differ = [f"classifier.net_kwargs.spec_{f}={v} vs audio.{f}={a[f]}"
                for f, v in given.items() if v != a[f]]
      if differ:
        raise ValueError(f"The speech classifier would read spectrograms made with other STFT "
                         f"settings: {'; '.join(differ)}. Set the classifier's spec_* net_kwargs "
                         "to the audio section's values (they only affect that inversion).")
    return cls(a.n_fft, a.hop_length, a.alpha, a.beta, a.frame_multiple)

  def padded_length(self, length: int) -> int:
    """The fewest samples (frames - 1) * hop >= length, frames a multiple of frame_multiple:
    the centered STFT of the zero-padded wave has `frames` frames and its inverse (of exactly
    (frames - 1) * hop samples, `synthesize`) covers every sample of the input."""
    needed = 1 - (-length // self.hop_length)   # (frames - 1) * hop >= length
    frames = -(-needed // self.frame_multiple) * self.frame_multiple
    return frames_to_samples(frames, self.hop_length)

  def to_spec(self, wave: jax.Array) -> jax.Array:
    """wave [..., L] -> compressed spectrogram [..., F, T] of the zero-padded wave."""
    pad = self.padded_length(wave.shape[-1]) - wave.shape[-1]
    wave = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(0, pad)])
    return to_spec(wave, self.n_fft, self.hop_length, self.alpha, self.beta)

  def analyze(self, y: jax.Array, *others: jax.Array):
    """(Y, *others' spectrograms, scale [..., 1]) from the noisy y [..., L] and e.g. the clean x."""
    *waves, scale = normalize_by_noisy(y, *others)
    return (*(self.to_spec(w) for w in waves), scale)

  def synthesize(self, spec: jax.Array, length: int, scale: jax.Array = 1.0) -> jax.Array:
    """Compressed spectrogram [..., F, T] -> waveform [..., length], times `scale`."""
    wave = to_wave(spec, frames_to_samples(spec.shape[-1], self.hop_length), self.n_fft,
                   self.hop_length, self.alpha, self.beta)
    return wave[..., :length] * scale


def center_crop(wave: np.ndarray, length: int) -> np.ndarray:
  """The central `length` samples of wave [..., L] (all of it when length <= 0 or >= L)."""
  if length <= 0 or length >= wave.shape[-1]:
    return wave
  start = (wave.shape[-1] - length) // 2
  return wave[..., start:start + length]


def random_crop(key: jax.Array, wave: jax.Array, length: int) -> jax.Array:
  """A window of `length` samples at an independent random start in each item of wave [B, ..., L]
  (the same start for all of an item's rows; all of it when length <= 0 or >= L)."""
  if length <= 0 or length >= wave.shape[-1]:
    return wave
  starts = jax.random.randint(key, (wave.shape[0],), 0, wave.shape[-1] - length + 1)
  return jax.vmap(lambda w, s: jax.lax.dynamic_slice_in_dim(w, s, length, axis=-1))(wave, starts)


def make_observe(corrupt: Callable, frontend: Frontend, crop_frames: int = 0) -> Callable:
  """The speech observation model `observe(key, batch) -> (x0, y)` of the trainers.

  batch["audio"]: clean waveforms [B, L]; the mixture is `corrupt(key, clean)` of the whole
  clips (as evaluation mixes them: the SNR and reverberation are those of the clip). With
  `crop_frames` > 0 clean and mixture are then cropped to the same random window of
  n = (crop_frames - 1) * hop samples (SGMSE+ trains on crops of its pairs); clips shorter than
  n are zero-padded to n, centered, as SGMSE+ pads them. x0, y: compressed spectrograms
  [B, F, T] of clean and mixture, both divided by the mixture's maximum (`Frontend.analyze`).
  """
  def observe(key, batch):
    k_crop, k_corrupt = jax.random.split(key)
    x = batch["audio"]
    y = corrupt(k_corrupt, x)
    if crop_frames > 0:
      n = frames_to_samples(crop_frames, frontend.hop_length)
      pad = max(n - x.shape[-1], 0)
      pair = jnp.pad(jnp.stack([x, y], 1), [(0, 0), (0, 0), (pad // 2, pad - pad // 2)])
      x, y = random_crop(k_crop, pair, n).swapaxes(0, 1)
    y_spec, x_spec, _ = frontend.analyze(y, x)
    return x_spec, y_spec
  return observe
