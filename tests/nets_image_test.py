"""Tests for the image classifiers, the coupled U-Net and the logit net (cdjax.nets)."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from cdjax import nets
from cdjax.nets.layers import count_params
from cdjax.nets.logits import LogitBlock

K = 10
B = 2
# Small variants keep compile times low; the defaults are checked by shape/cost only.
SMALL = {
    "coupled_unet": dict(width=8, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,)),
    "logit_net": dict(hidden=32, depth=2, enc_width=8, enc_depth=2),
    "cnn_classifier": dict(width=8, depth=2),
}
TINY = {"coupled_unet": dict(ch_mult=(1,), attn_levels=(0,))}   # grad compiles are slow


def _args(name, shape, seed=0):
  """Random inputs for `name` in its call convention, images [B, *shape]."""
  kx, ky, kl, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  x = jax.random.uniform(kx, (B, *shape), minval=-1.0, maxval=1.0)
  y = jax.random.uniform(ky, (B, *shape), minval=-1.0, maxval=1.0)
  l, c = jax.random.normal(kl, (B, K)), jax.random.normal(kc, (B, K))
  t = jnp.array([3.0, 120.0])
  return {"coupled_unet": (x, t, y, l), "logit_net": (l, t, c, y)}.get(name, (x,))


def _init(net, args):
  return jax.eval_shape(net.init, jax.random.PRNGKey(0), *args)


@pytest.mark.parametrize("shape", [(28, 28, 1), (32, 32, 3)])
@pytest.mark.parametrize("name,kwargs", [
    ("cnn_classifier", {}), ("resnet_classifier", {}), ("coupled_unet", {}), ("logit_net", {}),
    ("coupled_unet", dict(ch_mult=(1, 2, 2, 2))),   # 28 is padded to 32 and cropped back
])
def test_default_output_shapes(name, kwargs, shape):
  net = nets.get_network(name, **kwargs)
  args = _args(name, shape)
  out = jax.eval_shape(net.apply, _init(net, args), *args)
  expected = args[0].shape if name == "coupled_unet" else (B, K)
  assert out.shape == expected and out.dtype == jnp.float32


@pytest.mark.parametrize("name,lo,hi", [
    ("cnn_classifier", 1e5, 5e5), ("resnet_classifier", 3e5, 1.5e6),
    ("coupled_unet", 1e6, 4e6), ("logit_net", 2e5, 2e6),
])
def test_default_param_counts(name, lo, hi):
  net = nets.get_network(name)
  n = count_params(_init(net, _args(name, (28, 28, 1))))
  assert lo <= n <= hi, n


def test_logit_net_is_cheap_relative_to_unet():
  def flops(name):
    net = nets.get_network(name)
    args = _args(name, (28, 28, 1))
    return jax.jit(net.apply).lower(_init(net, args), *args).cost_analysis()["flops"]
  assert flops("logit_net") < 0.2 * flops("coupled_unet")


def _random_params(net, args, seed=0):
  """Random params with the structure of `net.init` (jit-compiling the init itself takes tens
  of seconds on CPU): kernels ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1^2), rest N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)

  def draw(path, s):
    z = rng.standard_normal(s.shape).astype(np.float32)
    leaf = jax.tree_util.keystr(path[-1:])
    if "kernel" in leaf:
      return z / np.sqrt(np.prod(s.shape[:-1]))
    return 1.0 + 0.1 * z if "scale" in leaf else 0.1 * z

  return jax.tree_util.tree_map_with_path(draw, _init(net, args))


@pytest.mark.parametrize("name,changes", [
    ("coupled_unet", {0: "x_t", 1: "t", 2: "y", 3: "logits"}),
    ("logit_net", {0: "l_t", 1: "t", 2: "cond_logits", 3: "cond_signal"}),
])
def test_output_depends_on_every_input(name, changes):
  net = nets.get_network(name, **SMALL[name])
  args = _args(name, (28, 28, 1))
  other = _args(name, (28, 28, 1), seed=1)
  apply = jax.jit(net.apply)
  params = _random_params(net, args)
  base = apply(params, *args)
  assert np.all(np.isfinite(base))
  for i, what in changes.items():
    changed = list(args)
    changed[i] = other[i] if what != "t" else args[i] + 7.0
    diff = np.abs(apply(params, *changed) - base).max()
    assert diff > 1e-4, f"{name} ignores {what}"


