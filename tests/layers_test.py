"""Tests for cdjax.nets.layers: GroupNorm and attention against flax's, remat, the padded narrow
convolution, and exact identities of the blocks (residuals, FiLM, time embeddings)."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax.nets.layers import (AttentionBlock, ConvEncoder, FiLM, GroupNorm, ResBlock,
                               TimeEmbedding, conv_min8_features, dot_product_attention, downsample,
                               group_norm, maybe_remat, sinusoidal_embedding, upsample)
from cdjax.nets.speech import _gn


@pytest.mark.parametrize("shape, groups, size", [
    ((2, 28, 28, 32), 8, 1.0), ((3, 10, 16), 4, 1.0), ((1, 7, 7, 64), 32, 1.0),
    ((2, 5, 6, 3), 1, 1.0), ((2, 70, 70, 8), 4, 1.0),   # 4900 positions: chunked sums
    ((2, 6, 6, 16), 4, 1e-3)])   # variance 9e-6: the epsilon (1e-6, flax's) shows
def test_group_norm_equals_flax_values_params_and_gradients(shape, groups, size):
  x = size * (3.0 * jax.random.normal(jax.random.PRNGKey(0), shape) + 2.0)   # mean far from 0
  ref = nn.GroupNorm(num_groups=groups)
  params = ref.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, GroupNorm(groups).init(jax.random.PRNGKey(1), x)) == \
      jax.tree.map(jnp.shape, params)   # flax's checkpoints load as they are
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  np.testing.assert_allclose(GroupNorm(groups).apply(params, x), ref.apply(params, x),
                             rtol=0, atol=2e-5)
  loss = lambda module: lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  got = jax.grad(loss(GroupNorm(groups)), argnums=(0, 1))(params, x)
  want = jax.grad(loss(ref), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=0, atol=2e-5 * float(jnp.max(jnp.abs(w))))


def test_group_norm_bfloat16_statistics_in_float32_and_bad_groups():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 16)) * 4 + 100.0   # bf16 sums would drift
  params = nn.GroupNorm(num_groups=4).init(jax.random.PRNGKey(0), x)
  np.testing.assert_allclose(GroupNorm(4).apply(params, x.astype(jnp.bfloat16)),
                             nn.GroupNorm(num_groups=4).apply(params, x.astype(jnp.bfloat16)),
                             atol=2e-2)
  with pytest.raises(ValueError, match="16 channels do not split into 3 groups"):
    GroupNorm(3).init(jax.random.PRNGKey(0), x)


@pytest.mark.parametrize("q_shape, kv_len", [((2, 49, 4, 8), 49), ((3, 1, 2, 16), 5)])
def test_dot_product_attention_equals_flax_values_and_gradients(q_shape, kv_len):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 2.0 * jax.random.normal(keys[0], q_shape)
  k, v = (2.0 * jax.random.normal(key, (q_shape[0], kv_len) + q_shape[2:]) for key in keys[1:])
  np.testing.assert_allclose(dot_product_attention(q, k, v), nn.dot_product_attention(q, k, v),
                             rtol=0, atol=1e-5)
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))
  got = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(w))))
  with pytest.raises(ValueError, match="masks are not supported"):
    dot_product_attention(q, k, v, mask=jnp.ones(q_shape[:1] + (1, q_shape[1], kv_len), bool))


def test_attention_block_equals_flax_attention():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 32))
  block = AttentionBlock(heads=4)
  params = block.init(jax.random.PRNGKey(1), x)
  with mock.patch("cdjax.nets.layers.dot_product_attention", nn.dot_product_attention):
    want = block.apply(params, x)
  np.testing.assert_allclose(block.apply(params, x), want, rtol=0, atol=1e-5)
  assert not np.allclose(want, x, atol=1e-3)   # the attention term is not negligible


class _Stack(nn.Module):
  """Four 32-channel ResBlocks, each rematerialised with `remat`."""
  remat: bool

  @nn.compact
  def __call__(self, x):
    block = maybe_remat(ResBlock, self.remat, static_argnums=(3,))
    for i in range(4):
      x = block(32, name=f"res{i}")(x, None, False)
    return x


def test_remat_recomputes_in_the_backward_pass():
  """Same params, outputs and gradients; the compiled gradient holds about one block's
  activations (XLA:CPU moved `jax.checkpoint`'s recomputation into the forward pass: 1.00x)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (32, 16, 16, 32))
  params = _Stack(False).init(jax.random.PRNGKey(1), x)
  assert jax.tree.structure(_Stack(True).init(jax.random.PRNGKey(1), x)) == jax.tree.structure(params)
  runs = {}
  for remat in (False, True):
    grad = jax.jit(jax.value_and_grad(lambda p: jnp.sum(_Stack(remat).apply(p, x) ** 2)))
    runs[remat] = grad(params), grad.lower(params).compile().memory_analysis().temp_size_in_bytes
  (v0, g0), temp0 = runs[False]
  (v1, g1), temp1 = runs[True]
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5 * np.abs(a).max()),
               g0, g1)
  assert temp1 < 0.6 * temp0, (temp1, temp0)


