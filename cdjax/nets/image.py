"""Image networks: classifiers f(x) -> logits and the coupled U-Net signal branch.

All take images in [-1, 1], NHWC. Dropout (off by default) is active only with `train=True`
and then needs the `dropout` rng.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cdjax.nets import NETWORKS
from cdjax.nets.layers import (AttentionBlock, ConvEncoder, ResBlock, TimeEmbedding, batch_time,
                               check_shape, downsample, group_norm, maybe_remat, upsample)


def _check_image(name: str, net: str, x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"{net}: {name} must be an image batch [B, H, W, C], got shape "
                     f"{list(x.shape)}.")


@NETWORKS.register("cnn_classifier")
class CNNClassifier(nn.Module):
  """x [B, H, W, C] -> logits [B, num_classes]: ConvEncoder -> global mean pool -> Dense."""
  num_classes: int = 10
  width: int = 32
  depth: int = 3
  dropout: float = 0.0
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_image("x", "cnn_classifier", x)
    h = ConvEncoder(self.width, self.depth, groups=self.groups)(x).mean(axis=(1, 2))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    return nn.Dense(self.num_classes)(h)


@NETWORKS.register("resnet_classifier")
class ResNetClassifier(nn.Module):
  """Pre-activation ResNet, x [B, H, W, C] -> logits [B, num_classes].

  Stem conv, then stage i: `blocks[i]` ResBlocks of width `widths[i]` (the first strided by 2
  for i > 0), then GN-SiLU, global mean pool, Dense.
  """
  num_classes: int = 10
  widths: Sequence[int] = (32, 64, 128)
  blocks: Sequence[int] = (2, 2, 2)
  dropout: float = 0.0
  groups: int = 8
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    _check_image("x", "resnet_classifier", x)
    if len(self.widths) != len(self.blocks):
      raise ValueError(f"resnet_classifier: widths {tuple(self.widths)} and blocks "
                       f"{tuple(self.blocks)} must have the same length.")
    block = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    h = nn.Conv(self.widths[0], (3, 3))(x)
    for i, (width, n) in enumerate(zip(self.widths, self.blocks)):
      for j in range(n):
        stride = 2 if i > 0 and j == 0 else 1
        h = block(width, stride, self.dropout, self.groups, name=f"stage{i}_block{j}")(
            h, None, train)
    h = nn.silu(group_norm(h, self.groups)).mean(axis=(1, 2))
    return nn.Dense(self.num_classes)(h)


class UNetEncoder(nn.Module):
  """The U-Net's down path: x [B, H, W, C], emb [B, E] or None -> skips.

  Skips are the stem output, each ResBlock (+ attention) output and each downsample output,
  in order; the last one is the bottleneck `[B, H/2^(L-1), W/2^(L-1), width * ch_mult[-1]]`.
  """
  width: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  attn_levels: Sequence[int]
  dropout: float
  heads: int
  groups: int
  remat: bool

  @nn.compact
  def __call__(self, x: jax.Array, emb: Optional[jax.Array], train: bool) -> list[jax.Array]:
    res = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    attn = maybe_remat(AttentionBlock, self.remat)
    h = nn.Conv(self.width, (3, 3))(x)
    skips = [h]
    for level, mult in enumerate(self.ch_mult):
      for j in range(self.num_res_blocks):
        h = res(self.width * mult, 1, self.dropout, self.groups, name=f"down{level}_res{j}")(
            h, emb, train)
        if level in self.attn_levels:
          h = attn(self.heads, self.groups, name=f"down{level}_attn{j}")(h)
        skips.append(h)
      if level < len(self.ch_mult) - 1:
        h = downsample(h)
        skips.append(h)
    return skips


@NETWORKS.register("coupled_unet")
class CoupledUNet(nn.Module):
  """Signal branch of the coupled model (official image design): eps-prediction U-Net.

  net(x_t [B, H, W, C], t [B] or scalar, y [B, H, W, C], logits [B, K]) -> eps [B, H, W, C].
  Three UNetEncoders (same module, separate params) see x_t (with the time embedding), y, and
  the logits broadcast to K constant channels plus a ones channel [B, H, W, K + 1]; their skips are concatenated
  level by level, the bottleneck goes through Res-Attn-Res and the decoder mirrors the
  encoders (num_res_blocks + 1 ResBlocks per level, each consuming one concatenated skip).
  Time: `TimeEmbedding(4 * width, time_steps)` (time_steps = 0: sinusoidal + MLP, any t).
  H and W that do not divide 2^(len(ch_mult) - 1) are zero-padded up and the output cropped.
  `attn_levels` are indices into `ch_mult` (resolution-independent, unlike score_sde's
  `attn_resolutions`).
  """
  num_classes: int = 10
  width: int = 32
  ch_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 1
  attn_levels: Sequence[int] = (2,)
  dropout: float = 0.0
  heads: int = 4
  groups: int = 8
  time_steps: int = 0
  remat: bool = False

  @nn.compact
  def __call__(self, x_t: jax.Array, t: jax.Array, y: jax.Array, logits: jax.Array,
               latent: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    if latent is not None:
      raise ValueError("coupled_unet: images have no latent; call with latent=None.")
    _check_image("x_t", "coupled_unet", x_t)
    b, height, width, _ = x_t.shape
    check_shape("coupled_unet: y", y, x_t.shape)
    check_shape("coupled_unet: logits", logits, (b, self.num_classes))

    factor = 2 ** (len(self.ch_mult) - 1)
    pad = [(0, 0), (0, -height % factor), (0, -width % factor), (0, 0)]
    x_t, y = jnp.pad(x_t, pad), jnp.pad(y, pad)
    # K constant channels, plus a constant ones channel: with all-zero logits (pre-training) the
    # encoder's GroupNorms would otherwise see zero variance and blow its gradients up (~1e11).
    logits = jnp.concatenate([logits, jnp.ones_like(logits[:, :1])], axis=-1).astype(x_t.dtype)
    logit_map = jnp.broadcast_to(logits[:, None, None, :], x_t.shape[:3] + (self.num_classes + 1,))

    emb = TimeEmbedding(4 * self.width, self.time_steps)(batch_time(t, b))
    encoder = dict(width=self.width, ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                   attn_levels=self.attn_levels, dropout=self.dropout, heads=self.heads,
                   groups=self.groups, remat=self.remat)
    skips = [jnp.concatenate(s, axis=-1) for s in zip(
        UNetEncoder(**encoder, name="enc_x")(x_t, emb, train),
        UNetEncoder(**encoder, name="enc_y")(y, None, train),
        UNetEncoder(**encoder, name="enc_logits")(logit_map, None, train))]

    res = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    attn = maybe_remat(AttentionBlock, self.remat)
    mid = self.width * self.ch_mult[-1]
    h = res(mid, 1, self.dropout, self.groups, name="mid_res0")(skips[-1], emb, train)
    h = attn(self.heads, self.groups, name="mid_attn")(h)
    h = res(mid, 1, self.dropout, self.groups, name="mid_res1")(h, emb, train)
    for level in reversed(range(len(self.ch_mult))):
      for j in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(self.width * self.ch_mult[level], 1, self.dropout, self.groups,
                name=f"up{level}_res{j}")(h, emb, train)
        if level in self.attn_levels:
          h = attn(self.heads, self.groups, name=f"up{level}_attn{j}")(h)
      if level > 0:
        h = upsample(h)
    h = nn.Conv(x_t.shape[-1], (3, 3))(nn.silu(group_norm(h, self.groups)))
    return h[:, :height, :width, :]