@pytest.mark.parametrize("name", ["coupled_unet", "logit_net"])
def test_remat_matches(name):
  args = _args(name, (28, 28, 1))
  kwargs = {**SMALL[name], **TINY.get(name, {})}
  plain, remat = (nets.get_network(name, **kwargs, remat=r) for r in (False, True))
  params = _random_params(plain, args)
  assert jax.tree_util.tree_structure(_init(remat, args)) == jax.tree_util.tree_structure(params)

  def loss_and_grad(net):
    return jax.jit(jax.value_and_grad(lambda p: jnp.sum(net.apply(p, *args) ** 2)))(params)

  (v0, g0), (v1, g1) = loss_and_grad(plain), loss_and_grad(remat)
  np.testing.assert_allclose(v0, v1, rtol=1e-5)
  g0, g1 = (jax.flatten_util.ravel_pytree(g)[0] for g in (g0, g1))
  np.testing.assert_allclose(g0, g1, rtol=1e-4, atol=1e-5 * np.abs(g0).max())


@pytest.mark.parametrize("name", ["cnn_classifier", "resnet_classifier", "coupled_unet",
                                  "logit_net"])
def test_params_only(name):
  """GroupNorm/LayerNorm only: no batch_stats, so a frozen classifier is a params pytree."""
  assert set(_init(nets.get_network(name), _args(name, (28, 28, 1)))) == {"params"}


def test_dropout_is_active_only_in_training():
  net = nets.get_network("cnn_classifier", **SMALL["cnn_classifier"], dropout=0.5)
  (x,) = _args("cnn_classifier", (28, 28, 1))
  params = _random_params(net, (x,))
  apply = jax.jit(net.apply, static_argnames="train")
  np.testing.assert_array_equal(apply(params, x), apply(params, x))
  rngs = {"dropout": jax.random.PRNGKey(1)}
  assert not np.allclose(apply(params, x, train=True, rngs=rngs), apply(params, x))


def _replace(args, i, value):
  return tuple(value if j == i else a for j, a in enumerate(args))


@pytest.mark.parametrize("name,index,value,match", [
    ("coupled_unet", 0, jnp.zeros((B, 28, 28)), "x_t"),
    ("coupled_unet", 2, jnp.zeros((B, 32, 32, 1)), "y"),
    ("coupled_unet", 3, jnp.zeros((B, K + 1)), "logits"),
    ("coupled_unet", 1, jnp.zeros((B + 1,)), "t"),
    ("logit_net", 0, jnp.zeros((B, K + 1)), "l_t"),
    ("logit_net", 2, jnp.zeros((B, K - 1)), "cond_logits"),
    ("logit_net", 3, jnp.zeros((B, 28, 28)), "cond_signal"),
    ("cnn_classifier", 0, jnp.zeros((B, 28, 28)), "x"),
])
def test_wrong_shapes_raise_named_errors(name, index, value, match):
  net = nets.get_network(name, **SMALL[name])
  args = _replace(_args(name, (28, 28, 1)), index, value)
  with pytest.raises(ValueError, match=match):
    _init(net, args)


def test_coupled_unet_rejects_latent():
  net = nets.get_network("coupled_unet", **SMALL["coupled_unet"])
  args = _args("coupled_unet", (28, 28, 1))
  with pytest.raises(ValueError, match="latent"):
    jax.eval_shape(lambda *a: net.init(jax.random.PRNGKey(0), *a, latent=a[0]), *args)


def test_unknown_network_lists_known_names():
  with pytest.raises(KeyError) as err:
    nets.get_network("nope")
  for name in ("cnn_classifier", "resnet_classifier", "coupled_unet", "logit_net"):
    assert name in str(err.value)


def test_count_params():
  assert count_params({"a": jnp.zeros((3, 4)), "b": {"c": jnp.zeros((5,))}}) == 17