@pytest.mark.parametrize("features,kernel,strides", [(4, 3, 1), (2, 3, 2), (1, 1, 1), (8, 3, 1)])
def test_conv_min8_features_equals_nn_conv(features, kernel, strides):
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, 5))
  plain = nn.Conv(features, (kernel, kernel), strides=strides)
  padded = nn.Conv(features, (kernel, kernel), strides=strides,
                   conv_general_dilated=conv_min8_features)
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.map(jnp.shape, padded.init(jax.random.key(1), x)) == jax.tree.map(jnp.shape,
                                                                                     params)
  np.testing.assert_allclose(padded.apply(params, x), plain.apply(params, x), atol=1e-5)
  loss = lambda module: jax.grad(lambda p, x: jnp.sum(jnp.sin(module.apply(p, x))),
                                 argnums=(0, 1))(params, x)
  for got, want in zip(jax.tree.leaves(loss(padded)), jax.tree.leaves(loss(plain))):
    np.testing.assert_allclose(got, want, atol=1e-4)


class _Call(nn.Module):
  """`fn(x)` as a module, for functions that create modules (`group_norm`, NCSN++'s `_gn`)."""
  fn: object

  @nn.compact
  def __call__(self, x):
    return self.fn(x)


@pytest.mark.parametrize("fn, channels, groups", [
    (lambda v: group_norm(v, 8), 16, 8), (lambda v: group_norm(v, 8), 12, 4),
    (lambda v: group_norm(v, 8), 6, 2), (_gn, 256, 32), (_gn, 12, 3)],
    ids=["gcd-16", "gcd-12", "gcd-6", "ncsn-256", "ncsn-12"])
def test_group_norm_functions_pick_their_groups(fn, channels, groups):
  """group_norm(x, 8) is GroupNorm with gcd(8, C) groups, NCSN++'s `_gn` with min(C // 4, 32):
  flax's nn.GroupNorm(groups, epsilon=1e-6) with the same (random) scale and bias (one group, or
  16 at 256 channels, would differ with the per-channel means)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, channels)) + jnp.arange(channels) % 5
  module = _Call(fn)
  params = module.init(jax.random.PRNGKey(1), x)["params"]["GroupNorm_0"]
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  np.testing.assert_allclose(module.apply({"params": {"GroupNorm_0": params}}, x),
                             nn.GroupNorm(groups, epsilon=1e-6).apply({"params": params}, x),
                             rtol=0, atol=1e-4)


def _zero(tree):
  return jax.tree.map(jnp.zeros_like, tree)


@pytest.mark.parametrize("block, args, last", [
    (ResBlock(16), (jnp.ones((2, 8)),), ("Conv_1",)),   # time-conditioned: FiLM_0 too
    (AttentionBlock(heads=2), (), ("MultiHeadDotProductAttention_0", "out")),
], ids=["res_block", "attention"])
def test_residual_blocks_are_the_identity_with_a_zero_last_layer(block, args, last):
  """ResBlock (same width, stride 1: no shortcut conv) and AttentionBlock return x + h: with the
  last layer (second conv; attention's output projection) zeroed, exactly x, whatever the other
  (random) params."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 16))
  params = block.init(jax.random.PRNGKey(1), x, *args)["params"]
  params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.PRNGKey(2), p.shape), params)
  parent = params
  for name in last[:-1]:
    parent = parent[name]
  parent[last[-1]] = _zero(parent[last[-1]])
  np.testing.assert_array_equal(block.apply({"params": params}, x, *args), x)


def test_film_is_h_times_one_plus_scale_plus_shift():
  """FiLM: h * (1 + scale) + shift, (scale, shift) = Dense(SiLU(cond)). A zero Dense gives h;
  kernel 0 and bias (s, b) give h * (1 + s) + b, per channel, broadcast over positions."""
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4, 5))
  cond = jax.random.normal(jax.random.PRNGKey(1), (2, 7))
  params = _zero(FiLM().init(jax.random.PRNGKey(2), h, cond)["params"])
  np.testing.assert_array_equal(FiLM().apply({"params": params}, h, cond), h)
  s, b = (jax.random.normal(jax.random.PRNGKey(k), (5,)) for k in (3, 4))
  params["Dense_0"]["bias"] = jnp.concatenate([s, b])
  np.testing.assert_allclose(FiLM().apply({"params": params}, h, cond), h * (1 + s) + b,
                             rtol=1e-6, atol=1e-6)


def test_sinusoidal_embedding_closed_form():
  """[sin(t f_i), cos(t f_i)], f_i = 10000^(-i / half), i < half = dim / 2 (sines first); at
  t = 0: [0, ..., 0, 1, ..., 1]."""
  t = np.array([0.0, 0.5, 3.0, 120.0])
  f = 10000.0 ** (-np.arange(4) / 4)
  want = np.concatenate([np.sin(t[:, None] * f), np.cos(t[:, None] * f)], axis=-1)
  got = sinusoidal_embedding(jnp.asarray(t, jnp.float32), 8)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got[0], [0.0] * 4 + [1.0] * 4)


