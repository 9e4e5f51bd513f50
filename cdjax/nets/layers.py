"""Shared building blocks for cdjax networks: time embeddings, FiLM, conv/res blocks, attention.

Conventions: images are NHWC (`[B, H, W, C]`), token sequences `[B, N, D]`; normalisation is
GroupNorm (never BatchNorm), so every model holds `params` only. Blocks that use dropout take
`train` (default False; dropout then needs the `dropout` rng). Blocks take their optional
arguments positionally so that `maybe_remat` can wrap them.
"""
import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np


def count_params(params) -> int:
  """Total number of scalars in a params pytree (arrays or `jax.ShapeDtypeStruct`s)."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(params))


def check_shape(name: str, x, expected: Sequence[Optional[int]]) -> None:
  """Raises a ValueError naming `name` unless `x.shape` matches `expected` (None: any size)."""
  shape = tuple(np.shape(x))
  ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
  if not ok:
    want = "[" + ", ".join("?" if e is None else str(e) for e in expected) + "]"
    raise ValueError(f"{name}: expected shape {want}, got {list(shape)}.")


def batch_time(t, batch: int) -> jax.Array:
  """Time `t` (a scalar or `[B]`, integer or float) as float32 `[B]`."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return jnp.full((batch,), t)
  check_shape("t", t, (batch,))
  return t


def after(tree, deps):
  """`tree`'s values, computed only once every floating leaf of `deps` exists: 0 * (a scalar
  from each of those leaves) is added to `tree`'s floating leaves (NaN if one is not finite).
  XLA:CPU drops optimization barriers before it schedules, so only such a data dependency
  orders independent work (micro-batches, a remat's recomputation)."""
  dep = sum((x.ravel()[0].astype(jnp.float32) for x in jax.tree.leaves(deps)
             if jnp.issubdtype(x.dtype, jnp.floating)), jnp.zeros((), jnp.float32))
  return jax.tree.map(lambda x: x + (0 * dep).astype(x.dtype)
                      if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _recompute_after_cotangent(f):
  """`f(params, args, rngs)` whose reverse mode saves only its inputs and recomputes `f` in the
  backward pass, after the output cotangent exists (`after`): rematerialisation that XLA:CPU
  cannot hoist into the forward pass, unlike `jax.checkpoint`'s."""
  @jax.custom_vjp
  def g(params, args, rngs):
    return f(params, args, rngs)

  def fwd(params, args, rngs):
    return f(params, args, rngs), (params, args, rngs)

  def bwd(res, ct):
    params, args, rngs = after(res, ct)
    _, vjp = jax.vjp(lambda p, a: f(p, a, rngs), params, args)
    return (*vjp(ct), jax.tree.map(lambda _: None, rngs))

  g.defvjp(fwd, bwd)
  return g


def maybe_remat(cls, remat: bool, static_argnums: tuple[int, ...] = ()):
  """`cls`, or with `remat` a subclass whose calls keep only their inputs for the backward pass
  and recompute the block there (same params and outputs; `static_argnums`, counting `self` as
  0, are Python values such as `train`). Under `init` it runs as `cls`. Reverse mode only: a
  `jax.custom_vjp` has no forward-mode (`jax.jvp`) rule."""
  if not remat:
    return cls

  class Remat(cls):
    def __call__(self, *args):
      if self.is_initializing():
        return super().__call__(*args)
      fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(cls)
                if f.init and f.name not in ("parent", "name")}
      plain = cls(**fields, parent=None)
      static = {i - 1 for i in static_argnums}
      dynamic = [None if i in static else a for i, a in enumerate(args)]

      def f(params, dyn, rngs):
        full = [args[i] if i in static else a for i, a in enumerate(dyn)]
        return plain.apply({"params": params}, *full, rngs=rngs)

      rngs = {"dropout": self.make_rng("dropout")} if self.has_rng("dropout") else {}
      return _recompute_after_cotangent(f)(self.variables.get("params", {}), dynamic, rngs)

  Remat.__name__ = cls.__name__
  return Remat