def test_coupled_unet_gradients_stay_bounded_with_zero_logits():
  """Signal pre-training conditions on all-zero logits: the logit encoder must stay well-conditioned."""
  net = nets.get_network("coupled_unet", num_classes=K, width=16, ch_mult=(1, 2), attn_levels=())
  x, t, y, _ = _args("coupled_unet", (28, 28, 1))
  zero_bias = lambda path, v: jnp.zeros_like(v) if "bias" in jax.tree_util.keystr(path[-1:]) else v
  params = jax.tree_util.tree_map_with_path(zero_bias, _random_params(net, (x, t, y, jnp.zeros((B, K))))["params"])   # biases start at 0, as in net.init
  norms = {}
  for name, logits in [("zeros", jnp.zeros((B, K))), ("random", jax.random.normal(jax.random.PRNGKey(1), (B, K)))]:
    loss = lambda p: jnp.mean((net.apply({"params": p}, x, t, y, logits) - x) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    norms[name] = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads))))
  assert norms["zeros"] < 10 * norms["random"], norms   # was ~1e11 before the ones channel


def test_resnet_classifier_strides_from_stage_1_on():
  """Only the first block of stages i > 0 strides by 2: 28x28 through stage 0, 14x14 in stage 1."""
  net = nets.get_network("resnet_classifier", widths=(8, 16), blocks=(2, 2))
  (x,) = _args("resnet_classifier", (28, 28, 1))
  _, state = jax.eval_shape(lambda p, x: net.apply(p, x, capture_intermediates=True,
                                                   mutable=["intermediates"]), _init(net, (x,)), x)
  shapes = {name: out["__call__"][0].shape for name, out in state["intermediates"].items()
            if name.startswith("stage")}
  assert shapes == {"stage0_block0": (B, 28, 28, 8), "stage0_block1": (B, 28, 28, 8),
                    "stage1_block0": (B, 14, 14, 16), "stage1_block1": (B, 14, 14, 16)}


def _coupled_unet_params():
  net = nets.get_network("coupled_unet", **SMALL["coupled_unet"])   # width 8, ch_mult (1, 2)
  return _init(net, _args("coupled_unet", (28, 28, 1)))["params"]


def test_coupled_unet_time_enters_enc_x_and_the_decoder_only():
  """FiLM(time) params in every ResBlock of the x_t encoder, the middle and the decoder, in none
  of the y and logit encoders'."""
  params = _coupled_unet_params()
  film = {f"{enc}/{name}": "FiLM_0" in params[enc][name] for enc in ("enc_x", "enc_y", "enc_logits")
          for name in params[enc] if "_res" in name}
  film.update({name: "FiLM_0" in block for name, block in params.items() if "_res" in name})
  assert film == {"enc_x/down0_res0": True, "enc_x/down1_res0": True,
                  "enc_y/down0_res0": False, "enc_y/down1_res0": False,
                  "enc_logits/down0_res0": False, "enc_logits/down1_res0": False,
                  "mid_res0": True, "mid_res1": True, "up1_res0": True, "up1_res1": True,
                  "up0_res0": True, "up0_res1": True}


def test_coupled_unet_decoder_consumes_every_skip():
  """num_res_blocks + 1 decoder ResBlocks per level, each reading h and one skip concatenated
  over the three encoders (3x its width): skips [stem 8, down0_res0 8, downsample 8, down1_res0
  16] x 3 are popped from the last, so up0_res1 reads the stems' 24 channels."""
  params = _coupled_unet_params()
  in_channels = {name: block["Conv_0"]["kernel"].shape[2] for name, block in params.items()
                 if name.startswith("up") and "_res" in name}
  assert in_channels == {"up1_res0": 16 + 48, "up1_res1": 16 + 24, "up0_res0": 16 + 24,
                         "up0_res1": 8 + 24}


def test_logit_block_is_the_identity_with_zero_residual_branches():
  """LogitBlock: h + Dense(MLP(h, emb)), then AttentionBlock's x + Attn: with the MLP's last
  Dense and the attention's output projection zeroed, exactly h, whatever the other params."""
  h, emb, context = (jax.random.normal(jax.random.PRNGKey(i), s)
                     for i, s in enumerate([(B, 16), (B, 8), (B, 4, 8)]))
  block = LogitBlock(hidden=16, heads=2, dropout=0.0, groups=8)
  params = _random_params(block, (h, emb, context))["params"]
  params["Dense_1"] = jax.tree.map(jnp.zeros_like, params["Dense_1"])
  attn = params["AttentionBlock_0"]["MultiHeadDotProductAttention_0"]
  attn["out"] = jax.tree.map(jnp.zeros_like, attn["out"])
  np.testing.assert_array_equal(block.apply({"params": params}, h, emb, context), h)


