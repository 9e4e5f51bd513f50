"""PyTorch eager reference of the cdjax image networks and the coupled Parallel sampler, for the
benchmarks of issue 8 (`bench_sampler.py`, `bench_train.py`). Not part of the library.

The modules mirror `cdjax.nets` layer for layer (same convolutions with flax's "SAME" padding,
GroupNorm/LayerNorm with flax's eps, FiLM, attention projections, skips), and register their
parameters in the order flax creates them: `load_flax_params` copies cdjax's weights in, and
`check_torch_reference.py` checks that both compute the same outputs. The benchmarks time them with
random weights (throughput does not depend on them). Layout is NCHW, as a PyTorch user would write
it. The sampler is the official coupled-diffusion style: a Python `for` loop over DDPM steps, per
step the logit step (posterior mean of q(l_s | l_t, l0_hat), re-standardised l0_hat) and then the
ancestral signal step conditioned on the l0_hat just computed.

Needs the `bench` extra: `pip install torch==2.13.0`.
"""
import math
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def _groups(groups: int, channels: int) -> int:
  return math.gcd(groups, channels)


def _group_norm(groups: int, channels: int) -> nn.GroupNorm:
  """cdjax's `group_norm`: gcd(groups, C) groups, flax's eps 1e-6."""
  return nn.GroupNorm(_groups(groups, channels), channels, eps=1e-6)


