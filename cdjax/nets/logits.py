"""Logit-branch networks: eps-prediction over the classifier's K logits."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from cdjax.nets import NETWORKS
from cdjax.nets.layers import (AttentionBlock, ConvEncoder, FiLM, TimeEmbedding, batch_time,
                               check_shape, maybe_remat)


class LogitBlock(nn.Module):
  """h [B, D] -> [B, D]: residual MLP (LN-SiLU-Dense-FiLM(emb)-SiLU-Dropout-Dense), then
  residual cross-attention of h (one query token) to context [B, M, Dc]."""
  hidden: int
  heads: int
  dropout: float
  groups: int

  @nn.compact
  def __call__(self, h: jax.Array, emb: jax.Array, context: jax.Array,
               train: bool = False) -> jax.Array:
    r = nn.Dense(self.hidden)(nn.silu(nn.LayerNorm()(h)))
    r = nn.silu(FiLM()(r, emb))
    r = nn.Dropout(self.dropout, deterministic=not train)(r)
    h = h + nn.Dense(self.hidden)(r)
    return AttentionBlock(self.heads, self.groups)(h[:, None, :], context)[:, 0]


class LogitHead(nn.Module):
  """The logit branch's shared head: net(l_t [B, K], t [B] or scalar, cond_logits f(c) [B, K],
  cond_signal c) -> eps [B, K].

  concat(l_t, f(c)) -> Dense(hidden) -> `depth` LogitBlocks (FiLM conditioning on
  `embed_time(t)` + cross-attention to the flattened feature map of a small ConvEncoder of
  `signal_map(c)` [B, H, W, C], `enc_depth` stride-2 stages) -> LN-SiLU-Dense(K).
  Subclasses define `embed_time` and `signal_map`.
  """
  num_classes: int = 10
  hidden: int = 256
  depth: int = 3
  heads: int = 4
  enc_width: int = 16
  enc_depth: int = 3
  dropout: float = 0.0
  groups: int = 8
  remat: bool = False

  def embed_time(self, t: jax.Array) -> jax.Array:
    """t [B] -> [B, hidden]."""
    raise NotImplementedError

  def signal_map(self, cond_signal: jax.Array) -> jax.Array:
    """c -> the ConvEncoder's input [B, H, W, C]."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, l_t: jax.Array, t: jax.Array, cond_logits: jax.Array,
               cond_signal: jax.Array, train: bool = False) -> jax.Array:
    b = l_t.shape[0] if l_t.ndim else 0
    check_shape("logit_net: l_t", l_t, (b, self.num_classes))
    check_shape("logit_net: cond_logits", cond_logits, (b, self.num_classes))
    signal = self.signal_map(cond_signal)
    check_shape("logit_net: cond_signal", signal, (b, None, None, None))

    emb = self.embed_time(batch_time(t, b))
    feats = ConvEncoder(self.enc_width, self.enc_depth, groups=self.groups)(signal)
    context = feats.reshape(b, -1, feats.shape[-1])
    h = nn.Dense(self.hidden)(jnp.concatenate([l_t, cond_logits.astype(l_t.dtype)], axis=-1))
    block = maybe_remat(LogitBlock, self.remat, static_argnums=(4,))
    for i in range(self.depth):
      h = block(self.hidden, self.heads, self.dropout, self.groups, name=f"block{i}")(
          h, emb, context, train)
    return nn.Dense(self.num_classes)(nn.silu(nn.LayerNorm()(h)))


@NETWORKS.register("logit_net")
class LogitNet(LogitHead):
  """Logit branch of the coupled model (official image design): `LogitHead` on c [B, H, W, C]
  itself (28x28 or 32x32 -> 4x4 = 16 context tokens at the defaults); time embedding a learned
  table (`time_steps` > 0, integer t) or sinusoidal features of t.
  """
  time_steps: int = 0

  def embed_time(self, t: jax.Array) -> jax.Array:
    return TimeEmbedding(self.hidden, self.time_steps)(t)

  def signal_map(self, cond_signal: jax.Array) -> jax.Array:
    return cond_signal
