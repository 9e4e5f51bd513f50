"""Tests for cdjax.nets.speech: shapes, SGMSE+'s size, logit gate, latent modes, remat, and
exact identities: NCSN++'s blocks, time features and output scaling, the enhancer's outputs."""
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax.nets import NETWORKS, get_network
from cdjax.nets.layers import count_params
from cdjax.nets.speech import (LatentIntegration, LogitConditioning, _fir, _NCSNAttention,
                               _NCSNResBlock)

# rbg keys: XLA compiles the threefry-based initialisers of a whole net far more slowly on CPU.
KEY = jax.random.key(0, impl="rbg")
B, F, T, K = 2, 16, 8, 10
TINY = dict(nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), logit_hidden=16)
MICRO = dict(TINY, ch_mult=(1,), attn_resolutions=())   # one level: fast to compile


def _spec(rng, shape=(B, F, T)):
  return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)


def _perturb(tree, rng, scale=0.1):
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), tree)


def test_registered():
  assert {"ncsnpp", "resunet_enhancer", "speech_classifier"} <= set(NETWORKS.names())


def test_ncsnpp_sgmse_size():
  net = get_network("ncsnpp", nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
                    attn_resolutions=(16,))
  x = jax.ShapeDtypeStruct((1, 256, 256), jnp.complex64)
  shapes = jax.eval_shape(net.init, KEY, x, jnp.ones((1,)), x)
  # SGMSE+ reports 65.6M (torch: 65,590,822 incl. 128 fixed Fourier frequencies, not params here).
  assert count_params(shapes) == 65_590_694