def test_time_embedding_scales_t():
  """TimeEmbedding(scale=s)(t) is TimeEmbedding(scale=1)(s * t) with the same params."""
  t = jnp.array([0.001, 0.3, 0.9])
  params = TimeEmbedding(16, scale=1000.0).init(jax.random.PRNGKey(0), t)
  np.testing.assert_allclose(TimeEmbedding(16, scale=1000.0).apply(params, t),
                             TimeEmbedding(16).apply(params, 1000.0 * t), rtol=1e-5, atol=1e-6)


def test_time_embedding_table_rounds_and_clips_t():
  """num_steps > 0: row round(t) of a learned table, clipped to [0, num_steps - 1], then the MLP
  Dense_0(SiLU(Dense_1(row))) (the outer Dense is created first)."""
  t = jnp.array([0.0, 2.4, 2.6, 4.0, 9.0, -3.0])
  module = TimeEmbedding(8, num_steps=5)
  params = module.init(jax.random.PRNGKey(0), t)["params"]
  rows = params["Embed_0"]["embedding"][np.array([0, 2, 3, 4, 4, 0])]
  dense = lambda p, h: h @ p["kernel"] + p["bias"]
  want = dense(params["Dense_0"], jax.nn.silu(dense(params["Dense_1"], rows)))
  np.testing.assert_allclose(module.apply({"params": params}, t), want, rtol=1e-5, atol=1e-6)


def test_conv_encoder_widths_are_capped_and_sizes_round_up():
  """Stage i has width * min(2^i, max_mult) channels and halves the size, rounding up:
  28 -> 14 -> 7 -> 4 -> 2 with widths 4, 8, 8, 8 (capped at max_mult = 2)."""
  x = jnp.zeros((2, 28, 28, 3))
  encoder = ConvEncoder(width=4, depth=4, max_mult=2, groups=2)
  params = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), x)["params"]
  widths = [params[f"ConvBlock_{i}"]["Conv_0"]["kernel"].shape[-1] for i in range(9)]
  assert widths == [4, 4, 4, 8, 8, 8, 8, 8, 8]
  assert jax.eval_shape(encoder.apply, {"params": params}, x).shape == (2, 2, 2, 8)


def test_upsample_is_nearest_and_downsample_keeps_every_other_pixel():
  """With a 3x3 kernel that passes the centre tap through (identity over channels, zero bias),
  upsample is nearest-neighbour 2x repetition and downsample (odd size 7 -> 4) takes pixels
  0, 2, 4, 6."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7, 3))
  centre = {"kernel": jnp.zeros((3, 3, 3, 3)).at[1, 1].set(jnp.eye(3)), "bias": jnp.zeros(3)}
  up, down = _Call(upsample), _Call(downsample)
  assert jax.tree.map(jnp.shape, up.init(jax.random.PRNGKey(1), x)["params"]["Conv_0"]) == \
      jax.tree.map(jnp.shape, centre)
  np.testing.assert_allclose(up.apply({"params": {"Conv_0": centre}}, x),
                             jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), rtol=0, atol=1e-6)
  np.testing.assert_allclose(down.apply({"params": {"Conv_0": centre}}, x), x[:, ::2, ::2],
                             rtol=0, atol=1e-6)


def test_strided_res_block_projects_the_shortcut():
  """A strided ResBlock of unchanged width still needs the 1x1 strided `shortcut` conv: with the
  second conv zeroed it returns exactly that projection, x[:, ::2, ::2] @ kernel + bias."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 6, 16))
  block = ResBlock(16, stride=2)
  params = block.init(jax.random.PRNGKey(1), x)["params"]
  assert params["shortcut"]["kernel"].shape == (1, 1, 16, 16)
  params["Conv_1"] = _zero(params["Conv_1"])
  params["shortcut"]["bias"] = jax.random.normal(jax.random.PRNGKey(2), (16,))
  want = x[:, ::2, ::2] @ params["shortcut"]["kernel"][0, 0] + params["shortcut"]["bias"]
  np.testing.assert_allclose(block.apply({"params": params}, x), want, rtol=1e-5, atol=1e-5)


def test_res_block_dropout_is_active_only_in_training():
  """train=False: deterministic (no dropout rng needed), the same as without dropout; train=True
  drops activations (outputs differ), and does nothing at rate 0."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  params = ResBlock(8).init(jax.random.PRNGKey(1), x)
  rngs = {"dropout": jax.random.PRNGKey(2)}
  plain = ResBlock(8).apply(params, x)
  np.testing.assert_array_equal(ResBlock(8, dropout=0.5).apply(params, x), plain)
  np.testing.assert_array_equal(ResBlock(8).apply(params, x, None, True, rngs=rngs), plain)
  assert not np.allclose(ResBlock(8, dropout=0.5).apply(params, x, None, True, rngs=rngs), plain)
