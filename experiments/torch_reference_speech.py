"""PyTorch eager reference of the cdjax speech networks and the coupled Parallel sampler of the
speech setup (`configs/speech_keywords.py`, Ex-Diff signal branch), for the benchmarks of issue 8.
Not part of the library.

The modules mirror `cdjax.nets.speech` layer for layer (NCSN++ with FIR resampling, logit
conditioning at the bottleneck and FiLM latent integration; the ResUNet enhancer; the log-mel
classifier; the speech logit net), so the FLOPs and parameter counts per call match, and with
cdjax's weights (`torch_reference.load_flax_params`) the outputs too (`check_torch_reference.py`);
the benchmarks time them with random weights (NCSN++'s zero-initialised layers too). Layout is NCHW
with frequency as the height; complex spectrograms are complex64 [B, F, T]. FIR resampling is
SGMSE+'s `upfirdn2d_native` (zero insertion, padding, a depthwise conv2d, subsampling). The sampler
is the official-code style: a Python `for` loop over the OUVE steps, per step the signal step
(annealed Langevin corrector + reverse-diffusion predictor, two score-net calls, conditioned on
f(y) before the switch, on the previous l0_hat after it) and then the logit step (the same
corrector and predictor on the logit OUVE, two logit-net calls, conditioned on y and f(y) before
the switch, on the signal's new x0_hat and f(x0_hat) after it). Shared pieces come from
`torch_reference.py`.

Needs the `bench` extra: `pip install torch==2.13.0`. `bench_sampler.py` records its FLOPs per
call next to XLA's for the JAX networks.
"""
import math
from typing import Optional, Sequence

import jax
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdjax import audio
import torch_reference as tr
from torch_reference import CNNClassifier, LogitNet, ResBlock, _group_norm, standardize_logits