def test_ncsnpp_shapes_and_logit_gate():
  rng = np.random.default_rng(0)
  net = get_network("ncsnpp", **TINY, latent_mode="add")
  x_t, y = _spec(rng), _spec(rng)
  t = jnp.array([0.3, 0.9])
  logits = jnp.asarray(rng.standard_normal((B, 3, K)), jnp.float32)   # a logit sequence
  latent = jnp.asarray(rng.standard_normal((B, F // 4, T // 4, 6)), jnp.float32)
  params = jax.jit(net.init)(KEY, x_t, t, y, logits, latent)
  out = jax.jit(net.apply)(params, x_t, t, y, logits, latent)
  assert out.shape == (B, F, T) and out.dtype == jnp.complex64
  params = params["params"]
  assert params["logits"]["Conv_0"]["kernel"].shape == (1, 1, 16, 16)   # after the middle blocks
  assert params["latent"]["Conv_0"]["kernel"].shape == (1, 1, 6, 16)   # level 1: F/2 x T/2


def test_logit_conditioning_gate_and_layernorm():
  """h + sigmoid(gate(temb)) * Conv1x1(tile(MLP(LayerNorm(l)))): the identity at init, the gate
  sigmoid(-3) until its zero kernel moves, then a function of temb; LayerNorm makes the fusion
  blind to a shift and a positive scale of the logits (as softmax is to the shift); sequences
  resampled along time as the official code does."""
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((B, 4, 2, 6)), jnp.float32)
  temb = jnp.asarray(rng.standard_normal((B, 12)), jnp.float32)
  logits = jnp.asarray(rng.standard_normal((B, K)), jnp.float32)
  module = LogitConditioning(hidden=8)
  params = module.init(KEY, h, logits, temb)["params"]
  np.testing.assert_array_equal(module.apply({"params": params}, h, logits, temb), h)

  p = flax.core.unfreeze(params)
  p["Conv_0"] = _perturb(p["Conv_0"], rng)
  delta = module.apply({"params": p}, h, logits, temb) - h
  e = module.apply({"params": dict(p, Dense_3=dict(kernel=p["Dense_3"]["kernel"],
                                                   bias=jnp.full((1,), 50.0)))},
                   h, logits, temb) - h   # gate 1: the conditioning map itself
  np.testing.assert_allclose(delta, float(jax.nn.sigmoid(-3.0)) * e, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(e).min()) > 0 and e.shape == h.shape
  np.testing.assert_allclose(e[:, :1], e[:, 1:2], atol=1e-6)   # tiled over frequency and time
  np.testing.assert_allclose(e[:, :, :1], e[:, :, 1:], atol=1e-6)

  np.testing.assert_allclose(module.apply({"params": p}, h, 2.5 * logits + 3.0, temb) - h, delta,
                             rtol=1e-4, atol=1e-6)
  # A logit sequence [B, L, K] is resampled to T' as torch's F.interpolate (linear, half-pixel,
  # no antialiasing): at L = 2 T' each frame reads the mean of its two tokens, so repeating
  # every token twice changes nothing (an antialiasing filter would blend neighbours).
  seq = jnp.asarray(rng.standard_normal((B, 2, K)), jnp.float32)
  np.testing.assert_allclose(module.apply({"params": p}, h, jnp.repeat(seq, 2, axis=1), temb),
                             module.apply({"params": p}, h, seq, temb), rtol=1e-5, atol=1e-6)
  assert not np.allclose(module.apply({"params": p}, h, seq[:, ::-1], temb),
                         module.apply({"params": p}, h, seq, temb), atol=1e-4)
  p["Dense_3"] = _perturb(p["Dense_3"], rng)   # the gate now reads temb
  moved = [module.apply({"params": p}, h, logits, s * temb) - h for s in (1.0, -1.0)]
  assert not np.allclose(moved[0], moved[1], atol=1e-5)


def test_ncsnpp_logits_and_latent_enter_only_when_given():
  rng = np.random.default_rng(0)
  net = get_network("ncsnpp", **MICRO, latent_mode="add")
  x_t, y = _spec(rng), _spec(rng)
  t = jnp.array([0.3, 0.9])
  logits = jnp.asarray(rng.standard_normal((B, K)), jnp.float32)
  latent = jnp.asarray(rng.standard_normal((B, F // 4, T // 4, 6)), jnp.float32)
  params = jax.jit(net.init)(KEY, x_t, t, y, logits, latent)["params"]

  apply = jax.jit(net.apply)
  # The output maps are zero-initialised: perturb everything except the two zero-init entries.
  p = flax.core.unfreeze(_perturb(params, rng))
  p["latent"], p["logits"]["Conv_0"] = params["latent"], params["logits"]["Conv_0"]
  out = apply({"params": p}, x_t, t, y, logits, latent)
  np.testing.assert_allclose(out, apply({"params": p}, x_t, t, y), rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(out).std()) > 1e-3

  for name in ("latent", "logits"):
    q = dict(p, **{name: _perturb(p[name], rng)})
    assert not np.allclose(apply({"params": q}, x_t, t, y, logits, latent), out, atol=1e-4)

  q = dict(p, latent=_perturb(p["latent"], rng))
  ignored = jax.jit(net.clone(latent_mode="none").apply)({"params": q}, x_t, t, y, logits, latent)
  np.testing.assert_allclose(ignored, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [(1, 3, 3, 1), (1, 2, 1), (1, 4, 6, 4, 1), (2, 5, 1)])
def test_fir_resampling_matches_upfirdn(kernel):
  rng = np.random.default_rng(6)
  x = rng.standard_normal((6, 4))

  def upfirdn(v, k, up, pad):   # 1-D reference: zero-insert, pad, correlate with flipped k
    z = np.zeros(len(v) * up)
    z[::up] = v
    z = np.pad(z, pad)
    return np.array([z[i:i + len(k)] @ k[::-1] for i in range(len(z) - len(k) + 1)])

  k = np.asarray(kernel, np.float64) / sum(kernel)
  p = len(k) - 2   # NCSN++'s padding: up ((p + 1) // 2 + 1, p // 2), down ((p + 1) // 2, p // 2)
  for up, pad, step, gain in (
      (True, ((p + 1) // 2 + 1, p // 2), 1, 2.0), (False, ((p + 1) // 2, p // 2), 2, 1.0)):
    ref = np.stack([upfirdn(r, gain * k, 2 if up else 1, pad)[::step] for r in x])
    ref = np.stack([upfirdn(c, gain * k, 2 if up else 1, pad)[::step] for c in ref.T]).T
    got = _fir(jnp.asarray(x, jnp.float32)[None, :, :, None], kernel, up)[0, :, :, 0]
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("mode", ["add", "concat", "film"])
def test_latent_integration_modes(mode):
  rng = np.random.default_rng(1)
  h = jnp.asarray(rng.standard_normal((B, 4, 6, 8)), jnp.float32)
  z = jnp.asarray(rng.standard_normal((B, 2, 3, 5)), jnp.float32)
  module = LatentIntegration(mode)
  params = module.init(KEY, h, z)
  out = module.apply(params, h, z)
  assert out.shape == h.shape
  if mode != "concat":   # zero-init projections: the identity until trained
    np.testing.assert_array_equal(out, h)
    params = _perturb(params, rng)
  changed = module.apply(params, h, z + 1.0)
  assert not np.allclose(changed, module.apply(params, h, z), atol=1e-4)


def test_ncsnpp_remat_matches():
  rng = np.random.default_rng(2)
  x_t, y = _spec(rng), _spec(rng)
  t = jnp.array([0.5, 0.7])
  net = get_network("ncsnpp", **MICRO)
  params = _perturb(jax.jit(net.init)(KEY, x_t, t, y), rng)

  def grads(module):
    loss = lambda p: jnp.sum(jnp.abs(module.apply(p, x_t, t, y))**2)
    return jax.jit(jax.value_and_grad(loss))(params)

  (v0, g0), (v1, g1) = grads(net), grads(net.clone(remat=True))
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  # Floor: the attention's key-bias gradient is 0 in exact arithmetic (softmax ignores a shift),
  # rounding noise here (6e-8 against a largest gradient of 3e2).
  floor = 1e-9 * max(np.abs(a).max() for a in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(a).max() + floor),
               g0, g1)


def test_ncsnpp_shape_errors():
  rng = np.random.default_rng(3)
  net = get_network("ncsnpp", **TINY)
  x_t = _spec(rng)
  with pytest.raises(ValueError, match="y"):
    net.init(KEY, x_t, 0.5, _spec(rng, (B, F, T + 2)))
  with pytest.raises(ValueError, match="divisible"):
    net.init(KEY, _spec(rng, (B, F, T + 1)), 0.5, _spec(rng, (B, F, T + 1)))
  with pytest.raises(ValueError, match="complex"):
    net.init(KEY, np.ones((B, F, T), np.float32), 0.5, x_t)


def test_resunet_enhancer_mask_and_latent():
  rng = np.random.default_rng(4)
  net = get_network("resunet_enhancer", widths=(8, 16, 24), strides=((2, 2), (2, 1)))
  y = _spec(rng, (B, F, T + 2))   # sizes need not divide the strides
  params = jax.jit(net.init)(KEY, y)
  x_hat, latent = jax.jit(net.apply)(params, y)
  assert x_hat.shape == y.shape and x_hat.dtype == jnp.complex64
  assert latent.shape == (B, F // 4, (T + 2 + 1) // 2, 24)
  assert count_params(params) > 0


def test_speech_classifier():
  rng = np.random.default_rng(5)
  net = get_network("speech_classifier", num_classes=K, width=8, depth=2)
  wave = jnp.asarray(0.1 * rng.standard_normal((B, 4000)), jnp.float32)
  params = jax.jit(net.init)(KEY, wave)
  assert jax.jit(net.apply)(params, wave).shape == (B, K)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    net.apply(params, wave[0])


def _random_params(net, *args, seed=0):
  """N(0, 0.3^2) params with the structure of `net.init(KEY, *args)`, without compiling the init."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: 0.3 * rng.standard_normal(p.shape).astype(p.dtype),
                      jax.eval_shape(net.init, KEY, *args))


@pytest.mark.parametrize("block, args, last", [
    (_NCSNResBlock(), (jnp.ones((B, 12)),), "Conv_1"), (_NCSNAttention(), (), "out")],
    ids=["res_block", "attention"])
def test_ncsn_blocks_are_x_over_sqrt2_at_init(block, args, last):
  """NCSN++'s residual block (same width, no resampling: no shortcut) and attention return
  (x + h) / sqrt(2) with a zero-initialised last layer: x / sqrt(2) at init, whatever the other
  params."""
  x = jnp.asarray(np.random.default_rng(7).standard_normal((B, 4, 4, 8)), jnp.float32)
  params = flax.core.unfreeze(block.init(KEY, x, *args)["params"])
  assert all(np.all(v == 0) for v in jax.tree.leaves(params[last]))
  params = dict(_perturb(params, np.random.default_rng(8)), **{last: params[last]})
  np.testing.assert_allclose(block.apply({"params": params}, x, *args), x / np.sqrt(2.0),
                             rtol=1e-6, atol=0)


def test_ncsnpp_fourier_features_of_log_t():
  """The time MLP's input is [sin(2 pi log(t) w), cos(2 pi log(t) w)], w ~ N(0, scale^2) [nf]
  drawn from `fourier_seed`."""
  rng = np.random.default_rng(10)
  net = get_network("ncsnpp", **MICRO, fourier_scale=4.0, fourier_seed=3)
  x_t, y, t = _spec(rng), _spec(rng), jnp.array([0.05, 0.7])

  def time_mlp_input(params):
    seen = []

    def spy(next_fun, args, kwargs, context):
      if context.module.scope.path == ("Dense_0",):   # the first time Dense, not a block's
        seen.append(args[0])
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(spy):
      net.apply(params, x_t, t, y)
    return seen[0]

  got = jax.jit(time_mlp_input)(_random_params(net, x_t, t, y))
  w = np.asarray(jax.random.normal(jax.random.key(3), (8,)), np.float64) * 4.0
  proj = 2 * np.pi * np.log(np.asarray(t, np.float64))[:, None] * w
  np.testing.assert_allclose(got, np.concatenate([np.sin(proj), np.cos(proj)], axis=-1),
                             rtol=0, atol=1e-4)


def test_ncsnpp_scale_by_t_divides_the_output_by_t():
  """`scale_by_t` divides the output pyramid by t before the 1x1 output map: with that map's bias
  zeroed, out(scale_by_t=True) * t = out(scale_by_t=False) with the same params."""
  rng = np.random.default_rng(11)
  net = get_network("ncsnpp", **MICRO)
  x_t, y, t = _spec(rng), _spec(rng), jnp.array([0.3, 0.9])
  params = flax.core.unfreeze(_random_params(net, x_t, t, y))
  params["params"]["conv_out"]["bias"] = jnp.zeros(2)
  scaled = jax.jit(net.apply)(params, x_t, t, y)
  plain = jax.jit(net.clone(scale_by_t=False).apply)(params, x_t, t, y)
  assert float(jnp.abs(plain).std()) > 1e-3
  np.testing.assert_allclose(scaled * t[:, None, None], plain, rtol=1e-5,
                             atol=1e-5 * float(jnp.abs(plain).max()))


@pytest.mark.parametrize("output, want", [("mask", lambda y: (2 - 1j) * y),
                                          ("mapping", lambda y: y + (2 - 1j))],
                         ids=["mask", "mapping"])
def test_resunet_enhancer_output_modes(output, want):
  """The output conv's 2 channels are (re, im) of M (mask: x_hat = M y) or D (mapping: x_hat =
  y + D): kernel 0 and bias (2, -1) give M = D = 2 - 1j."""
  rng = np.random.default_rng(12)
  net = get_network("resunet_enhancer", widths=(8, 16), strides=((2, 2),), output=output)
  y = _spec(rng)
  params = flax.core.unfreeze(_random_params(net, y))
  params["params"]["conv_out"] = dict(kernel=jnp.zeros_like(params["params"]["conv_out"]["kernel"]),
                                      bias=jnp.array([2.0, -1.0]))
  np.testing.assert_allclose(jax.jit(net.apply)(params, y)[0], want(y), rtol=1e-6, atol=1e-6)
