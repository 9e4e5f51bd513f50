"""Speech networks on compressed complex spectrograms `[B, F, T]` (see `cdjax.audio`).

- `ncsnpp`: SGMSE+'s NCSN++ score network with the coupled model's logit conditioning and
  Ex-Diff latent integration.
- `resunet_enhancer`: a discriminative ResUNet enhancer that also returns its bottleneck latent.
- `speech_classifier`: log-mel + small CNN, waveform (or compressed spectrogram) -> logits.
- `speech_logit_net`: the logit branch of the coupled model on spectrogram conditioning.

Inside the networks a spectrogram is a feature map `[B, F, T, C]` (frequency is the height).
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cdjax import audio
from cdjax.nets import NETWORKS
from cdjax.nets.layers import (ConvEncoder, GroupNorm, ResBlock, TimeEmbedding, batch_time,
                               check_shape, conv_min8_features, dot_product_attention, group_norm,
                               maybe_remat, sinusoidal_embedding)
from cdjax.nets.logits import LogitHead

# DDPM/NCSN++ initialisation; SGMSE+'s `init_scale=0` layers are zero-initialised here.
_default_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform")
_zeros = nn.initializers.zeros
LATENT_MODES = ("none", "add", "concat", "film")


def _conv(features: int, kernel: int = 3, zero: bool = False, name: Optional[str] = None):
  return nn.Conv(features, (kernel, kernel), kernel_init=_zeros if zero else _default_init,
                 name=name)


def _gn(x: jax.Array) -> jax.Array:
  """NCSN++'s GroupNorm: min(C // 4, 32) groups, eps 1e-6."""
  return GroupNorm(max(1, min(x.shape[-1] // 4, 32)))(x)


def _complex_to_channels(*specs: jax.Array) -> jax.Array:
  """Complex [B, F, T] arrays -> real [B, F, T, 2 * n]: (re, im) of each, in order."""
  return jnp.stack([p for s in specs for p in (jnp.real(s), jnp.imag(s))], axis=-1)


def _channels_to_complex(h: jax.Array) -> jax.Array:
  """Real [B, F, T, 2] -> complex64 [B, F, T]."""
  return jax.lax.complex(h[..., 0], h[..., 1]).astype(jnp.complex64)


def _pad_axis(x: jax.Array, axis: int, lo: int, hi: int) -> jax.Array:
  """x zero-padded by lo entries before and hi after along `axis` (the other axes unchanged)."""
  widths = [(0, 0)] * x.ndim
  widths[axis] = (lo, hi)
  return jnp.pad(x, widths)


def _fir(x: jax.Array, kernel: Sequence[int], up: bool) -> jax.Array:
  """FIR-filtered 2x resampling (upfirdn2d as in NCSN++/StyleGAN2), per channel.

  x [B, H, W, C] -> [B, 2H, 2W, C] (up) or [B, H/2, W/2, C] (down), filter outer(k, k) / sum^2
  (times 4 when upsampling to keep the DC gain). The filter is separable, so each axis is a 1-D
  upfirdn written as scaled slices of the map padded once: strided when downsampling; when
  upsampling, two polyphase maps interleaved by a select on the index parity. On XLA:CPU this
  runs 10-100x faster than the equivalent grouped convolution, and the upsampling 4x faster
  than a stack-and-reshape interleave, whose concatenate does not vectorise with the
  GroupNorm-SiLU that XLA fuses into it (recomputed per tap).
  """
  k = np.asarray(kernel, np.float32)
  k = [float(c) for c in (k / k.sum() * (2.0 if up else 1.0))[::-1]]   # upfirdn2d convolves
  n = len(k)
  for axis in (1, 2):
    size = x.shape[axis]
    if up:   # out[2j + r] = sum_i k[i] x[j + d], d = (r + i - lo) / 2 over the i making it whole
      lo = (n - 1) // 2 + 1
      taps = [[(k[i], (r + i - lo) // 2) for i in range(n) if (r + i - lo) % 2 == 0]
              for r in (0, 1)]
      d_min = min(d for phase in taps for _, d in phase)
      d_max = max(d for phase in taps for _, d in phase)
      xp = _pad_axis(x, axis, -d_min, d_max)
      shifted = lambda d: jax.lax.slice_in_dim(xp, d - d_min, d - d_min + size, axis=axis)
      even, odd = (jnp.repeat(sum(c * shifted(d) for c, d in phase), 2, axis) for phase in taps)
      x = jnp.where(jax.lax.broadcasted_iota(jnp.int32, even.shape, axis) % 2 == 1, odd, even)
    else:    # out[j] = sum_i k[i] x[2j + i - lo]
      lo = (n - 1) // 2
      xp = _pad_axis(x, axis, lo, n - 1 - lo)
      x = sum(c * jax.lax.slice_in_dim(xp, i, i + size - 1, 2, axis) for i, c in enumerate(k))
  return x


class _NCSNResBlock(nn.Module):
  """NCSN++'s BigGAN residual block: x [B, H, W, C], temb [B, E] -> [B, H', W', out].

  GN-SiLU-[FIR up/down]-Conv3x3 + Dense(temb) -GN-SiLU-Dropout-Conv3x3 (zero init), a 1x1
  shortcut when the shape changes, and (x + h) / sqrt(2).
  """
  out_ch: Optional[int] = None
  resample: str = "none"   # none | up | down
  dropout: float = 0.0
  fir_kernel: Sequence[int] = (1, 3, 3, 1)

  @nn.compact
  def __call__(self, x: jax.Array, temb: jax.Array, train: bool = False) -> jax.Array:
    out_ch = self.out_ch or x.shape[-1]
    h = nn.silu(_gn(x))
    if self.resample != "none":
      h, x = (_fir(a, self.fir_kernel, self.resample == "up") for a in (h, x))
    h = _conv(out_ch)(h)
    h = h + nn.Dense(out_ch, kernel_init=_default_init)(nn.silu(temb))[:, None, None]
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(_gn(h)))
    h = _conv(out_ch, zero=True)(h)
    if x.shape[-1] != out_ch or self.resample != "none":
      x = _conv(out_ch, 1, name="shortcut")(x)
    return (x + h) / np.sqrt(2.0)


class _NCSNAttention(nn.Module):
  """NCSN++'s single-head self-attention over all positions, x [B, H, W, C] -> same shape:
  (x + Out(softmax(Q K^T / sqrt C) V)) / sqrt(2), Q, K, V, Out 1x1 maps of GN(x), Out zero-init."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    tokens = _gn(x).reshape(b, hh * ww, c)
    dense = lambda name, init: nn.Dense(c, kernel_init=init, name=name)
    small = nn.initializers.variance_scaling(0.1, "fan_avg", "uniform")
    q, k, v = (dense(n, small)(tokens) for n in ("q", "k", "v"))
    one_head = lambda a: a[:, :, None]   # [B, N, C] -> [B, N, 1, C]
    h = dense("out", _zeros)(dot_product_attention(*map(one_head, (q, k, v)))[:, :, 0])
    return (x + h.reshape(x.shape)) / np.sqrt(2.0)


def _resize(x: jax.Array, height: int, width: int) -> jax.Array:
  """Bilinear resize of x [B, H', W', C] to [B, height, width, C] (identity if equal)."""
  if x.shape[1:3] == (height, width):
    return x
  return jax.image.resize(x, (x.shape[0], height, width, x.shape[-1]), "linear")


class LogitConditioning(nn.Module):
  """Logits after the middle blocks (the coupled paper's speech net, official
  `ncsnpp_48k_logits_conditioned`): h + gate(temb) * Conv1x1(tile(MLP(LayerNorm(logits)))).

  h [B, F', T', C]; temb [B, D]; logits [B, K] (one vector per item) or [B, L, K] (a sequence,
  e.g. per token, linearly interpolated along time to T'). MLP: Dense-SiLU-Dense to `hidden`;
  gate(temb) = sigmoid(Dense(SiLU(Dense(temb)))) [B, 1], `hidden` wide (64 and 64 officially).
  The 1x1 conv and the gate's last kernel start at zero and its bias at `gate_bias` (sigmoid(-3)
  ~ 0.05), so the branch starts as the identity. LayerNorm eps 1e-5, as torch's.
  """
  hidden: int
  gate_bias: float = -3.0

  @nn.compact
  def __call__(self, h: jax.Array, logits: jax.Array, temb: jax.Array) -> jax.Array:
    b, f, t, c = h.shape
    if logits.ndim == 2:
      logits = logits[:, None]
    if logits.ndim != 3 or logits.shape[0] != b:
      raise ValueError(f"ncsnpp: logits must be [B, K] or [B, L, K] with B={b}, got "
                       f"{list(logits.shape)}.")
    e = nn.Dense(self.hidden)(nn.LayerNorm(epsilon=1e-5)(logits.astype(h.dtype)))
    e = nn.Dense(self.hidden)(nn.silu(e))
    e = jax.image.resize(e, (b, t, self.hidden), "linear", antialias=False)   # as F.interpolate
    e = jnp.broadcast_to(e[:, None], (b, f, t, self.hidden))
    e = _conv(c, 1, zero=True)(e)
    gate = nn.silu(nn.Dense(self.hidden)(temb))
    gate = nn.Dense(1, kernel_init=_zeros, bias_init=nn.initializers.constant(self.gate_bias))(gate)
    return h + jax.nn.sigmoid(gate)[:, None, None] * e


class LatentIntegration(nn.Module):
  """Ex-Diff latent integration: h [B, H, W, C] with latent [B, H', W', C'] -> [B, H, W, C].

  The latent is bilinearly resized to H x W, then `mode`: "add" h + Conv1x1(z) (zero-init);
  "concat" Conv1x1([h, z]); "film" h * (1 + s) + b with (s, b) = Conv1x1(z) (zero-init).
  """
  mode: str

  @nn.compact
  def __call__(self, h: jax.Array, latent: jax.Array) -> jax.Array:
    z = _resize(latent.astype(h.dtype), h.shape[1], h.shape[2])
    c = h.shape[-1]
    if self.mode == "add":
      return h + _conv(c, 1, zero=True)(z)
    if self.mode == "concat":
      return _conv(c, 1)(jnp.concatenate([h, z], axis=-1))
    if self.mode == "film":
      scale, shift = jnp.split(_conv(2 * c, 1, zero=True)(z), 2, axis=-1)
      return h * (1 + scale) + shift
    raise ValueError(f"latent mode must be one of {LATENT_MODES[1:]}, got {self.mode!r}.")


def _check_spec(net: str, name: str, x: jax.Array, shape: Optional[Sequence[int]] = None):
  if not jnp.iscomplexobj(x) or x.ndim != 3:
    raise ValueError(f"{net}: {name} must be a complex spectrogram [B, F, T], got "
                     f"{x.dtype} {list(x.shape)}.")
  if shape is not None:
    check_shape(f"{net}: {name}", x, shape)


@NETWORKS.register("ncsnpp")
class NCSNpp(nn.Module):
  """SGMSE+'s NCSN++ score network, net(x_t, t, y, logits=None, latent=None) -> complex [B, F, T].

  x_t, y: complex [B, F, T]; t: [B] or scalar in (0, 1]. The 4 input channels are (re, im) of
  x_t and y; the output is a 1x1 map of the output-skip pyramid to (re, im); the score is
  -output (SGMSE+). Architecture as SGMSE+ (resblock 'biggan', FIR (1, 3, 3, 1) resampling,
  input skip 'sum', output skip, skip rescale, zero-init last convs): level i has
  `num_res_blocks` residual blocks of `nf * ch_mult[i]` channels and self-attention where the
  frequency size F / 2^i is in `attn_resolutions`; the middle is Res-Attn-Res. Time: Gaussian
  Fourier features of log t (fixed frequencies N(0, fourier_scale^2) from `fourier_seed`, so no
  extra params) or sinusoidal features of `time_scale * t`, then Dense-SiLU-Dense to 4 nf.
  `scale_by_t`: divide the pyramid by t before the output map (SGMSE+'s `scale_by_sigma` with
  sigma = t). F and T must be divisible by 2^(len(ch_mult) - 1) (see `audio.pad_frames`).

  logits [B, K] or [B, L, K]: `LogitConditioning` after the middle blocks (skipped if None).
  latent [B, F', T', C'] (Ex-Diff): `LatentIntegration(latent_mode)` at the end of the down
  level whose F / 2^i, T / 2^i is closest (in log2) to F', T' (or level `latent_level`);
  ignored when latent_mode is "none" or latent is None.
  Initialise with the optional inputs you will apply with (their params are created on use).
  SGMSE+'s size (65.6M): nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2), num_res_blocks 2,
  attn_resolutions (16,).
  """
  nf: int = 32
  ch_mult: Sequence[int] = (1, 2, 2, 2)
  num_res_blocks: int = 1
  attn_resolutions: Sequence[int] = (32,)
  dropout: float = 0.0
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  embedding: str = "fourier"   # fourier | sinusoidal
  fourier_scale: float = 16.0
  fourier_seed: int = 0
  time_scale: float = 1000.0
  scale_by_t: bool = True
  logit_hidden: int = 64
  logit_gate_bias: float = -3.0
  latent_mode: str = "none"
  latent_level: Optional[int] = None
  remat: bool = False

  def _time_embedding(self, t: jax.Array) -> jax.Array:
    if self.embedding == "fourier":
      w = jax.random.normal(jax.random.key(self.fourier_seed), (self.nf,)) * self.fourier_scale
      proj = 2 * np.pi * jnp.log(t)[:, None] * w[None]
      emb = jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1)
    elif self.embedding == "sinusoidal":
      emb = sinusoidal_embedding(self.time_scale * t, self.nf)
    else:
      raise ValueError(f"ncsnpp: embedding must be 'fourier' or 'sinusoidal', got "
                       f"{self.embedding!r}.")
    emb = nn.Dense(4 * self.nf, kernel_init=_default_init)(emb)
    return nn.Dense(4 * self.nf, kernel_init=_default_init)(nn.silu(emb))

  def _latent_level(self, f: int, t: int, latent: jax.Array) -> int:
    if self.latent_level is not None:
      return self.latent_level % len(self.ch_mult)
    dist = [abs(math.log2(f / 2**i / latent.shape[1])) + abs(math.log2(t / 2**i / latent.shape[2]))
            for i in range(len(self.ch_mult))]
    return int(np.argmin(dist))

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, y: jax.Array,
               logits: Optional[jax.Array] = None, latent: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    _check_spec("ncsnpp", "x_t", x_t)
    _check_spec("ncsnpp", "y", y, x_t.shape)
    if self.latent_mode not in LATENT_MODES:
      raise ValueError(f"ncsnpp: latent_mode must be one of {LATENT_MODES}, got "
                       f"{self.latent_mode!r}.")
    b, f, n_frames = x_t.shape
    levels = len(self.ch_mult)
    factor = 2**(levels - 1)
    if f % factor or n_frames % factor:
      raise ValueError(f"ncsnpp: F={f} and T={n_frames} must be divisible by {factor} "
                       f"(2^(len(ch_mult)-1)); pad the frames with cdjax.audio.pad_frames.")
    use_latent = latent is not None and self.latent_mode != "none"
    if use_latent:
      if latent.ndim != 4 or latent.shape[0] != b:
        raise ValueError(f"ncsnpp: latent must be [B, F', T', C'] with B={b}, got "
                         f"{list(latent.shape)}.")
      latent_level = self._latent_level(f, n_frames, latent)

    t = batch_time(t, b)
    temb = self._time_embedding(t)
    res = maybe_remat(_NCSNResBlock, self.remat, static_argnums=(3,))
    attn = maybe_remat(_NCSNAttention, self.remat)
    block = lambda out_ch=None, resample="none", name=None: res(
        out_ch, resample, self.dropout, self.fir_kernel, name=name)

    x = _complex_to_channels(x_t, y)
    pyramid_in = x
    hs = [_conv(self.nf, name="conv_in")(x)]
    for i, mult in enumerate(self.ch_mult):
      h = hs[-1]
      for j in range(self.num_res_blocks):
        h = block(self.nf * mult, name=f"down{i}_res{j}")(h, temb, train)
        if h.shape[1] in self.attn_resolutions:
          h = attn(name=f"down{i}_attn{j}")(h)
        if use_latent and i == latent_level and j == self.num_res_blocks - 1:
          h = LatentIntegration(self.latent_mode, name="latent")(h, latent)
        hs.append(h)
      if i < levels - 1:
        h = block(resample="down", name=f"down{i}_downsample")(h, temb, train)
        pyramid_in = _fir(pyramid_in, self.fir_kernel, up=False)
        h = h + _conv(h.shape[-1], 1, name=f"down{i}_combine")(pyramid_in)
        hs.append(h)

    h = block(name="mid_res0")(hs[-1], temb, train)
    h = attn(name="mid_attn")(h)
    h = block(name="mid_res1")(h, temb, train)
    if logits is not None:
      h = LogitConditioning(self.logit_hidden, self.logit_gate_bias, name="logits")(h, logits, temb)

    pyramid = None
    for i in reversed(range(levels)):
      for j in range(self.num_res_blocks + 1):
        h = block(self.nf * self.ch_mult[i], name=f"up{i}_res{j}")(
            jnp.concatenate([h, hs.pop()], axis=-1), temb, train)
      if h.shape[1] in self.attn_resolutions:
        h = attn(name=f"up{i}_attn")(h)
      out = nn.Conv(4, (3, 3), kernel_init=_zeros, conv_general_dilated=conv_min8_features,
                    name=f"up{i}_pyramid")(nn.silu(_gn(h)))
      pyramid = out if pyramid is None else _fir(pyramid, self.fir_kernel, up=True) + out
      if i > 0:
        h = block(resample="up", name=f"up{i}_upsample")(h, temb, train)

    if self.scale_by_t:
      pyramid = pyramid / t[:, None, None, None]
    return _channels_to_complex(nn.Conv(2, (1, 1), name="conv_out")(pyramid))


@NETWORKS.register("resunet_enhancer")
class ResUNetEnhancer(nn.Module):
  """Discriminative ResUNet enhancer, net(y) -> (x_hat, latent).

  y: complex [B, F, T] -> x_hat complex [B, F, T]; latent [B, F / prod(strides_f),
  T / prod(strides_t), widths[-1]] (sizes rounded up), the bottleneck after its middle blocks.
  Encoder level i: `blocks` ResBlocks of `widths[i]` channels, then (except the last level) a
  ResBlock strided by `strides[i]` (frequency, time); the decoder resizes to the skip's size,
  convolves, concatenates the skip and applies `blocks` ResBlocks. `output`: "mask" (x_hat =
  M * y, M a complex mask) or "mapping" (x_hat = y + D, a residual correction).
  Ex-Diff's enhancer (ResUNet30): 384 channels at F/64 x T/32, e.g. widths
  (32, 64, 128, 256, 384, 384, 384), strides ((2, 2),) * 5 + ((2, 1),).
  """
  widths: Sequence[int] = (32, 64, 96)
  strides: Sequence[Sequence[int]] = ((2, 2), (2, 2))
  blocks: int = 1
  dropout: float = 0.0
  groups: int = 8
  output: str = "mask"   # mask | mapping
  remat: bool = False

  @nn.compact
  def __call__(self, y: jax.Array, train: bool = False) -> tuple[jax.Array, jax.Array]:
    _check_spec("resunet_enhancer", "y", y)
    if len(self.strides) != len(self.widths) - 1:
      raise ValueError(f"resunet_enhancer: need len(widths) - 1 = {len(self.widths) - 1} "
                       f"strides, got {len(self.strides)}.")
    if self.output not in ("mask", "mapping"):
      raise ValueError(f"resunet_enhancer: output must be 'mask' or 'mapping', got "
                       f"{self.output!r}.")
    res = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    block = lambda width, stride=1, name=None: res(width, tuple(stride) if stride != 1 else 1,
                                                   self.dropout, self.groups, name=name)

    h = nn.Conv(self.widths[0], (3, 3), name="conv_in")(_complex_to_channels(y))
    skips = []
    for i, width in enumerate(self.widths):
      for j in range(self.blocks):
        h = block(width, name=f"enc{i}_res{j}")(h, None, train)
      if i < len(self.strides):
        skips.append(h)
        h = block(self.widths[i + 1], self.strides[i], name=f"enc{i}_down")(h, None, train)
    for j in range(self.blocks):
      h = block(self.widths[-1], name=f"mid_res{j}")(h, None, train)
    latent = h

    for i in reversed(range(len(self.strides))):
      skip = skips.pop()
      h = nn.Conv(self.widths[i], (3, 3), name=f"dec{i}_up")(
          jax.image.resize(h, skip.shape[:3] + h.shape[3:], "nearest"))
      h = jnp.concatenate([h, skip], axis=-1)
      for j in range(self.blocks):
        h = block(self.widths[i], name=f"dec{i}_res{j}")(h, None, train)
    out = _channels_to_complex(
        nn.Conv(2, (3, 3), conv_general_dilated=conv_min8_features, name="conv_out")(
            nn.silu(group_norm(h, self.groups))))
    x_hat = out * y if self.output == "mask" else y + out
    return x_hat, latent


@NETWORKS.register("speech_classifier")
class SpeechClassifier(nn.Module):
  """Waveform [B, L] -> logits [B, num_classes]: log-mel [B, T, n_mels, 1] (cdjax.audio) ->
  ConvEncoder -> global mean pool -> Dropout -> Dense.

  Also accepts a compressed complex spectrogram [B, F, T] (the signal branch's x0_hat), turned
  into a waveform of (T - 1) * spec_hop_length samples with `audio.to_wave(spec_n_fft,
  spec_hop_length, spec_alpha, spec_beta)`. With `input_peak` > 0 every waveform is first scaled
  to that peak (the clean training clips' peak), so the frozen classifier sees one level whatever
  the normalisation of the enhancement pipeline (SGMSE+ divides by the noisy maximum).
  """
  num_classes: int = 10
  width: int = 32
  depth: int = 3
  dropout: float = 0.0
  groups: int = 8
  sample_rate: int = audio.SAMPLE_RATE
  n_fft: int = 512
  hop_length: int = 160
  n_mels: int = 64
  input_peak: float = 0.0
  spec_n_fft: int = audio.N_FFT
  spec_hop_length: int = audio.HOP_LENGTH
  spec_alpha: float = audio.ALPHA
  spec_beta: float = audio.BETA

  @nn.compact
  def __call__(self, wave: jax.Array, train: bool = False) -> jax.Array:
    if jnp.iscomplexobj(wave) and wave.ndim == 3:
      wave = audio.to_wave(wave, audio.frames_to_samples(wave.shape[-1], self.spec_hop_length),
                           self.spec_n_fft, self.spec_hop_length, self.spec_alpha, self.spec_beta)
    if wave.ndim != 2 or jnp.iscomplexobj(wave):
      raise ValueError(f"speech_classifier: input must be a waveform [B, L] or a complex "
                       f"spectrogram [B, F, T], got {wave.dtype} {list(wave.shape)}.")
    if self.input_peak > 0:
      peak = jnp.max(jnp.abs(wave), axis=-1, keepdims=True)
      wave = wave * (self.input_peak / jnp.maximum(peak, 1e-8))
    feats = audio.log_mel(wave, self.sample_rate, self.n_fft, self.hop_length, self.n_mels)
    h = jnp.swapaxes(feats, -1, -2)[..., None]
    h = ConvEncoder(self.width, self.depth, groups=self.groups)(h).mean(axis=(1, 2))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(self.num_classes)(h)


@NETWORKS.register("speech_logit_net")
class SpeechLogitNet(LogitHead):
  """Logit branch for speech: net(l_t [B, K], t, cond_logits f(c) [B, K], c) -> [B, K].

  `LogitHead` (the image design) on c, a compressed complex spectrogram [B, F, T], read as its
  magnitude average-pooled by `pool` (frequency, time) into a small map [B, F / pf, T / pt, 1].
  Continuous times t in (0, 1] enter a sinusoidal embedding as `time_scale * t`.
  """
  hidden: int = 128
  depth: int = 2
  pool: Sequence[int] = (8, 8)
  time_scale: float = 1000.0

  def embed_time(self, t: jax.Array) -> jax.Array:
    return TimeEmbedding(self.hidden, scale=self.time_scale)(t)

  def signal_map(self, cond_signal: jax.Array) -> jax.Array:
    _check_spec("speech_logit_net", "cond_signal", cond_signal)
    pool = tuple(self.pool)
    return nn.avg_pool(jnp.abs(cond_signal)[..., None], pool, pool, padding="SAME")
