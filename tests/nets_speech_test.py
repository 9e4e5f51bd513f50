"""Tests for cdjax.nets.speech: shapes, SGMSE+'s size, logit gate, latent modes, remat, errors,
exact identities (NCSN++'s blocks, time features and output scaling, the enhancer's outputs) and
numpy references (NCSN++'s residual block and attention, the latent integration)."""
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


@pytest.mark.parametrize("latent_size, latent_level, width", [
    ((F, T), None, 8), ((F // 2, T // 2), None, 16), ((F // 8, T // 8), None, 16),
    ((F // 2, T // 2), 0, 8), ((F, T), -1, 16)])
def test_ncsnpp_latent_enters_the_closest_or_the_chosen_level(latent_size, latent_level, width):
  """The latent enters the down level (nf * ch_mult[i] channels: 8, 16) whose size is closest to
  its own, or `latent_level` (negative counts from the last) when given."""
  net = get_network("ncsnpp", **TINY, latent_mode="add", latent_level=latent_level)
  x = jax.ShapeDtypeStruct((B, F, T), jnp.complex64)
  latent = jax.ShapeDtypeStruct((B, *latent_size, 6), jnp.float32)
  shapes = jax.eval_shape(net.init, KEY, x, jnp.ones((B,)), x, None, latent)
  assert shapes["params"]["latent"]["Conv_0"]["kernel"].shape == (1, 1, 6, width)


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


@pytest.mark.parametrize("mode", ["add", "concat", "film"])
def test_latent_integration_formulas(mode):
  """With random params and a latent of h's size (no resize), W and b the 1x1 conv's: add
  h + z W + b; concat [h, z] W + b; film h (1 + s) + c with [s, c] = z W + b."""
  rng = np.random.default_rng(13)
  h = rng.standard_normal((B, 4, 6, 8)).astype(np.float32)
  z = rng.standard_normal((B, 4, 6, 5)).astype(np.float32)
  module = LatentIntegration(mode)
  params = _random_params(module, h, z)
  w, b = (np.asarray(params["params"]["Conv_0"][n], np.float64) for n in ("kernel", "bias"))
  h64, z64, w = h.astype(np.float64), z.astype(np.float64), w[0, 0]
  if mode == "add":
    want = h64 + z64 @ w + b
  elif mode == "concat":
    want = np.concatenate([h64, z64], axis=-1) @ w + b
  else:
    s, c = np.split(z64 @ w + b, 2, axis=-1)
    want = h64 * (1 + s) + c
  np.testing.assert_allclose(module.apply(params, h, z), want, rtol=1e-5, atol=1e-5)


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
  for shape in ((B, F, T + 1), (B, F + 1, T)):
    with pytest.raises(ValueError, match="divisible"):
      net.init(KEY, _spec(rng, shape), 0.5, _spec(rng, shape))
  for logits in (np.zeros((B + 1, K)), np.zeros((B, 2, 3, K))):   # another batch, a 4-D array
    with pytest.raises(ValueError, match=r"logits must be \[B, K\] or \[B, L, K\] with B=2"):
      jax.eval_shape(net.init, KEY, x_t, 0.5, x_t, logits)   # traced: no compiling
  with pytest.raises(ValueError, match=r"latent_mode must be one of \('none', 'add'"):
    jax.eval_shape(net.clone(latent_mode="sum").init, KEY, x_t, 0.5, x_t)   # even without one
  with pytest.raises(ValueError, match=r"latent must be \[B, F', T', C'\] with B=2"):
    jax.eval_shape(net.clone(latent_mode="add").init, KEY, x_t, 0.5, x_t, None,
                   np.zeros((B + 1, 4, 2, 3)))
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


def test_resunet_enhancer_config_errors():
  """One stride per level but the last, an output mode of the two, a complex [B, F, T] input."""
  y = jax.ShapeDtypeStruct((B, F, T), jnp.complex64)
  for kwargs, match in ((dict(strides=((2, 2),)), r"need len\(widths\) - 1 = 2 strides, got 1"),
                        (dict(strides=((2, 2),) * 3), r"= 2 strides, got 3"),
                        (dict(output="residual"), "output must be 'mask' or 'mapping'")):
    net = get_network("resunet_enhancer", widths=(8, 16, 24), **kwargs)
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(net.init, KEY, y)
  with pytest.raises(ValueError, match="complex spectrogram"):
    jax.eval_shape(get_network("resunet_enhancer").init, KEY,
                   jax.ShapeDtypeStruct((B, F, T), jnp.float32))


def test_speech_classifier():
  rng = np.random.default_rng(5)
  net = get_network("speech_classifier", num_classes=K, width=8, depth=2)
  wave = jnp.asarray(0.1 * rng.standard_normal((B, 4000)), jnp.float32)
  params = jax.jit(net.init)(KEY, wave)
  assert jax.jit(net.apply)(params, wave).shape == (B, K)
  with pytest.raises(ValueError, match=r"\[B, L\]"):
    net.apply(params, wave[0])


def test_speech_logit_net_reads_the_pooled_magnitude():
  """The logit branch's map of c is |c| average-pooled by `pool` (frequency, time), so it is
  blind to the phase; a real input is refused."""
  rng = np.random.default_rng(16)
  c = _spec(rng)   # [B, 16, 8]
  net = get_network("speech_logit_net", num_classes=K, pool=(4, 2))
  got = net.apply({}, c, method="signal_map")
  want = np.abs(c).reshape(B, F // 4, 4, T // 2, 2).mean((2, 4))[..., None]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  phase = np.exp(2j * np.pi * rng.uniform(size=c.shape)).astype(np.complex64)
  np.testing.assert_allclose(net.apply({}, c * phase, method="signal_map"), got, rtol=1e-5)
  with pytest.raises(ValueError, match="complex spectrogram"):
    net.apply({}, np.abs(c), method="signal_map")


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


def _np_params(params):
  return jax.tree.map(lambda p: np.asarray(p, np.float64), params["params"])


def _np_silu(x):
  return x / (1 + np.exp(-x))


def _np_group_norm(x, p):
  """NCSN++'s GroupNorm of x [B, H, W, C]: C // 4 groups, eps 1e-6, then scale and bias."""
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, c // 4, 4)
  g = (g - g.mean((1, 3), keepdims=True)) / np.sqrt(g.var((1, 3), keepdims=True) + 1e-6)
  return g.reshape(x.shape) * p["scale"] + p["bias"]


def _np_conv(x, p):
  """'SAME' convolution of x [B, H, W, C] with an odd square kernel [k, k, C, C'] and a bias."""
  k, (_, hh, ww, _) = p["kernel"].shape[0], x.shape
  xp = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
  return sum(xp[:, i:i + hh, j:j + ww] @ p["kernel"][i, j]
             for i in range(k) for j in range(k)) + p["bias"]


def test_ncsn_res_block_matches_a_reference():
  """With random params, 8 -> 12 channels (a 1x1 shortcut): (S(x) + h) / sqrt(2), h =
  Conv(SiLU(GN(Conv(SiLU(GN(x))) + Dense(SiLU(temb))))), in numpy."""
  rng = np.random.default_rng(14)
  x = rng.standard_normal((B, 4, 6, 8)).astype(np.float32)
  temb = rng.standard_normal((B, 5)).astype(np.float32)
  block = _NCSNResBlock(12)
  params = _random_params(block, x, temb)
  p, x64 = _np_params(params), x.astype(np.float64)
  h = _np_conv(_np_silu(_np_group_norm(x64, p["GroupNorm_0"])), p["Conv_0"])
  h = h + (_np_silu(temb.astype(np.float64)) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])[
      :, None, None]
  h = _np_conv(_np_silu(_np_group_norm(h, p["GroupNorm_1"])), p["Conv_1"])
  want = (_np_conv(x64, p["shortcut"]) + h) / np.sqrt(2.0)
  got = jax.jit(block.apply)(params, x, temb)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_ncsn_attention_matches_a_reference():
  """With random params: (x + Out(softmax(Q K^T / sqrt(C)) V)) / sqrt(2) over all H W positions,
  Q, K, V dense maps of GN(x), in numpy."""
  rng = np.random.default_rng(15)
  x = rng.standard_normal((B, 4, 3, 8)).astype(np.float32)
  block = _NCSNAttention()
  params = _random_params(block, x)
  p = _np_params(params)
  tokens = _np_group_norm(x.astype(np.float64), p["GroupNorm_0"]).reshape(B, 12, 8)
  q, k, v = (tokens @ p[n]["kernel"] + p[n]["bias"] for n in ("q", "k", "v"))
  scores = q @ k.transpose(0, 2, 1) / np.sqrt(8.0)   # [B, query, key]
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  h = (weights @ v) @ p["out"]["kernel"] + p["out"]["bias"]
  want = (x + h.reshape(x.shape)) / np.sqrt(2.0)
  np.testing.assert_allclose(jax.jit(block.apply)(params, x), want, rtol=1e-4, atol=1e-4)


def _time_mlp_input(net, x_t, t, y):
  """The input of NCSN++'s time MLP (its features of t) in `net(x_t, t, y)`, random params."""
  seen = []

  def spy(next_fun, args, kwargs, context):
    if context.module.scope.path == ("Dense_0",):   # the first time Dense, not a block's
      seen.append(args[0])
    return next_fun(*args, **kwargs)

  def run(params):
    with nn.intercept_methods(spy):
      net.apply(params, x_t, t, y)
    return seen[0]

  return jax.jit(run)(_random_params(net, x_t, t, y))


def test_ncsnpp_fourier_features_of_log_t():
  """The time MLP's input is [sin(2 pi log(t) w), cos(2 pi log(t) w)], w ~ N(0, scale^2) [nf]
  drawn from `fourier_seed`."""
  rng = np.random.default_rng(10)
  net = get_network("ncsnpp", **MICRO, fourier_scale=4.0, fourier_seed=3)
  x_t, y, t = _spec(rng), _spec(rng), jnp.array([0.05, 0.7])
  got = _time_mlp_input(net, x_t, t, y)
  w = np.asarray(jax.random.normal(jax.random.key(3), (8,)), np.float64) * 4.0
  proj = 2 * np.pi * np.log(np.asarray(t, np.float64))[:, None] * w
  np.testing.assert_allclose(got, np.concatenate([np.sin(proj), np.cos(proj)], axis=-1),
                             rtol=0, atol=1e-4)


def test_ncsnpp_sinusoidal_features_of_scaled_t():
  """embedding='sinusoidal' reads time_scale * t: halving the scale and doubling t changes
  nothing, while t alone moves the features; an unknown embedding is refused."""
  rng = np.random.default_rng(17)
  net = get_network("ncsnpp", **MICRO, embedding="sinusoidal", time_scale=100.0)
  x_t, y, t = _spec(rng), _spec(rng), jnp.array([0.2, 0.45])
  got = _time_mlp_input(net, x_t, t, y)
  np.testing.assert_allclose(_time_mlp_input(net.clone(time_scale=50.0), x_t, 2 * t, y), got,
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(_time_mlp_input(net, x_t, 2 * t, y), got, atol=1e-2)
  with pytest.raises(ValueError, match="embedding must be 'fourier' or 'sinusoidal'"):
    jax.eval_shape(net.clone(embedding="learned").init, KEY, x_t, t, y)


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
