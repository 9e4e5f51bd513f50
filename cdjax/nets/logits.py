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


@NETWORKS.register("logit_net")
class LogitNet(nn.Module):
  """Logit branch of the coupled model (official image design).

  net(l_t [B, K], t [B] or scalar, cond_logits f(c) [B, K], cond_signal c [B, H, W, C])
  -> eps [B, K]. concat(l_t, f(c)) -> Dense(hidden) -> `depth` LogitBlocks (FiLM time
  conditioning + cross-attention to the flattened feature map of a small ConvEncoder of c:
  `enc_depth` stride-2 stages, 28x28 or 32x32 -> 4x4 = 16 tokens at the defaults)
  -> LN-SiLU-Dense(K).
  """
  num_classes: int = 10
  hidden: int = 256
  depth: int = 3
  heads: int = 4
  enc_width: int = 16
  enc_depth: int = 3
  dropout: float = 0.0
  groups: int = 8
  time_steps: int = 0
  remat: bool = False

  @nn.compact
  def __call__(self, l_t: jax.Array, t: jax.Array, cond_logits: jax.Array,
               cond_signal: jax.Array, train: bool = False) -> jax.Array:
    b = l_t.shape[0] if l_t.ndim else 0
    check_shape("logit_net: l_t", l_t, (b, self.num_classes))
    check_shape("logit_net: cond_logits", cond_logits, (b, self.num_classes))
    check_shape("logit_net: cond_signal", cond_signal, (b, None, None, None))

    emb = TimeEmbedding(self.hidden, self.time_steps)(batch_time(t, b))
    feats = ConvEncoder(self.enc_width, self.enc_depth, groups=self.groups)(cond_signal)
    context = feats.reshape(b, -1, feats.shape[-1])
    h = nn.Dense(self.hidden)(jnp.concatenate([l_t, cond_logits.astype(l_t.dtype)], axis=-1))
    block = maybe_remat(LogitBlock, self.remat, static_argnums=(4,))
    for i in range(self.depth):
      h = block(self.hidden, self.heads, self.dropout, self.groups, name=f"block{i}")(
          h, emb, context, train)
    return nn.Dense(self.num_classes)(nn.silu(nn.LayerNorm()(h)))