class GroupNorm(nn.Module):
  """flax's `nn.GroupNorm` (the same `scale` / `bias` params, statistics in float32 with the fast
  variance E[x^2] - E[x]^2) over the last axis of x [B, ..., C] -> x's shape. The sums run over
  positions per channel first, then over each group's channels, and the normalisation is one
  multiply-add per element with a per-channel scale and shift: on XLA:CPU the whole trajectory
  ran 1.23-1.42x (image) and 1.34-1.36x (speech) as fast as with flax's, side by side in the
  tables (experiments/results/bench_notes.md, sessions 38-41)."""
  num_groups: int
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, c = x.shape[0], x.shape[-1]
    g = self.num_groups
    if c % g:
      raise ValueError(f"GroupNorm: {c} channels do not split into {g} groups.")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    positions = x.reshape(b, -1, c).astype(jnp.promote_types(x.dtype, jnp.float32))
    sum_x, sum_x2 = _sums_over_positions(jnp.stack([positions, lax.mul(positions, positions)]))
    n = x.size // (b * g)
    mean = sum_x.reshape(b, g, -1).sum(-1) / n
    var = jnp.maximum(sum_x2.reshape(b, g, -1).sum(-1) / n - mean * mean, 0.0)
    # [B, G] -> [B, C] as a one-hot matmul (exact): XLA fuses no dot into its consumers, so the
    # normalisation reads per-channel values. Spread by a broadcast inside that fusion, per-group
    # values left XLA:CPU's loops C/G lanes wide or scalar (the image trajectory: 1.15-1.2x slower).
    one_hot = jnp.repeat(jnp.eye(g, dtype=jnp.float32), c // g, axis=1)   # [G, C]
    per_channel = lambda v: jnp.dot(v, one_hot, precision=lax.Precision.HIGHEST)
    a = scale * per_channel(lax.rsqrt(var + self.epsilon))
    shift = bias - per_channel(mean) * a
    expand = (slice(None),) + (None,) * (x.ndim - 2)
    return x * a[expand] + shift[expand]


def _sums_over_positions(stacked: jax.Array) -> jax.Array:
  """[2, B, P, C] -> [2, B, C], summed over P. Both sums as one reduction: the image trajectory
  ran 1.07-1.09x faster on XLA:CPU than with a reduction each. XLA:CPU splits a reduction over
  more than 32 elements into windows of 32, writing its input (x and x^2) out first; from 4096
  positions on, the sums first run over chunks of k <= 32 positions inside one fusion with x^2,
  and `optimization_barrier` keeps XLA from merging the two reductions back into one. The speech
  trajectory (NCSN++ at 256 x 256) ran 1.07-1.09x faster at batch 1-4; with chunks below 4096
  positions the image trajectory ran 0.86-0.89x (experiments/results/bench_notes.md, s40)."""
  _, b, p, c = stacked.shape
  if p < 4096:
    return jnp.sum(stacked, axis=2)
  k = max(d for d in range(1, 33) if p % d == 0)
  chunks = jnp.sum(stacked.reshape(2, b, p // k, k, c), axis=3)
  return jnp.sum(lax.optimization_barrier(chunks), axis=2)


def group_norm(x: jax.Array, groups: int) -> jax.Array:
  """`GroupNorm` over the last axis with gcd(groups, channels) groups (works for any width)."""
  return GroupNorm(math.gcd(groups, x.shape[-1]))(x)


def conv_min8_features(lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
  """`lax.conv_general_dilated` (pass as `nn.Conv(conv_general_dilated=...)`) with a kernel
  [..., C, N] of N < 8 output features zero-padded to 8, the output [..., 8] sliced back to N.
  Same values; XLA:CPU's 3x3 convolution at 256 x 256 ran 2.5-3.5x slower with 4 outputs than
  with 8, and 1.8x slower with 2 (16 or more are no faster than 8)."""
  n = rhs.shape[-1]
  if n >= 8:
    return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)
  rhs = jnp.pad(rhs, [(0, 0)] * (rhs.ndim - 1) + [(0, 8 - n)])
  return lax.conv_general_dilated(lhs, rhs, *args, **kwargs)[..., :n]


def sinusoidal_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0) -> jax.Array:
  """Transformer/DDPM sinusoidal features of `t` [B] -> [B, dim] (dim even)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class TimeEmbedding(nn.Module):
  """t [B] -> [B, dim]: a learned table (`num_steps` > 0, integer t) or sinusoidal features
  of `scale * t` (`num_steps` = 0, any t), followed by a two-layer SiLU MLP."""
  dim: int
  num_steps: int = 0
  scale: float = 1.0

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    if self.num_steps > 0:
      idx = jnp.clip(jnp.round(t).astype(jnp.int32), 0, self.num_steps - 1)
      h = nn.Embed(self.num_steps, self.dim)(idx)
    else:
      h = sinusoidal_embedding(self.scale * t, self.dim)
    return nn.Dense(self.dim)(nn.silu(nn.Dense(self.dim)(h)))


class FiLM(nn.Module):
  """h [B, ..., F] modulated by cond [B, E]: h * (1 + scale) + shift, both Dense(SiLU(cond))."""

  @nn.compact
  def __call__(self, h: jax.Array, cond: jax.Array) -> jax.Array:
    scale, shift = jnp.split(nn.Dense(2 * h.shape[-1])(nn.silu(cond)), 2, axis=-1)
    expand = (slice(None),) + (None,) * (h.ndim - 2)
    return h * (1.0 + scale[expand]) + shift[expand]


class ConvBlock(nn.Module):
  """Conv3x3(stride) -> GroupNorm -> SiLU: [B, H, W, C] -> [B, H/stride, W/stride, features]."""
  features: int
  stride: int = 1
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, (3, 3), strides=self.stride)(x)
    return nn.silu(group_norm(x, self.groups))


class ConvEncoder(nn.Module):
  """A small CNN: stem conv, then `depth` stages of ConvBlock + stride-2 ConvBlock, widths
  `width * 2**i` (capped at `max_mult * width`): [B, H, W, C] -> [B, H/2^depth, W/2^depth, D]
  (sizes rounded up)."""
  width: int = 32
  depth: int = 3
  max_mult: int = 4
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = ConvBlock(self.width, groups=self.groups)(x)
    for i in range(self.depth):
      features = self.width * min(2**i, self.max_mult)
      x = ConvBlock(features, groups=self.groups)(x)
      x = ConvBlock(features, stride=2, groups=self.groups)(x)
    return x


class ResBlock(nn.Module):
  """Pre-activation residual block, optionally time-conditioned (FiLM) and strided.

  x [B, H, W, C], emb [B, E] or None -> [B, H/stride, W/stride, features]:
  GN-SiLU-Conv(stride) [-FiLM(emb)] -GN-SiLU-Dropout-Conv, plus a 1x1 (strided) projection
  shortcut when the shape changes.
  """
  features: int
  stride: int = 1
  dropout: float = 0.0
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, emb: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    h = nn.Conv(self.features, (3, 3), strides=self.stride)(nn.silu(group_norm(x, self.groups)))
    if emb is not None:
      h = FiLM()(h, emb)
    h = nn.silu(group_norm(h, self.groups))
    h = nn.Dropout(self.dropout, deterministic=not train)(h)
    h = nn.Conv(self.features, (3, 3))(h)
    if x.shape[-1] != self.features or self.stride != 1:
      x = nn.Conv(self.features, (1, 1), strides=self.stride, name="shortcut")(x)
    return x + h


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          mask: Optional[jax.Array] = None) -> jax.Array:
  """softmax(Q K^T / sqrt(D)) V per head: query [B, Nq, H, D], key and value [B, Nk, H, D] ->
  [B, Nq, H, D]; flax's `nn.dot_product_attention` without masks or dropout (an `attention_fn`
  for `nn.MultiHeadDotProductAttention`). The scores are laid out [B, H, Nk, Nq], so the softmax
  reduces over a major axis, which XLA:CPU vectorises; over the minor axis (flax's [B, H, Nq, Nk])
  the image trajectory ran 1.04-1.1x slower."""
  if mask is not None:
    raise ValueError("dot_product_attention: attention masks are not supported.")
  query = query / np.sqrt(query.shape[-1]).astype(query.dtype)
  weights = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhkq", query, key), axis=-2)
  return jnp.einsum("bhkq,bkhd->bqhd", weights, value)


class AttentionBlock(nn.Module):
  """Residual multi-head attention: x + Attn(GN(x), context).

  x is tokens [B, N, D] or a feature map [B, H, W, D] (attends over H*W); context [B, M, Dc]
  for cross-attention, or None for self-attention. Output has x's shape.
  """
  heads: int = 4
  groups: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, context: Optional[jax.Array] = None) -> jax.Array:
    tokens = x.reshape(x.shape[0], -1, x.shape[-1])
    q = group_norm(tokens, self.groups)
    kv = q if context is None else context
    h = nn.MultiHeadDotProductAttention(num_heads=self.heads, out_features=x.shape[-1],
                                        attention_fn=dot_product_attention)(q, kv)
    return x + h.reshape(x.shape)


def downsample(x: jax.Array) -> jax.Array:
  """Stride-2 3x3 conv keeping channels: [B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C]."""
  return nn.Conv(x.shape[-1], (3, 3), strides=2)(x)


def upsample(x: jax.Array) -> jax.Array:
  """Nearest 2x upsampling then 3x3 conv: [B, H, W, C] -> [B, 2H, 2W, C]."""
  b, h, w, c = x.shape
  x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
  return nn.Conv(c, (3, 3))(x)