def _gn(channels: int) -> nn.GroupNorm:
  """NCSN++'s GroupNorm: min(C // 4, 32) groups, eps 1e-6."""
  return nn.GroupNorm(max(1, min(channels // 4, 32)), channels, eps=1e-6)


def _complex_to_channels(*specs):
  """Complex [B, F, T] tensors -> real [B, 2 n, F, T]: (re, im) of each, in order."""
  return torch.stack([p for s in specs for p in (s.real, s.imag)], 1)


def _channels_to_complex(h):
  """Real [B, 2, F, T] -> complex64 [B, F, T]."""
  return torch.complex(h[:, 0], h[:, 1])


class FIR(nn.Module):
  """FIR-filtered 2x resampling of x [B, C, H, W] -> [B, C, 2H, 2W] (up) or [B, C, H/2, W/2]
  (down), filter outer(k, k) / sum(k)^2 (times 4 up), as SGMSE+'s `upsample_2d` /
  `downsample_2d` over `upfirdn2d_native`: zero insertion, padding, one depthwise 4x4 conv2d at
  the upsampled resolution, then subsampling. With `shifted_sums` the same filter is applied per
  axis as len(k) shifted, scaled slices of the (zero-inserted, padded) map, as cdjax's `_fir` does
  (which skips the inserted zeros: polyphase; same output; `build(config, fir_sums=True)`)."""

  def __init__(self, kernel: Sequence[int], up: bool):
    super().__init__()
    k = np.asarray(kernel, np.float32)
    self.k1 = (k / k.sum() * (2.0 if up else 1.0)).tolist()
    k = np.outer(k, k) / k.sum() ** 2 * (4.0 if up else 1.0)
    self.register_buffer("kernel", torch.from_numpy(np.flip(k).copy())[None, None])
    p = len(kernel) - 2
    self.up, self.pad = up, ((p + 1) // 2 + 1, p // 2) if up else ((p + 1) // 2, p // 2)
    self.shifted_sums = False   # set by build(config, fir_sums=True)

  def _shifted_sums(self, x):
    for dim in (2, 3):
      if self.up:   # zero insertion along dim
        x = torch.stack([x, torch.zeros_like(x)], dim + 1).flatten(dim, dim + 1)
      pad = [0, 0, 0, 0]
      pad[2 * (3 - dim):2 * (3 - dim) + 2] = self.pad
      xp = F.pad(x, pad)
      m = xp.shape[dim] - len(self.k1) + 1
      x = sum(k * xp.narrow(dim, i, m) for i, k in enumerate(self.k1))
      if not self.up:
        x = x[(slice(None),) * dim + (slice(0, None, 2),)]
    return x

  def forward(self, x):
    if self.shifted_sums:
      return self._shifted_sums(x)
    b, c, h, w = x.shape
    x = x.reshape(b * c, 1, h, w)
    if self.up:
      x = F.pad(x.reshape(b * c, 1, h, 1, w, 1), (0, 1, 0, 0, 0, 1)).reshape(b * c, 1, 2 * h, 2 * w)
    x = F.conv2d(F.pad(x, self.pad * 2), self.kernel)
    if not self.up:
      x = x[:, :, ::2, ::2]
    return x.reshape(b, c, *x.shape[2:])


class NCSNResBlock(nn.Module):
  """NCSN++'s BigGAN block, x [B, cin, H, W], temb [B, E] -> [B, out, H', W']: GN-SiLU-[FIR]-
  Conv3x3 + Dense(SiLU(temb)) -GN-SiLU-Conv3x3, a 1x1 shortcut when the shape changes,
  (x + h) / sqrt(2)."""

  def __init__(self, cin: int, out: int, temb_dim: int, resample: str = "none",
               fir_kernel: Sequence[int] = (1, 3, 3, 1)):
    super().__init__()
    self.norm1, self.conv1 = _gn(cin), nn.Conv2d(cin, out, 3, 1, 1)
    self.temb = nn.Linear(temb_dim, out)
    self.norm2, self.conv2 = _gn(out), nn.Conv2d(out, out, 3, 1, 1)
    self.fir = None if resample == "none" else FIR(fir_kernel, resample == "up")
    self.shortcut = nn.Conv2d(cin, out, 1) if cin != out or self.fir is not None else None

  def forward(self, x, temb):
    h = F.silu(self.norm1(x))
    if self.fir is not None:
      h, x = self.fir(h), self.fir(x)
    h = self.conv1(h) + self.temb(F.silu(temb))[:, :, None, None]
    h = self.conv2(F.silu(self.norm2(h)))
    return ((x if self.shortcut is None else self.shortcut(x)) + h) / math.sqrt(2.0)


class NCSNAttention(nn.Module):
  """NCSN++'s single-head self-attention over all positions of x [B, C, H, W]:
  (x + Out(softmax(Q K^T / sqrt C) V)) / sqrt(2), Q, K, V, Out dense maps of GN(x)."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm = _gn(channels)
    self.q, self.k, self.v, self.out = (nn.Linear(channels, channels) for _ in range(4))

  def forward(self, x):
    b, c, hh, ww = x.shape
    tokens = self.norm(x).flatten(2).transpose(1, 2)
    h = F.scaled_dot_product_attention(self.q(tokens), self.k(tokens), self.v(tokens))
    return (x + self.out(h).transpose(1, 2).reshape(b, c, hh, ww)) / math.sqrt(2.0)


class LogitConditioning(nn.Module):
  """h [B, C, F', T'] + gate(temb) * Conv1x1(tile(MLP(LayerNorm(logits [B, K])))) (cdjax
  `LogitConditioning` with one logit vector per item; official `ncsnpp_48k_logits_conditioned`)."""

  def __init__(self, num_classes: int, hidden: int, channels: int, temb: int):
    super().__init__()
    self.norm = nn.LayerNorm(num_classes)
    self.d1, self.d2 = nn.Linear(num_classes, hidden), nn.Linear(hidden, hidden)
    self.conv = nn.Conv2d(hidden, channels, 1)
    self.gate = nn.Sequential(nn.Linear(temb, hidden), nn.SiLU(), nn.Linear(hidden, 1),
                              nn.Sigmoid())

  def forward(self, h, logits, temb):
    e = self.d2(F.silu(self.d1(self.norm(logits))))[:, :, None, None].expand(-1, -1, *h.shape[2:])
    return h + self.gate(temb)[:, :, None, None] * self.conv(e)


class LatentFiLM(nn.Module):
  """Ex-Diff latent integration, mode "film": h [B, C, H, W] * (1 + s) + b with (s, b) =
  Conv1x1(latent [B, C', H', W'] bilinearly resized to H x W)."""

  def __init__(self, latent_channels: int, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(latent_channels, 2 * channels, 1)

  def forward(self, h, latent):
    if latent.shape[2:] != h.shape[2:]:
      latent = F.interpolate(latent, size=h.shape[2:], mode="bilinear")
    scale, shift = self.conv(latent).chunk(2, 1)
    return h * (1 + scale) + shift


class NCSNpp(nn.Module):
  """cdjax `ncsnpp`: net(x_t, t [B], y, logits [B, K], latent [B, C', F', T']) -> complex
  [B, F, T] (the negative score); x_t, y complex [B, F, T], F = `freq_bins`.

  Gaussian Fourier features of log t -> Dense-SiLU-Dense (4 nf); input channels (re, im) of x_t
  and y; per level `num_res_blocks` BigGAN blocks (+ attention where F / 2^i is in
  `attn_resolutions`), FIR downsampling blocks with the input pyramid summed in by 1x1 convs;
  Res-Attn-Res middle, then the logit conditioning; the up path concatenates skips and
  sums an output pyramid (GN-SiLU-Conv3x3 per level, FIR upsampled), divided by t, 1x1 to
  (re, im). The latent's FiLM sits at the end of the down level `latent_level`, by default the
  one whose 2^i is closest (in log2) to the enhancer's total stride `latent_stride`.
  """

  def __init__(self, num_classes: int = 10, freq_bins: int = 256, nf: int = 32,
               ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 1,
               attn_resolutions: Sequence[int] = (32,), fir_kernel: Sequence[int] = (1, 3, 3, 1),
               embedding: str = "fourier", fourier_scale: float = 16.0, fourier_seed: int = 0,
               scale_by_t: bool = True, logit_hidden: int = 64,
               latent_mode: str = "none", latent_level: Optional[int] = None,
               latent_channels: int = 0, latent_stride: Sequence[int] = (1, 1), **unused):
    super().__init__()
    if embedding != "fourier" or latent_mode not in ("none", "film"):
      raise ValueError(f"Only embedding 'fourier' and latent_mode 'none' / 'film' are mirrored, "
                       f"got {embedding!r}, {latent_mode!r}.")
    self.ch_mult, self.num_res_blocks, self.scale_by_t = tuple(ch_mult), num_res_blocks, scale_by_t
    levels, temb = len(ch_mult), 4 * nf
    if latent_level is None:
      latent_level = int(np.argmin([sum(abs(math.log2(s / 2**i)) for s in latent_stride)
                                    for i in range(levels)]))
    self.latent_level = latent_level % levels if latent_mode == "film" else None
    attn = lambda c, i: NCSNAttention(c) if freq_bins // 2**i in attn_resolutions else nn.Identity()
    block = lambda cin, out, resample="none": NCSNResBlock(cin, out, temb, resample, fir_kernel)

    # cdjax's Gaussian Fourier weights, drawn by JAX's generator
    self.register_buffer("fourier_w", fourier_scale * torch.from_numpy(np.array(
        jax.random.normal(jax.random.key(fourier_seed), (nf,)))))
    self.temb = nn.Sequential(nn.Linear(2 * nf, temb), nn.SiLU(), nn.Linear(temb, temb))
    self.conv_in = nn.Conv2d(4, nf, 3, 1, 1)
    self.down, self.fir_down, c, skips = nn.ModuleList(), FIR(fir_kernel, False), nf, [nf]
    for i, mult in enumerate(ch_mult):
      level = nn.ModuleDict(dict(res=nn.ModuleList(), attn=nn.ModuleList()))
      for _ in range(num_res_blocks):
        level.res.append(block(c, nf * mult))
        c = nf * mult
        level.attn.append(attn(c, i))
        skips.append(c)
      if i == self.latent_level:
        level.latent = LatentFiLM(latent_channels, c)
      if i < levels - 1:
        level.sample, level.combine = block(c, c, "down"), nn.Conv2d(4, c, 1)
        skips.append(c)
      self.down.append(level)
    self.mid = nn.ModuleList([block(c, c), NCSNAttention(c), block(c, c)])
    self.logits = LogitConditioning(num_classes, logit_hidden, c, temb)
    self.up, self.fir_up = nn.ModuleList(), FIR(fir_kernel, True)
    for i in reversed(range(levels)):
      level = nn.ModuleDict(dict(res=nn.ModuleList()))
      for _ in range(num_res_blocks + 1):
        level.res.append(block(c + skips.pop(), nf * ch_mult[i]))
        c = nf * ch_mult[i]
      level.attn = attn(c, i)
      level.pyramid = nn.Sequential(_gn(c), nn.SiLU(), nn.Conv2d(c, 4, 3, 1, 1))
      if i > 0:
        level.sample = block(c, c, "up")
      self.up.append(level)
    self.conv_out = nn.Conv2d(4, 2, 1)

  def forward(self, x_t, t, y, logits, latent=None):
    proj = 2 * math.pi * torch.log(t)[:, None] * self.fourier_w[None]
    temb = self.temb(torch.cat([torch.sin(proj), torch.cos(proj)], -1))
    x = pyramid_in = _complex_to_channels(x_t, y)
    hs = [self.conv_in(x)]
    for i, level in enumerate(self.down):
      h = hs[-1]
      for j, (res, attn) in enumerate(zip(level.res, level.attn)):
        h = attn(res(h, temb))
        if i == self.latent_level and j == self.num_res_blocks - 1 and latent is not None:
          h = level.latent(h, latent)
        hs.append(h)
      if "sample" in level:
        pyramid_in = self.fir_down(pyramid_in)
        hs.append(level.sample(h, temb) + level.combine(pyramid_in))
    h = self.mid[2](self.mid[1](self.mid[0](hs[-1], temb)), temb)
    h = self.logits(h, logits, temb)
    pyramid = None
    for level in self.up:
      for res in level.res:
        h = res(torch.cat([h, hs.pop()], 1), temb)
      h = level.attn(h)
      out = level.pyramid(h)
      pyramid = out if pyramid is None else self.fir_up(pyramid) + out
      if "sample" in level:
        h = level.sample(h, temb)
    if self.scale_by_t:
      pyramid = pyramid / t[:, None, None, None]
    return _channels_to_complex(self.conv_out(pyramid))


class ResUNetEnhancer(nn.Module):
  """cdjax `resunet_enhancer`: net(y complex [B, F, T]) -> (x_hat complex [B, F, T], latent
  [B, widths[-1], F / prod(strides_f), T / prod(strides_t)]).

  Encoder level i: `blocks` ResBlocks of widths[i], then (but the last) a ResBlock strided by
  strides[i]; the middle blocks give the latent; decoder level i: nearest resize to the skip,
  Conv3x3, concat the skip, `blocks` ResBlocks; GN-SiLU-Conv3x3 to a complex mask (x_hat = M y)
  or a residual (x_hat = y + D).
  """

  def __init__(self, widths: Sequence[int] = (32, 64, 96),
               strides: Sequence[Sequence[int]] = ((2, 2), (2, 2)), blocks: int = 1,
               groups: int = 8, output: str = "mask", **unused):
    super().__init__()
    self.widths, self.strides, self.output = tuple(widths), tuple(map(tuple, strides)), output
    self.conv_in = nn.Conv2d(2, widths[0], 3, 1, 1)
    self.enc, c = nn.ModuleList(), widths[0]
    for i, w in enumerate(widths):
      level = nn.ModuleList()
      for _ in range(blocks):
        level.append(ResBlock(c, w, groups=groups))
        c = w
      if i < len(self.strides):
        level.append(ResBlock(c, widths[i + 1], stride=self.strides[i], groups=groups))
        c = widths[i + 1]
      self.enc.append(level)
    self.mid = nn.ModuleList([ResBlock(c, c, groups=groups) for _ in range(blocks)])
    self.dec = nn.ModuleList()
    for i in reversed(range(len(self.strides))):
      level = nn.ModuleList([nn.Conv2d(c, widths[i], 3, 1, 1)])
      c = 2 * widths[i]
      for _ in range(blocks):
        level.append(ResBlock(c, widths[i], groups=groups))
        c = widths[i]
      self.dec.append(level)
    self.out_norm = _group_norm(groups, c)
    self.conv_out = nn.Conv2d(c, 2, 3, 1, 1)

  def forward(self, y):
    h, skips = self.conv_in(_complex_to_channels(y)), []
    for i, level in enumerate(self.enc):
      for j, block in enumerate(level):
        if j == len(level) - 1 and i < len(self.strides):
          skips.append(h)
        h = block(h)
    for block in self.mid:
      h = block(h)
    latent = h
    for up, *blocks in self.dec:
      skip = skips.pop()
      h = torch.cat([up(F.interpolate(h, size=skip.shape[2:], mode="nearest")), skip], 1)
      for block in blocks:
        h = block(h)
    out = _channels_to_complex(self.conv_out(F.silu(self.out_norm(h))))
    return (out * y if self.output == "mask" else y + out), latent


class SpeechClassifier(CNNClassifier):
  """cdjax `speech_classifier` on a compressed spectrogram [B, F, T] -> logits [B, K]: decompress
  + iSTFT (torch.istft, periodic Hann, `spec_n_fft` / `spec_hop_length`) to (T - 1) * hop
  samples, scaled to peak `input_peak`; log-mel (torch.stft zero-padded, power, cdjax's librosa
  filterbank, log(+1e-6)) as a map [B, 1, frames, n_mels]; ConvEncoder -> mean -> Linear."""

  def __init__(self, num_classes: int = 10, width: int = 32, depth: int = 3, groups: int = 8,
               sample_rate: int = audio.SAMPLE_RATE, n_fft: int = 512, hop_length: int = 160,
               n_mels: int = 64, input_peak: float = 0.0, spec_n_fft: int = audio.N_FFT,
               spec_hop_length: int = audio.HOP_LENGTH, spec_alpha: float = audio.ALPHA,
               spec_beta: float = audio.BETA, **unused):
    super().__init__(1, num_classes, width, depth, groups)
    self.n_fft, self.hop, self.peak = n_fft, hop_length, input_peak
    self.spec_n_fft, self.spec_hop, self.alpha, self.beta = (spec_n_fft, spec_hop_length,
                                                             spec_alpha, spec_beta)
    self.register_buffer("mel", torch.from_numpy(audio.mel_filterbank(sample_rate, n_fft, n_mels)))
    self.register_buffer("window", torch.from_numpy(audio.hann_window(n_fft)))
    self.register_buffer("spec_window", torch.from_numpy(audio.hann_window(spec_n_fft)))

  def log_mel(self, spec):
    """Compressed spectrogram [B, F, T] -> log-mel map [B, 1, frames, n_mels]."""
    c = spec / self.beta
    c = c * c.abs() ** (1 / self.alpha - 1)
    wave = torch.istft(c, self.spec_n_fft, self.spec_hop, window=self.spec_window,
                       length=audio.frames_to_samples(spec.shape[-1], self.spec_hop))
    if self.peak > 0:
      wave = wave * (self.peak / wave.abs().amax(-1, keepdim=True).clamp_min(1e-8))
    power = torch.stft(wave, self.n_fft, self.hop, window=self.window, pad_mode="constant",
                       return_complex=True).abs() ** 2
    return torch.log(self.mel @ power + 1e-6).transpose(1, 2)[:, None]

  def forward(self, spec):
    return super().forward(self.log_mel(spec))


class SpeechLogitNet(LogitNet):
  """cdjax `speech_logit_net`: net(l_t [B, K], t [B], cond_logits [B, K], c complex [B, F, T]) ->
  eps [B, K]; the image `LogitNet` on |c| average-pooled by `pool` ([B, 1, F / pf, T / pt]),
  time embedding of `time_scale * t`."""

  def __init__(self, num_classes: int = 10, hidden: int = 128, depth: int = 2, heads: int = 4,
               enc_width: int = 16, enc_depth: int = 3, groups: int = 8,
               pool: Sequence[int] = (8, 8), time_scale: float = 1000.0, **unused):
    super().__init__(1, num_classes, hidden, depth, heads, enc_width, enc_depth, groups)
    self.pool, self.time_scale = tuple(pool), time_scale

  def forward(self, l_t, t, cond_logits, cond_signal):
    signal = F.avg_pool2d(cond_signal.abs()[:, None], self.pool, self.pool, ceil_mode=True)
    return super().forward(l_t, self.time_scale * t, cond_logits, signal)


def build(config, fir_sums: bool = False):
  """(NCSNpp, ResUNetEnhancer, SpeechLogitNet, SpeechClassifier) at the sizes of a speech config
  (`configs/speech_keywords.py`), in eval mode; `fir_sums`: NCSN++'s FIR as shifted sums."""
  enhancer = ResUNetEnhancer(**dict(config.enhancer.net_kwargs)).eval()
  score_net = NCSNpp(config.data.num_classes, config.audio.n_fft // 2 + 1,
                     latent_channels=enhancer.widths[-1],
                     latent_stride=np.prod(enhancer.strides, axis=0).tolist(),
                     **dict(config.signal.net_kwargs)).eval()
  logit_net = SpeechLogitNet(**dict(config.logits.net_kwargs)).eval()
  classifier = SpeechClassifier(**dict(config.classifier.net_kwargs)).eval()
  for m in score_net.modules():
    if isinstance(m, FIR):
      m.shifted_sums = fir_sums
  return score_net, enhancer, logit_net, classifier


# ---- the OUVE SDE and the official-style Parallel loop ------------------------------------------
class OUVE:
  """cdjax `sde.OUVE` at scalar times: marginal x_t = a x0 + (1 - a) y + std z, a = exp(-theta t),
  std^2 = smin^2 (exp(2 (theta + L) t) - 1) exp(-2 theta t) L / (theta + L), L = log(smax/smin);
  g(t) = smin (smax/smin)^t sqrt(2 L); timesteps linspace(T, t_eps, N) then 0."""

  def __init__(self, theta=1.5, sigma_min=0.05, sigma_max=0.5, N=30, t_eps=0.03, T=1.0):
    self.theta, self.smin, self.smax, self.N = theta, sigma_min, sigma_max, N
    self.L = math.log(sigma_max / sigma_min)
    self.timesteps = np.append(np.linspace(T, t_eps, N), 0.0).astype(np.float32).tolist()

  def coeffs(self, t: float):
    th, L = self.theta, self.L
    var = self.smin**2 * math.expm1(2 * (th + L) * t) * math.exp(-2 * th * t) * L / (th + L)
    return math.exp(-th * t), math.sqrt(var)

  def score(self, out, t: float, parameterization: str):
    """Score from a network output: 'eps' (-out / std) or 'neg_score' (-out)."""
    return -out / self.coeffs(t)[1] if parameterization == "eps" else -out

  def x0(self, x, score, t: float, y):
    """Tweedie (x + std^2 score - (1 - a) y) / a."""
    a, std = self.coeffs(t)
    return (x + std**2 * score - (1 - a) * y) / a

  def reverse_diffusion(self, x, t: float, t_next: float, score, y):
    """x_mean = x - [theta (y - x) - g^2 score] dt, x = x_mean + g sqrt(dt) z: (x, x_mean)."""
    dt = t - t_next
    g = self.smin * (self.smax / self.smin) ** t * math.sqrt(2 * self.L * dt)
    x_mean = x - (self.theta * (y - x) * dt - g**2 * score)
    return x_mean + g * tr.randn_like(x), x_mean


class ParallelSampler:
  """cdjax's Parallel strategy in the speech setting (`parallel_order` signal_first,
  `initial_logits` classifier, `cond_source` clean), written as the official code runs it: a
  Python loop of eager calls. Per step 2 score-net calls (annealed Langevin corrector, then the
  reverse-diffusion predictor), 2 logit-net calls (the same) and, after the switch, 1 classifier
  call; the enhancer's latent of y and f(y) are computed once."""

  def __init__(self, score_net: NCSNpp, enhancer: ResUNetEnhancer, logit_net: SpeechLogitNet,
               classifier: SpeechClassifier, config):
    self.score_net, self.enhancer, self.logit_net, self.classifier = (score_net, enhancer,
                                                                      logit_net, classifier)
    s, l, cfg = config.signal, config.logits, config.sampling
    self.signal_sde, self.logits_sde = OUVE(**s.sde_kwargs), OUVE(**l.sde_kwargs)
    self.signal_param, self.logits_param = s.parameterization, l.parameterization
    self.std, self.snr, self.n_corrector = l.standardize_std, cfg.snr, cfg.n_corrector
    self.switch = int(round(s.sde_kwargs.N * (1.0 - cfg.switch_t)))

  def class_logits(self, x):
    return standardize_logits(self.classifier(x), self.std)

  def signal_step(self, x, t, t_next, y, latent, l0_hat):
    """Corrector then predictor from t to t_next on x [B, F, T]: (x, x_mean, x0_hat)."""
    sde, t_b = self.signal_sde, torch.full((x.shape[0],), t, device=x.device)
    score_fn = lambda x: sde.score(self.score_net(x, t_b, y, l0_hat, latent), t, self.signal_param)
    x = self.correct(x, t, sde, score_fn)
    score = score_fn(x)
    return (*sde.reverse_diffusion(x, t, t_next, score, y), sde.x0(x, score, t, y))

  def correct(self, x, t: float, sde, score_fn):
    """n_corrector annealed Langevin steps of x at t, eps = 2 (snr std(t))^2."""
    eps = 2 * (self.snr * sde.coeffs(t)[1]) ** 2
    for _ in range(self.n_corrector):
      x = x + eps * score_fn(x) + math.sqrt(2 * eps) * tr.randn_like(x)
    return x

  def logits_step(self, l, t, t_next, cond_signal, cond_logits):
    """Corrector then reverse diffusion of the logit OUVE (reverting to cond_logits) on l [B, K]:
    (l, l_mean, standardised l0_hat)."""
    sde, t_b = self.logits_sde, torch.full((l.shape[0],), t, device=l.device)
    score_fn = lambda l: sde.score(self.logit_net(l, t_b, cond_logits, cond_signal), t,
                                   self.logits_param)
    l = self.correct(l, t, sde, score_fn)
    score = score_fn(l)
    l0_hat = standardize_logits(sde.x0(l, score, t, cond_logits), self.std)
    return (*sde.reverse_diffusion(l, t, t_next, score, cond_logits), l0_hat)

  @torch.no_grad()
  def __call__(self, y):
    """y complex64 [B, F, T] -> (x0 [B, F, T], logits [B, K], f(x0) [B, K])."""
    latent = self.enhancer(y)[1]
    f_y = self.class_logits(y)
    ts_x, ts_l = self.signal_sde.timesteps, self.logits_sde.timesteps
    x = y + self.signal_sde.coeffs(ts_x[0])[1] * tr.randn_like(y)
    l = f_y + self.logits_sde.coeffs(ts_l[0])[1] * tr.randn_like(f_y)
    l0_hat = f_y
    for i in range(self.signal_sde.N):
      before_switch = i < self.switch
      x, x_mean, x0_hat = self.signal_step(x, ts_x[i], ts_x[i + 1], y, latent,
                                           f_y if before_switch else l0_hat)
      c, f_c = (y, f_y) if before_switch else (x0_hat, self.class_logits(x0_hat))
      l, l_mean, l0_hat = self.logits_step(l, ts_l[i], ts_l[i + 1], c, f_c)
    return x_mean, l_mean, self.classifier(x_mean)