class Conv2d(nn.Conv2d):
  """A kxk convolution (k odd) with flax's "SAME" padding: strided ones pad TensorFlow-style
  (a stride-2 3x3 convolution of an even size pads 0 before and 1 after, not 1 and 1)."""

  def __init__(self, cin: int, features: int, kernel: int, stride=1):
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    super().__init__(cin, features, kernel, stride, 0 if max(stride) > 1 else kernel // 2)

  def forward(self, x):
    if max(self.stride) > 1:
      pad = []
      for n, k, s in reversed(list(zip(x.shape[2:], self.kernel_size, self.stride))):
        total = max((-(-n // s) - 1) * s + k - n, 0)
        pad += [total // 2, total - total // 2]
      x = F.pad(x, pad)
    return super().forward(x)


class TimeEmbedding(nn.Module):
  """Sinusoidal features of t [B] -> Dense-SiLU-Dense [B, dim] (cdjax `TimeEmbedding`, steps=0)."""

  def __init__(self, dim: int):
    super().__init__()
    self.dim = dim
    self.l1, self.l2 = nn.Linear(dim, dim), nn.Linear(dim, dim)

  def forward(self, t):
    half = self.dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / half)
    args = t.float()[:, None] * freqs[None]
    h = torch.cat([torch.sin(args), torch.cos(args)], -1)
    return self.l2(F.silu(self.l1(h)))


class FiLM(nn.Module):
  def __init__(self, emb_dim: int, features: int):
    super().__init__()
    self.proj = nn.Linear(emb_dim, 2 * features)

  def forward(self, h, emb):   # h [B, C, H, W] or [B, C]
    scale, shift = self.proj(F.silu(emb)).chunk(2, -1)
    expand = (slice(None), slice(None)) + (None,) * (h.ndim - 2)
    return h * (1.0 + scale[expand]) + shift[expand]


class ConvBlock(nn.Module):
  def __init__(self, cin: int, features: int, stride: int = 1, groups: int = 8):
    super().__init__()
    self.conv = Conv2d(cin, features, 3, stride)
    self.norm = _group_norm(groups, features)

  def forward(self, x):
    return F.silu(self.norm(self.conv(x)))


class ConvEncoder(nn.Module):
  def __init__(self, cin: int, width: int = 32, depth: int = 3, max_mult: int = 4, groups: int = 8):
    super().__init__()
    layers, c = [ConvBlock(cin, width, groups=groups)], width
    for i in range(depth):
      f = width * min(2**i, max_mult)
      layers += [ConvBlock(c, f, groups=groups), ConvBlock(f, f, 2, groups)]
      c = f
    self.layers, self.out_channels = nn.Sequential(*layers), c

  def forward(self, x):
    return self.layers(x)


class ResBlock(nn.Module):
  def __init__(self, cin: int, features: int, emb_dim: Optional[int] = None, stride: int = 1,
               groups: int = 8):
    super().__init__()
    self.norm1 = _group_norm(groups, cin)
    self.conv1 = Conv2d(cin, features, 3, stride)
    self.film = FiLM(emb_dim, features) if emb_dim else None
    self.norm2 = _group_norm(groups, features)
    self.conv2 = nn.Conv2d(features, features, 3, 1, 1)
    self.shortcut = (Conv2d(cin, features, 1, stride) if cin != features or stride != 1
                     else None)

  def forward(self, x, emb=None):
    h = self.conv1(F.silu(self.norm1(x)))
    if self.film is not None:
      h = self.film(h, emb)
    h = self.conv2(F.silu(self.norm2(h)))
    return (x if self.shortcut is None else self.shortcut(x)) + h


class Attention(nn.Module):
  """Flax `MultiHeadDotProductAttention(out_features=dim)`: q/k/v projections to dim, out proj."""

  def __init__(self, dim: int, kv_dim: int, heads: int):
    super().__init__()
    self.heads = heads
    self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(kv_dim, dim), nn.Linear(kv_dim, dim)
    self.out = nn.Linear(dim, dim)

  def forward(self, q, kv):   # [B, N, D], [B, M, Dk]
    b, n, d = q.shape
    split = lambda t: t.view(b, -1, self.heads, d // self.heads).transpose(1, 2)
    h = F.scaled_dot_product_attention(split(self.q(q)), split(self.k(kv)), split(self.v(kv)))
    return self.out(h.transpose(1, 2).reshape(b, n, d))


class AttentionBlock(nn.Module):
  """x + Attn(GN(x), context); x a feature map [B, C, H, W] or tokens [B, N, D]."""

  def __init__(self, dim: int, heads: int = 4, groups: int = 8, kv_dim: Optional[int] = None):
    super().__init__()
    self.norm = _group_norm(groups, dim)
    self.attn = Attention(dim, kv_dim or dim, heads)

  def forward(self, x, context=None):
    if x.ndim == 4:
      b, c, hh, ww = x.shape
      tokens = x.flatten(2).transpose(1, 2)
    else:
      tokens = x
    q = self.norm(tokens.transpose(1, 2)).transpose(1, 2)
    h = self.attn(q, q if context is None else context)
    if x.ndim == 4:
      h = h.transpose(1, 2).reshape(b, c, hh, ww)
    return x + h


class UNetEncoder(nn.Module):
  def __init__(self, cin: int, width: int, ch_mult: Sequence[int], num_res_blocks: int,
               attn_levels: Sequence[int], emb_dim: Optional[int], heads: int, groups: int):
    super().__init__()
    self.stem = nn.Conv2d(cin, width, 3, 1, 1)
    self.blocks, self.skip_channels, c = nn.ModuleList(), [width], width
    for level, mult in enumerate(ch_mult):
      for _ in range(num_res_blocks):
        f = width * mult
        self.blocks.append(ResBlock(c, f, emb_dim, groups=groups))
        c = f
        if level in attn_levels:
          self.blocks.append(AttentionBlock(c, heads, groups))
        self.blocks.append(None)   # marks "append a skip"
        self.skip_channels.append(c)
      if level < len(ch_mult) - 1:
        self.blocks.append(Conv2d(c, c, 3, 2))
        self.blocks.append(None)
        self.skip_channels.append(c)

  def forward(self, x, emb=None):
    h = self.stem(x)
    skips = [h]
    for block in self.blocks:
      if block is None:
        skips.append(h)
      elif isinstance(block, ResBlock):
        h = block(h, emb)
      else:
        h = block(h)
    return skips


class CoupledUNet(nn.Module):
  """cdjax `coupled_unet`: net(x_t [B, C, H, W], t [B], y, logits [B, K]) -> eps [B, C, H, W]."""

  def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32,
               ch_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1,
               attn_levels: Sequence[int] = (2,), heads: int = 4, groups: int = 8, **unused):
    super().__init__()
    self.ch_mult, self.num_classes = tuple(ch_mult), num_classes
    emb = 4 * width
    self.time = TimeEmbedding(emb)
    enc = dict(width=width, ch_mult=ch_mult, num_res_blocks=num_res_blocks,
               attn_levels=attn_levels, heads=heads, groups=groups)
    self.enc_x = UNetEncoder(channels, emb_dim=emb, **enc)
    self.enc_y = UNetEncoder(channels, emb_dim=None, **enc)
    self.enc_l = UNetEncoder(num_classes + 1, emb_dim=None, **enc)
    skips = [3 * c for c in self.enc_x.skip_channels]
    mid = width * ch_mult[-1]
    self.mid = nn.ModuleList([ResBlock(skips[-1], mid, emb, groups=groups),
                              AttentionBlock(mid, heads, groups),
                              ResBlock(mid, mid, emb, groups=groups)])
    self.up, c = nn.ModuleList(), mid
    for level in reversed(range(len(ch_mult))):
      for _ in range(num_res_blocks + 1):
        f = width * ch_mult[level]
        self.up.append(ResBlock(c + skips.pop(), f, emb, groups=groups))
        c = f
        if level in attn_levels:
          self.up.append(AttentionBlock(c, heads, groups))
      if level > 0:
        self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.up.append(nn.Conv2d(c, c, 3, 1, 1))
    self.out_norm = _group_norm(groups, c)
    self.out_conv = nn.Conv2d(c, channels, 3, 1, 1)

  def forward(self, x_t, t, y, logits):
    b, _, height, width = x_t.shape
    factor = 2 ** (len(self.ch_mult) - 1)
    pad = (0, -width % factor, 0, -height % factor)
    x_t, y = F.pad(x_t, pad), F.pad(y, pad)
    logits = torch.cat([logits, torch.ones_like(logits[:, :1])], 1)   # + a ones channel
    logit_map = logits[:, :, None, None].expand(-1, -1, *x_t.shape[2:])
    emb = self.time(t)
    skips = [torch.cat(s, 1) for s in zip(self.enc_x(x_t, emb), self.enc_y(y), self.enc_l(logit_map))]
    h = self.mid[0](skips[-1], emb)
    h = self.mid[1](h)
    h = self.mid[2](h, emb)
    for block in self.up:
      if isinstance(block, ResBlock):
        h = block(torch.cat([h, skips.pop()], 1), emb)
      else:
        h = block(h)
    h = self.out_conv(F.silu(self.out_norm(h)))
    return h[:, :, :height, :width]


class LogitBlock(nn.Module):
  def __init__(self, hidden: int, ctx_dim: int, heads: int, groups: int):
    super().__init__()
    self.ln = nn.LayerNorm(hidden, eps=1e-6)
    self.d1 = nn.Linear(hidden, hidden)
    self.film = FiLM(hidden, hidden)
    self.d2 = nn.Linear(hidden, hidden)
    self.attn = AttentionBlock(hidden, heads, groups, kv_dim=ctx_dim)

  def forward(self, h, emb, context):
    r = F.silu(self.film(self.d1(F.silu(self.ln(h))), emb))
    h = h + self.d2(r)
    return self.attn(h[:, None, :], context)[:, 0]


class LogitNet(nn.Module):
  """cdjax `logit_net`: net(l_t [B, K], t [B], cond_logits [B, K], cond_signal [B, C, H, W])."""

  def __init__(self, channels: int = 1, num_classes: int = 10, hidden: int = 256, depth: int = 3,
               heads: int = 4, enc_width: int = 16, enc_depth: int = 3, groups: int = 8, **unused):
    super().__init__()
    self.time = TimeEmbedding(hidden)
    self.enc = ConvEncoder(channels, enc_width, enc_depth, groups=groups)
    self.inp = nn.Linear(2 * num_classes, hidden)
    self.blocks = nn.ModuleList([LogitBlock(hidden, self.enc.out_channels, heads, groups)
                                 for _ in range(depth)])
    self.ln, self.out = nn.LayerNorm(hidden, eps=1e-6), nn.Linear(hidden, num_classes)

  def forward(self, l_t, t, cond_logits, cond_signal):
    emb = self.time(t)
    context = self.enc(cond_signal).flatten(2).transpose(1, 2)
    h = self.inp(torch.cat([l_t, cond_logits], -1))
    for block in self.blocks:
      h = block(h, emb, context)
    return self.out(F.silu(self.ln(h)))


class CNNClassifier(nn.Module):
  def __init__(self, channels: int = 1, num_classes: int = 10, width: int = 32, depth: int = 3,
               groups: int = 8, **unused):
    super().__init__()
    self.enc = ConvEncoder(channels, width, depth, groups=groups)
    self.out = nn.Linear(self.enc.out_channels, num_classes)

  def forward(self, x):
    return self.out(self.enc(x).mean((2, 3)))


# ---- the DDPM schedule and the official-style Parallel loop -------------------------------------
def cosine_alphas_cumprod(n: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
  steps = np.arange(n + 1, dtype=np.float64) / n
  abar = np.cos((steps + s) / (1 + s) * np.pi / 2) ** 2
  betas = np.clip(1.0 - abar[1:] / abar[:-1], 0.0, max_beta)
  return torch.tensor(np.cumprod(1.0 - betas), dtype=torch.float32)


def randn_like(x):
  """N(0, 1) noise shaped like x (complex: E|z|^2 = 1): every draw of both reference samplers, so
  `check_torch_reference.py` can replace it, as it replaces cdjax's `sde.normal`."""
  return torch.randn_like(x)


def standardize_logits(logits, std: float = 0.8):
  centred = logits - logits.mean(-1, keepdim=True)
  return std * centred / (centred.std(-1, keepdim=True, unbiased=False) + 1e-6)


def _posterior(abar, t: int, x, x0_hat, eta: float):
  """DDIM/DDPM posterior step from index t to t-1 (t = 0 -> clean): (mean, sigma)."""
  a_t, std_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
  abar_s = abar[t - 1] if t > 0 else abar.new_tensor(1.0)
  a_s, std_s = abar_s.sqrt(), (1 - abar_s).sqrt()
  eps_hat = (x - a_t * x0_hat) / std_t
  post_var = (std_t**2 - (a_t / a_s) ** 2 * std_s**2) * std_s**2 / std_t**2
  sigma = eta * post_var.clamp_min(0).sqrt()
  return a_s * x0_hat + (std_s**2 - sigma**2).clamp_min(0).sqrt() * eps_hat, sigma


class ParallelSampler:
  """The coupled Parallel sampler as the official code runs it: a Python loop, per step the logit
  step (conditioned on y before `switch`, then on the signal's x0_hat) and the signal step."""

  def __init__(self, unet: CoupledUNet, logit_net: LogitNet, classifier: CNNClassifier,
               n: int = 50, switch_t: float = 0.5, logits_std: float = 0.8):
    self.unet, self.logit_net, self.classifier = unet, logit_net, classifier
    self.n, self.switch, self.std = n, int(round(n * (1 - switch_t))), logits_std
    self.abar = cosine_alphas_cumprod(n)

  def class_logits(self, x):
    return standardize_logits(self.classifier(x), self.std)

  @torch.no_grad()
  def __call__(self, y):
    b, k = y.shape[0], self.logit_net.out.out_features
    abar = self.abar.to(y.device)
    std_T = (1 - abar[-1]).sqrt()
    x = std_T * randn_like(y)
    l = std_T * randn_like(y.new_empty(b, k))
    x0_hat, f_y = y, self.class_logits(y)   # f(y): once, as cdjax (and the speech reference)
    for i in range(self.n):
      t = self.n - 1 - i
      t_b = torch.full((b,), float(t), device=y.device)
      a_t, std_t = abar[t].sqrt(), (1 - abar[t]).sqrt()
      # logit step: posterior mean, no noise (the official "DDIM" flag)
      c, cond_logits = (x0_hat, self.class_logits(x0_hat)) if i >= self.switch else (y, f_y)
      eps = self.logit_net(l, t_b, cond_logits, c)
      l0_hat = standardize_logits((l - std_t * eps) / a_t, self.std)
      l, _ = _posterior(abar, t, l, l0_hat, 1.0)
      # signal step: ancestral, x0_hat clipped
      eps = self.unet(x, t_b, y, l0_hat)
      x0_hat = ((x - std_t * eps) / a_t).clamp(-1, 1)
      x_mean, sigma = _posterior(abar, t, x, x0_hat, 1.0)
      x = x_mean + sigma * randn_like(x)
    return x_mean, l, self.classifier(x_mean)


def build(config, channels: int = 1):
  """(CoupledUNet, LogitNet, CNNClassifier) at the sizes of a cdjax config, in eval mode."""
  unet = CoupledUNet(channels, **dict(config.signal.net_kwargs)).eval()
  logit_net = LogitNet(channels, **dict(config.logits.net_kwargs)).eval()
  classifier = CNNClassifier(channels, **dict(config.classifier.net_kwargs)).eval()
  return unet, logit_net, classifier


def count_flops(fn, *args) -> int:
  """FLOPs (2 per multiply-add) of the matmuls/convolutions of one call, by torch's
  FlopCounterMode (it counts the same ops a hand count would: conv, addmm, bmm, sdpa)."""
  from torch.utils.flop_counter import FlopCounterMode
  with FlopCounterMode(display=False) as counter, torch.no_grad():
    fn(*args)
  return counter.get_total_flops()


def load_flax_params(module: nn.Module, leaves: Sequence[np.ndarray]) -> nn.Module:
  """Copies flax arrays into `module`'s parameters, matched by position with `named_parameters()`
  (the modules here register them in the order flax creates its own): conv kernels
  [kh, kw, in, out] -> [out, in, kh, kw], dense kernels [in..., out...] -> [out, in], the rest
  reshaped (attention biases [heads, head_dim] -> [dim]). Returns `module`."""
  named = list(module.named_parameters())
  if len(named) != len(leaves):
    raise ValueError(f"{type(module).__name__}: {len(named)} torch parameters, {len(leaves)} flax "
                     "arrays; the modules no longer mirror each other.")
  with torch.no_grad():
    for (name, p), a in zip(named, leaves):
      a = np.array(a, np.float32)
      if a.ndim == 4:
        a = a.transpose(3, 2, 0, 1)
      elif p.ndim == 2 and a.size == p.numel():
        a = a.reshape(-1, p.shape[0]).T
      if a.size != p.numel() or (a.ndim == p.ndim and a.shape != tuple(p.shape)):
        raise ValueError(f"{type(module).__name__}.{name}: torch shape {tuple(p.shape)}, flax "
                         f"array {a.shape} at the same position; the modules no longer mirror "
                         "each other.")
      p.copy_(torch.from_numpy(np.ascontiguousarray(a)).reshape(p.shape))
  return module


def count_params(module: nn.Module) -> int:
  return sum(p.numel() for p in module.parameters())
