"""Tests for cdjax.nets.layers: GroupNorm and attention against flax's, remat, the padded narrow
convolution."""
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax.nets.layers import (AttentionBlock, GroupNorm, ResBlock, conv_min8_features,
                               dot_product_attention, maybe_remat)


@pytest.mark.parametrize("shape, groups", [((2, 28, 28, 32), 8), ((3, 10, 16), 4),
                                           ((1, 7, 7, 64), 32), ((2, 5, 6, 3), 1),
                                           ((2, 70, 70, 8), 4)])   # 4900 positions: chunked sums
def test_group_norm_equals_flax_values_params_and_gradients(shape, groups):
  x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), shape) + 2.0   # mean far from 0
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