def test_logit_net_with_zero_residual_branches_is_its_input_and_output_layers():
  """With every LogitBlock's residual branches zeroed (MLP's last Dense, attention's output
  projection), LogitNet is Dense(SiLU(LN(Dense(concat(l_t, f(c)))))), whatever t and c."""
  net = nets.get_network("logit_net", **SMALL["logit_net"])
  l, t, c, y = _args("logit_net", (28, 28, 1))
  params = _random_params(net, (l, t, c, y))["params"]
  for i in range(SMALL["logit_net"]["depth"]):
    block = params[f"block{i}"]
    block["Dense_1"] = jax.tree.map(jnp.zeros_like, block["Dense_1"])
    attn = block["AttentionBlock_0"]["MultiHeadDotProductAttention_0"]
    attn["out"] = jax.tree.map(jnp.zeros_like, attn["out"])
  p = jax.tree.map(np.asarray, params)
  h = np.concatenate([l, c], axis=-1) @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
  h = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = h * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
  want = (h / (1 + np.exp(-h))) @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
  np.testing.assert_allclose(jax.jit(net.apply)({"params": params}, l, t, c, y), want, rtol=1e-4,
                             atol=1e-5)


@pytest.mark.parametrize("name", ["coupled_unet", "logit_net"])
def test_time_steps_selects_a_learned_table_of_integer_times(name):
  """time_steps = 5: the time embedding is a [5, dim] table read at round(t), so t = (2.4, 3.6)
  gives exactly the output of t = (2, 4), and t = (3, 4) another one."""
  net = nets.get_network(name, **SMALL[name], time_steps=5)
  args = _args(name, (28, 28, 1))
  params = _random_params(net, args)
  assert params["params"]["TimeEmbedding_0"]["Embed_0"]["embedding"].shape[0] == 5
  apply = jax.jit(lambda t: net.apply(params, *_replace(args, 1, t)))
  base = apply(jnp.array([2.0, 4.0]))
  np.testing.assert_array_equal(apply(jnp.array([2.4, 3.6])), base)
  assert np.abs(apply(jnp.array([3.0, 4.0])) - base).max() > 1e-4


def test_coupled_unet_pads_at_the_end_and_crops_back():
  """H, W = 25, 22 with ch_mult (1, 2, 2) (factor 4) are zero-padded at the end to 28, 24: the
  output is that of the explicitly end-padded inputs, cropped to 25 x 22."""
  net = nets.get_network("coupled_unet", width=8, ch_mult=(1, 2, 2), attn_levels=())
  x, t, y, l = _args("coupled_unet", (25, 22, 1))
  pad = lambda a: jnp.pad(a, [(0, 0), (0, 3), (0, 2), (0, 0)])
  params = _random_params(net, (pad(x), t, pad(y), l))
  out = jax.jit(net.apply)(params, x, t, y, l)
  assert out.shape == x.shape
  np.testing.assert_allclose(out, jax.jit(net.apply)(params, pad(x), t, pad(y), l)[:, :25, :22],
                             rtol=0, atol=1e-5)


@pytest.mark.parametrize("attn_levels", [(1,), (0,)])
def test_coupled_unet_attends_at_attn_levels_only(attn_levels):
  """An AttentionBlock after every ResBlock of a level in attn_levels, in each encoder (1 per
  level) and the decoder (num_res_blocks + 1 per level), and one in the middle."""
  net = nets.get_network("coupled_unet", **{**SMALL["coupled_unet"], "attn_levels": attn_levels})
  params = _init(net, _args("coupled_unet", (28, 28, 1)))["params"]
  found = {f"{enc}/{name}" for enc in ("enc_x", "enc_y", "enc_logits") for name in params[enc]
           if "attn" in name} | {name for name in params if "attn" in name}
  (level,) = attn_levels
  assert found == {f"{enc}/down{level}_attn0" for enc in ("enc_x", "enc_y", "enc_logits")} | {
      "mid_attn", f"up{level}_attn0", f"up{level}_attn1"}


def test_resnet_classifier_rejects_widths_and_blocks_of_different_lengths():
  net = nets.get_network("resnet_classifier", widths=(8, 16, 32), blocks=(1, 1))
  with pytest.raises(ValueError, match=r"widths \(8, 16, 32\) and blocks \(1, 1\)"):
    _init(net, _args("resnet_classifier", (28, 28, 1)))
