"""Speech pipeline (cdjax.speech): the audio observation, one train step of each speech trainer
(enhancer, SGMSE+, Ex-Diff), PC-sampler enhancement, the latent path, the configs, WAV input.

Tiny STFTs (n_fft 62, 32 bins) and nets keep compile times to seconds; no dataset is built
(a Gaussian-noise corruption needs no noise clips; batches are synthetic).
"""
import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from cdjax import audio
from cdjax import checkpoint
from cdjax import coupled
from cdjax import data
from cdjax import exdiff
from cdjax import speech
from cdjax import train
from cdjax.data import corruptions
from cdjax.data.corruptions import get_corruption
from cdjax.nets import get_network
from cdjax.nets.layers import count_params
from configs import default
from configs import speech_enhancement
from configs import speech_keywords
from configs.speech_enhancement import set_fields

KEY = jax.random.key(0, impl="rbg")
B, L = 4, 480          # items, samples: 31 frames at hop 16 -> padded to 32
F = 32                 # n_fft 62


def _config():
  c = default.get_config()
  c.data.update(name="spoken_digits", modality="audio", shape=(L,), num_classes=10)
  c.audio.update(n_fft=62, hop_length=16, frame_multiple=4)
  set_fields(c.corruption, name="gaussian", kwargs=dict(sigma=0.1))
  set_fields(c.enhancer, net_kwargs=dict(widths=(8, 16), strides=((2, 2),)), num_steps=2, batch_size=B)
  set_fields(c.signal, net="ncsnpp",
                  net_kwargs=dict(nf=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(),
                                  logit_hidden=8, latent_mode="film"),
                  sde="ouve", sde_kwargs=dict(N=3), parameterization="neg_score", x0_clip=None,
                  pretrain_steps=2, batch_size=B)
  c.sampling.update(signal_predictor="reverse_diffusion", corrector="annealed_langevin", snr=0.5)
  c.mesh.data = 1
  return c


def _speech(seed=0, batch=B, length=L):
  rng = np.random.default_rng(seed)
  t = np.arange(length) / 16000
  x = np.sin(2 * np.pi * rng.uniform(100, 400, (batch, 1)) * t) * np.hanning(length)
  return (0.5 * x).astype(np.float32)


def _batch(seed=0):
  return {"audio": _speech(seed), "label": np.arange(B, dtype=np.int32) % 10}


def _perturb(tree, seed=0, scale=0.1):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.standard_normal(p.shape).astype(p.dtype), tree)


def _train_two_steps(config, name):
  """Two steps of trainer `name` through `train.make_train_step`; returns (state, losses)."""
  trainer = train.TRAINERS.get(name)(config)
  optimizer = train.make_optimizer(config.optim, trainer.num_steps)
  example = jax.tree.map(lambda v: v[:1], _batch())
  params = trainer.init_params(KEY, example)
  mesh = train.parallel.make_mesh(config)
  # Replicated as in `train.train`, so that the second step reuses the first one's compilation.
  state = train.parallel.replicate(
      train.TrainState.create(params, optimizer, jax.random.key(1)), mesh)
  step = train.make_train_step(trainer.loss_fn, optimizer, config, mesh)
  frozen = train.parallel.replicate(trainer.frozen, mesh)
  losses = []
  for i in range(2):
    state, m = step(state, _batch(i), frozen)
    losses.append(float(m["loss"]))
  return state, trainer, losses


def _save_state(workdir, state, meta):
  """`state` as step 2 of a training workdir, with checkpoint `meta`."""
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), _config().checkpoint)
  ckpt.save(2, state, None, meta)
  ckpt.wait()
  ckpt.close()


@pytest.fixture(scope="module")
def enhancer_workdir(tmp_path_factory):
  """A trained-for-two-steps enhancer saved as a training workdir (as `train.train` does)."""
  config = _config()
  state, _, losses = _train_two_steps(config, "enhancer")
  assert np.all(np.isfinite(losses))
  workdir = str(tmp_path_factory.mktemp("enhancer"))
  _save_state(workdir, state, {"trainer": "enhancer"})
  return workdir


def test_frontend_round_trip_and_padding():
  frontend = audio.Frontend.from_config(_config())
  y = _speech(1) + 0.05 * np.random.default_rng(2).standard_normal((B, L)).astype(np.float32)
  x = _speech(1)
  y_spec, x_spec, scale = frontend.analyze(y, x)
  assert y_spec.shape == x_spec.shape == (B, F, 32) and y_spec.dtype == jnp.complex64
  np.testing.assert_allclose(scale[:, 0], np.abs(y).max(-1), rtol=1e-6)
  np.testing.assert_allclose(frontend.synthesize(y_spec, L, scale), y, atol=2e-5)
  np.testing.assert_allclose(frontend.synthesize(x_spec, L, scale), x, atol=2e-5)
  sgmse = audio.Frontend()
  assert audio.num_frames(sgmse.padded_length(16000)) == 128   # 126 frames -> 128
  assert sgmse.padded_length(8064) == 8064


def test_enhance_waveforms_shards_batches_over_the_mesh():
  """Batches split over 4 devices (params replicated) give what one device gives, padding
  included; a batch the devices do not divide is refused before anything runs."""
  frontend = audio.Frontend.from_config(_config())
  enhance = lambda params, key, y: y * params["gain"] + 0.01 * jax.random.normal(key, y.shape)
  y = np.concatenate([_speech(1), _speech(2)])[:7]   # 7 clips: the last batch of 4 is padded
  params = {"gain": jnp.float32(1.0)}
  one, _, _ = speech.enhance_waveforms(enhance, params, frontend, y, jax.random.key(3), 4)
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:4]), ("data",))
  four, _, _ = speech.enhance_waveforms(enhance, params, frontend, y, jax.random.key(3), 4, mesh)
  assert one.shape == four.shape == y.shape
  np.testing.assert_allclose(four, one, atol=1e-6)
  np.testing.assert_allclose(one, y, atol=0.02)   # gain 1 on the spectrogram, plus small noise
  assert np.abs(one - y).max() > 1e-3                # ... which each batch draws
  with pytest.raises(ValueError, match="not divisible by the 4 devices"):
    speech.enhance_waveforms(enhance, params, frontend, y, jax.random.key(3), 6, mesh)


def test_audio_observation_is_the_normalised_mixture():
  config = _config()
  observe = train.OBSERVATIONS.get("audio")(config)
  key = jax.random.key(3)
  batch = _batch()
  x0, y = observe(key, batch)
  assert x0.shape == y.shape == (B, F, 32)
  mixture = get_corruption("gaussian", sigma=0.1)(jax.random.split(key)[1], batch["audio"])
  peak = np.abs(np.asarray(mixture)).max(-1, keepdims=True)
  frontend = audio.Frontend.from_config(config)
  np.testing.assert_allclose(frontend.synthesize(y, L), mixture / peak, atol=2e-5)
  np.testing.assert_allclose(frontend.synthesize(x0, L), batch["audio"] / peak, atol=2e-5)
  # Training crops: the whole clips are mixed (as in evaluation), then clean and mixture are
  # cropped to one window of (crop_frames - 1) * hop samples -> exactly crop_frames frames.
  config.audio.train_crop_frames = 16
  x0, y = train.OBSERVATIONS.get("audio")(config)(key, batch)
  assert x0.shape == y.shape == (B, F, 16)
  n = 15 * 16
  x_crop, y_crop = frontend.synthesize(x0, n), frontend.synthesize(y, n)
  for i in range(B):   # the window of the whole mixture that y is, and x at the same start
    windows = np.stack([mixture[i, s:s + n] for s in range(L - n + 1)])
    windows /= np.abs(windows).max(-1, keepdims=True)
    start = np.abs(windows - y_crop[i]).max(-1).argmin()
    np.testing.assert_allclose(y_crop[i], windows[start], atol=2e-5)
    np.testing.assert_allclose(x_crop[i], batch["audio"][i, start:start + n]
                               / np.abs(mixture[i, start:start + n]).max(), atol=2e-5)
  # Crops longer than the clips: SGMSE+ zero-pads both, centered, to the crop's length.
  config.audio.train_crop_frames = 40
  x0, y = train.OBSERVATIONS.get("audio")(config)(key, batch)
  assert x0.shape == y.shape == (B, F, 40)
  n, left = 39 * 16, (39 * 16 - L) // 2
  padded = lambda w: np.pad(w / peak, [(0, 0), (left, n - L - left)])
  np.testing.assert_allclose(frontend.synthesize(y, n), padded(mixture), atol=2e-5)
  np.testing.assert_allclose(frontend.synthesize(x0, n), padded(batch["audio"]), atol=2e-5)


def test_speech_trainers_take_finite_steps(enhancer_workdir, tmp_path):
  config = _config()
  config.signal.net_kwargs.latent_mode = "none"
  sgmse_state, _, sgmse_losses = _train_two_steps(config, "signal")
  assert np.all(np.isfinite(sgmse_losses)) and "latent" not in sgmse_state.params

  config.signal.net_kwargs.latent_mode = "film"
  config.checkpoint.enhancer = enhancer_workdir
  state, trainer, losses = _train_two_steps(config, "signal")
  assert np.all(np.isfinite(losses))
  assert set(trainer.frozen) == {"enhancer"}
  assert "latent" in state.params                      # the integration layer is trained
  enhancer = exdiff.load_enhancer(config)
  assert jax.tree.all(jax.tree.map(np.array_equal, trainer.frozen["enhancer"], enhancer))
  # The integration layer (zero-initialised) got gradients through the latent: it moved.
  assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(state.params["latent"]))

  # Its checkpoint records the enhancer's hash (as `train.train` saves it); loading it with
  # another enhancer in the condition's workdir is refused, naming the enhancer.
  frozen = train.frozen_sha256(trainer.frozen)
  assert frozen == {"enhancer": checkpoint.params_sha256(enhancer)}
  for condition, enhancer_state in (("same", None), ("other", state)):
    os.makedirs(tmp_path / condition)
    _save_state(str(tmp_path / condition / "exdiff"), state, {"frozen_sha256": frozen})
    if enhancer_state is None:
      os.symlink(enhancer_workdir, tmp_path / condition / "enhancer")
    else:   # any other params stand in for a retrained enhancer
      _save_state(str(tmp_path / condition / "enhancer"), enhancer_state, {})
  params = speech.trained_params(str(tmp_path / "same"), "exdiff")
  jax.tree.map(np.testing.assert_array_equal, params["enhancer"], enhancer)
  with pytest.raises(checkpoint.CheckpointError, match="trained against the frozen enhancer"):
    speech.trained_params(str(tmp_path / "other"), "exdiff")


def test_trainer_init_compiles_one_program(enhancer_workdir, caplog):
  """Ex-Diff's init traces the observation and the frozen enhancer's latent for their shapes
  only: one program is compiled, no operation eagerly."""
  config = _config()
  config.checkpoint.enhancer = enhancer_workdir
  trainer = train.TRAINERS.get("signal")(config)
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
    params = trainer.init_params(KEY, jax.tree.map(lambda v: v[:1], _batch()))
  compiled = [r.getMessage().split(" with ")[0] for r in caplog.records
              if r.getMessage().startswith("Compiling ")]
  assert compiled == ["Compiling jit(<lambda>)"]
  assert "latent" in params   # the integration layer, sized by the latent's shape


def test_pc_sampler_enhancement_and_latent_path(enhancer_workdir):
  config = _config()
  config.checkpoint.enhancer = enhancer_workdir
  enhancer = exdiff.load_enhancer(config)
  y_spec = audio.Frontend.from_config(config).analyze(_speech(4) + 0.1)[0]
  net = get_network(config.signal.net, **config.signal.net_kwargs)
  latent = exdiff.latent_fn(config)(enhancer, y_spec)
  zeros = jnp.zeros((B, 10))
  score = _perturb(net.init(KEY, y_spec, jnp.full((B,), 0.5), y_spec, zeros, latent)["params"])

  for method, params in (("exdiff", {"score": score, "enhancer": enhancer}),
                         ("discriminative", enhancer)):
    enhance = speech.get_enhance_fn(config, method)
    x0 = jax.jit(enhance)(params, jax.random.key(5), y_spec)
    assert x0.shape == y_spec.shape and x0.dtype == jnp.complex64, method
    assert np.all(np.isfinite(np.asarray(x0))), method
    assert enhance.nfe == (1 if method == "discriminative" else 2 * 3)

  # With non-zero integration weights the Ex-Diff score net differs from the baseline's call.
  model = speech.coupled_model(config)
  t = jnp.full((B,), 0.5)
  no_film = flax.core.unfreeze(score)
  no_film["latent"] = jax.tree.map(jnp.zeros_like, score["latent"])

  @jax.jit
  def exdiff_and_baseline(score):
    p = {"score": score, "enhancer": enhancer}
    return (model.signal_net(p, y_spec, t, model.signal_context(p, y_spec), zeros),
            net.apply({"params": score}, y_spec, t, y_spec, zeros))
  assert not np.allclose(*exdiff_and_baseline(score), atol=1e-4)
  np.testing.assert_allclose(*exdiff_and_baseline(no_film), atol=1e-5)


def test_exdiff_enhancement_feeds_the_enhancers_latent_to_the_score_net(monkeypatch):
  """get_enhance_fn: "exdiff" calls score(x, t, y, logits, latent(enhancer, y)), "sgmse" the same
  net without the latent; otherwise the two samplers are the same (stub nets)."""
  seen = []

  class Score:
    def apply(self, variables, x, t, y, logits, *latent, train):
      assert train is False
      seen.append((logits.shape, len(latent)))
      return variables["params"]["w"] * (x - y) + sum(latent)
  monkeypatch.setattr(speech.nets, "get_network", lambda name, **kwargs: Score())
  monkeypatch.setattr(speech.exdiff, "latent_fn", lambda config: lambda p, y: p["c"] * y)
  config = _config()
  y = audio.Frontend.from_config(config).analyze(_speech(4) + 0.1)[0]
  key, score = jax.random.key(5), {"w": jnp.float32(0.3)}
  enhance = {m: jax.jit(speech.get_enhance_fn(config, m)) for m in ("exdiff", "sgmse")}
  sgmse = enhance["sgmse"]({"score": score}, key, y)
  assert set(seen) == {((B, 10), 0)}
  exdiff_out = lambda c: enhance["exdiff"]({"score": score, "enhancer": {"c": c}}, key, y)
  assert not np.allclose(exdiff_out(0.5), sgmse, atol=1e-3)
  assert seen[-1] == ((B, 10), 1)
  np.testing.assert_allclose(exdiff_out(0.0), sgmse, atol=1e-6)


def test_interference_is_what_the_corruption_added():
  # Reverberation scales the direct path of the clean signal (unit-energy RIR): noisy - clean
  # would count part of the target as interference, and a perfect estimate would score 8 dB.
  clean = 0.1 * np.random.default_rng(0).standard_normal((4, 8000)).astype(np.float32)
  config = _config()
  set_fields(config.corruption, name="reverb", kwargs=dict(rt60=0.3, drr_db=3.0))
  gain = data.clean_gain_from_config(config)
  rir = corruptions.room_impulse_response(jax.random.PRNGKey(1), 0.3, 4800, 3.0, 16000)
  assert gain == pytest.approx(float(rir[0])) == pytest.approx(1 / np.sqrt(1 + 10 ** -0.3))
  noisy = np.asarray(data.corruption_from_config(config, "test")(jax.random.PRNGKey(0), clean))
  perfect = speech._quality(clean, noisy, clean, 16000, gain)
  assert np.all(perfect["si_sir"] > 30) and np.all(perfect["si_sar"] > 30)
  assert np.all(speech._quality(clean, noisy, clean, 16000)["si_sir"] < 15)   # the target leaks
  set_fields(config.corruption, name="gaussian", kwargs=dict(sigma=0.1))
  assert data.clean_gain_from_config(config) == 1.0


def test_enhance_file_and_wav_errors(enhancer_workdir, tmp_path):
  config = _config()
  os.symlink(enhancer_workdir, os.path.join(tmp_path, "enhancer"))
  src = os.path.join(tmp_path, "in.wav")
  soundfile.write(src, _speech(7, batch=1, length=240)[0], 8000)   # 8 kHz in: resampled
  dst = os.path.join(tmp_path, "out.wav")
  speech.enhance_file(config, str(tmp_path), src, dst)             # the enhancer: all there is
  wave, rate = soundfile.read(dst)
  assert rate == 16000 and len(wave) == 480 and np.all(np.isfinite(wave))

  silent = os.path.join(tmp_path, "silent.wav")
  soundfile.write(silent, np.zeros(800, np.float32), 16000)
  with pytest.raises(ValueError, match="silent"):
    speech.read_wav(silent, 16000)
  bad = os.path.join(tmp_path, "bad.wav")
  with open(bad, "w") as f:
    f.write("not audio")
  with pytest.raises(ValueError, match="Cannot read"):
    speech.read_wav(bad, 16000)
  with pytest.raises(FileNotFoundError, match="No audio file"):
    speech.read_wav(os.path.join(tmp_path, "missing.wav"), 16000)
  with pytest.raises(FileNotFoundError, match="No trained 'sgmse'"):
    speech.enhance_file(config, str(tmp_path), src, dst, method="sgmse")
  with open(src, "rb") as f:
    recording = f.read()
  with pytest.raises(ValueError, match="is the input file"):
    speech.enhance_file(config, str(tmp_path), src, os.path.join(tmp_path, ".", "in.wav"))
  with open(src, "rb") as f:
    assert f.read() == recording


def test_read_wav_mixes_channels_down_and_resamples(tmp_path):
  """A stereo file is the mean of its channels (not its first one), unchanged at the model's
  rate and at twice the length from half the rate; a peak below 1e-6 counts as silent."""
  left = _speech(3, batch=1, length=240)[0]
  path = os.path.join(tmp_path, "stereo.wav")
  soundfile.write(path, np.stack([left, 0.5 * left], -1), 16000, subtype="FLOAT")
  np.testing.assert_array_equal(speech.read_wav(path, 16000), 0.75 * left)
  soundfile.write(path, np.stack([left, 0.5 * left], -1), 8000, subtype="FLOAT")
  assert speech.read_wav(path, 16000).shape == (480,)
  soundfile.write(path, np.full(800, 5e-7, np.float32), 16000, subtype="FLOAT")
  with pytest.raises(ValueError, match="silent"):
    speech.read_wav(path, 16000)


def test_speech_classifier_reads_spectrograms_at_any_gain():
  config = _config()
  net = get_network("speech_classifier", num_classes=10, width=8, depth=1, input_peak=0.5,
                    spec_n_fft=62, spec_hop_length=16)
  wave = jnp.asarray(_speech(8, length=L))
  frontend = audio.Frontend.from_config(config)
  spec = frontend.to_spec(0.3 * wave)
  padded = jnp.pad(wave, ((0, 0), (0, frontend.padded_length(L) - L)))
  params = _perturb(jax.jit(net.init)(KEY, wave)["params"])
  out = jax.jit(lambda x, s: (net.apply({"params": params}, x), net.apply({"params": params}, s)))
  np.testing.assert_allclose(*out(padded, spec), atol=1e-3)


def test_configs_build():
  from configs import sgmse_full, speech_commands, speech_enhancement, speech_keywords
  for module in (speech_enhancement, speech_keywords, speech_commands, sgmse_full):
    c = module.get_config()
    assert c.data.modality == "audio" and c.signal.net == "ncsnpp"
  c = speech_commands.get_config()
  assert c.signal.sde_kwargs.N == c.logits.sde_kwargs.N == 50
  assert c.sampling.parallel_order == "signal_first" and c.sampling.initial_logits == "classifier"


def test_sgmse_full_shapes():
  """configs/sgmse_full.py: SGMSE+'s 65.6M score net; the enhancer's 384-channel latent at
  F/64 x T/32 enters the score net's matching level."""
  from configs import sgmse_full
  c = sgmse_full.get_config()
  frames = c.audio.train_crop_frames
  y = jax.ShapeDtypeStruct((1, 256, frames), jnp.complex64)
  enhancer = get_network(c.enhancer.net, **c.enhancer.net_kwargs)
  latent = jax.eval_shape(lambda y: enhancer.init_with_output(KEY, y)[0][1], y)
  assert latent.shape == (1, 256 // 64, frames // 32, 384)
  net = get_network(c.signal.net, **dict(c.signal.net_kwargs, latent_mode="none"))
  assert count_params(jax.eval_shape(net.init, KEY, y, jnp.ones((1,)), y)) == 65_590_694
  exdiff_net = get_network(c.signal.net, **c.signal.net_kwargs)
  out, params = jax.eval_shape(
      lambda y, z: exdiff_net.init_with_output(KEY, y, jnp.ones((1,)), y, jnp.zeros((1, 10)), z),
      y, latent)
  assert out.shape == y.shape and "latent" in params["params"]


def _coupled_config(enhancer_workdir):
  """`_config()` with Ex-Diff reading the enhancer in `enhancer_workdir`, a tiny speech
  classifier and an OU logit branch."""
  config = _config()
  config.checkpoint.enhancer = enhancer_workdir
  set_fields(config.classifier, net="speech_classifier",
             net_kwargs=dict(num_classes=10, width=8, depth=1, input_peak=0.5, spec_n_fft=62,
                             spec_hop_length=16))
  set_fields(config.logits, net="speech_logit_net",
             net_kwargs=dict(num_classes=10, hidden=16, depth=1, enc_width=8, enc_depth=1,
                             pool=(4, 4)),
             sde="ouve", sde_kwargs=dict(N=3), parameterization="eps")
  return config


def test_joint_training_with_exdiff_signal_branch(enhancer_workdir, tmp_path):
  """The joint stage with the Ex-Diff signal branch: the frozen enhancer and classifier ride in
  `frozen`, and the signal term reads the enhancer's latent (its zero-initialised integration
  layer gets gradients and moves); the logit net is trained too."""
  config = _coupled_config(enhancer_workdir)
  config.train.update(joint_steps=2, joint_logits_cond="noised_clean")
  config.sampling.switch_t = 1.0   # every example's logit term reads the signal's x0_hat
  classifier = get_network(config.classifier.net, **config.classifier.net_kwargs)
  y_spec = jnp.zeros((1, F, 32), jnp.complex64)
  config.checkpoint.classifier = str(tmp_path / "classifier")
  checkpoint.save_classifier(config.checkpoint.classifier,
                             classifier.init(KEY, y_spec)["params"], 0.1, config)
  state, trainer, losses = _train_two_steps(config, "joint")
  assert np.all(np.isfinite(losses))
  assert set(trainer.frozen) == {"enhancer", "classifier"} and set(state.params) == {"signal", "logits"}
  jax.tree.map(np.testing.assert_array_equal, trainer.frozen["enhancer"],
               exdiff.load_enhancer(config))
  assert any(float(jnp.abs(v).max()) > 0 for v in jax.tree.leaves(state.params["signal"]["latent"]))


def test_coupled_speech_parallel_with_exdiff_signal_branch(enhancer_workdir):
  """The speech settings of the coupled sampler (signal-first Parallel, f(y) as round-one logits,
  OU logit SDE) with the Ex-Diff signal branch (score net + frozen enhancer latent)."""
  config = _coupled_config(enhancer_workdir)
  config.sampling.update(parallel_order="signal_first", initial_logits="classifier",
                         logits_predictor="reverse_diffusion", switch_t=0.34, corrector="none")
  model = speech.coupled_model(config)
  y = audio.Frontend.from_config(config).analyze(_speech(9) + 0.1)[0]
  l = jnp.zeros((B, 10))
  enhancer = exdiff.load_enhancer(config)
  nets = {name: get_network(s.net, **s.net_kwargs)
          for name, s in (("signal", config.signal), ("logits", config.logits),
                          ("classifier", config.classifier))}
  latent = exdiff.latent_fn(config)(enhancer, y)
  params = {"signal": {"score": nets["signal"].init(KEY, y, 0.5, y, l, latent)["params"],
                       "enhancer": enhancer},
            "logits": nets["logits"].init(KEY, l, 0.5, l, y)["params"]}
  classifier = nets["classifier"].init(KEY, y)["params"]
  out = jax.jit(coupled.get_coupled_fn(model, config.sampling))(
      _perturb(params), classifier, jax.random.key(3), y)
  assert out.x0.shape == y.shape and out.logits.shape == out.classifier_logits.shape == (B, 10)
  assert np.all(np.isfinite(np.asarray(out.logits))) and np.all(np.isfinite(np.asarray(out.x0)))
  assert int(out.nfe) == 3 + 3   # one signal and one logit evaluation per step


def test_keyword_evaluation_hands_exdiff_its_frozen_enhancer(enhancer_workdir, monkeypatch):
  """Ex-Diff as the keyword signal branch: the evaluation's signal params become {"score",
  "enhancer"} (the enhancer of checkpoint.enhancer) for every source; SGMSE+'s stay as stored."""
  stored = {"pretrained": {"signal": {"w": 1.0}, "logits": {"v": 2.0}},
            "joint": {"signal": {"w": 3.0}, "logits": {"v": 4.0}}}
  checked = []

  def load_params(cfg, branch_dir, signal_frozen=None):
    checked.append(signal_frozen)   # the hashes the signal stages must have been trained with
    return stored, {"c": 0.0}
  monkeypatch.setattr(speech.experiment, "load_params", load_params)
  config = _config()
  config.checkpoint.enhancer = enhancer_workdir
  params, classifier = speech.load_coupled_params(config, "unused")
  enhancer = exdiff.load_enhancer(config)
  assert checked == [{"enhancer": checkpoint.params_sha256(enhancer)}]
  for source in stored:
    assert params[source]["signal"]["score"] == stored[source]["signal"]
    assert params[source]["logits"] == stored[source]["logits"]
    jax.tree.map(np.testing.assert_array_equal, params[source]["signal"]["enhancer"], enhancer)
  assert classifier == {"c": 0.0}
  config.signal.net_kwargs.latent_mode = "none"
  assert speech.load_coupled_params(config, "unused")[0] == stored


def test_keyword_config_signal_branches():
  """configs/speech_keywords.py (default :exdiff) reads the enhancement run's Ex-Diff and enhancer
  of each condition ("{corruption}" filled in per condition) and adds the joint stage; :sgmse is
  SGMSE+ without a latent or joint stage."""
  from configs import speech_keywords
  sgmse, keywords = speech_keywords.get_config("sgmse"), speech_keywords.get_config()
  assert sgmse.signal.net_kwargs.latent_mode == "none" and not exdiff.uses_latent(sgmse)
  reverb = speech.experiment.with_corruption(keywords, "noise_reverb")
  assert exdiff.uses_latent(reverb) and reverb.signal.net_kwargs.latent_mode == "film"
  assert reverb.checkpoint.enhancer == "runs/speech_enhancement/noise_reverb/enhancer"
  assert reverb.checkpoint.init_signal == "runs/speech_enhancement/noise_reverb/exdiff"
  assert reverb.enhancer.to_dict() == speech_enhancement.get_config().enhancer.to_dict()
  # Ex-Diff trains the joint stage; the baselines sample with the pre-trained branches.
  assert sgmse.train.joint_steps == 0 < keywords.train.joint_steps
  params = speech.experiment.method_params
  joint = {"pretrained": "p", "joint": "j"}
  methods = keywords.evaluation.methods
  for names, expected in ((("enhance_then_classify", "card"), "p"),
                          (("parallel", "alternating", "nested"), "j")):
    for name in names:
      assert params(joint, name, methods[name].to_dict())[0] == expected, name
  with pytest.raises(ValueError, match="unknown signal branch"):
    speech_keywords.get_config("sgmse+")


def test_uses_latent_needs_an_enhancer_and_a_latent_mode():
  config = _config()   # latent_mode "film", no checkpoint.enhancer
  assert not exdiff.uses_latent(config)
  config.checkpoint.enhancer = "runs/noise/enhancer"
  assert exdiff.uses_latent(config)
  config.signal.net_kwargs.latent_mode = "none"
  assert not exdiff.uses_latent(config)
  del config.signal.net_kwargs["latent_mode"]   # unset: "none"
  assert not exdiff.uses_latent(config)


def test_latent_fn_is_the_enhancers_second_output_without_gradient(monkeypatch):
  """latent(params, y): output [1] of `config.enhancer`'s net applied in inference mode; no
  gradient reaches y or the frozen enhancer's params."""
  built = []

  class Enhancer:
    def apply(self, variables, y, train):
      assert train is False
      p = variables["params"]
      return p["a"] * y, p["b"] * y ** 2
  monkeypatch.setattr(exdiff.nets, "get_network",
                      lambda name, **kwargs: built.append((name, kwargs)) or Enhancer())
  config = _config()
  latent = exdiff.latent_fn(config)
  assert built == [(config.enhancer.net, config.enhancer.net_kwargs.to_dict())]
  params, y = {"a": 2.0, "b": 3.0}, jnp.array([1.0, -2.0, 0.5])
  np.testing.assert_allclose(latent(params, y), 3.0 * y ** 2)
  grads = jax.grad(lambda p, y: latent(p, y).sum(), argnums=(0, 1))(params, y)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_enhance_file_defaults_to_the_best_trained_method(tmp_path, monkeypatch):
  """method "": Ex-Diff when trained (reading the condition's enhancer), else SGMSE+ (no
  enhancer), each with its own trained params; an identity enhancement writes the input back."""
  seen = []

  def get_enhance_fn(cfg, method):
    seen.append((method, cfg.checkpoint.enhancer))
    return lambda params, key, y: y
  monkeypatch.setattr(speech, "get_enhance_fn", get_enhance_fn)
  monkeypatch.setattr(speech, "trained_params", lambda workdir, method: seen.append(method) or {})
  workdir = str(tmp_path / "noise")
  for stage in ("enhancer", "sgmse", "exdiff"):
    os.makedirs(os.path.join(workdir, stage, "checkpoints"))
  src, dst = str(tmp_path / "in.wav"), str(tmp_path / "out.wav")
  wave = _speech(7, batch=1)[0]
  soundfile.write(src, wave, 16000, subtype="FLOAT")
  config = _config()
  speech.enhance_file(config, workdir, src, dst)
  assert seen == [("exdiff", os.path.join(workdir, "enhancer")), "exdiff"]
  np.testing.assert_allclose(soundfile.read(dst)[0], wave, atol=1e-4)   # 16-bit output
  assert config.checkpoint.enhancer == ""   # set on a copy: the caller's config is as it was
  speech.enhance_file(config, workdir, src, dst, method="discriminative")
  assert seen[-2:] == [("discriminative", ""), "discriminative"]
  os.rename(os.path.join(workdir, "exdiff"), os.path.join(workdir, "exdiff.old"))
  speech.enhance_file(config, workdir, src, dst)
  assert seen[-2:] == [("sgmse", ""), "sgmse"]


def test_get_enhance_fn_refuses_an_unknown_method():
  with pytest.raises(ValueError, match="Unknown enhancement method 'exdif'"):
    speech.get_enhance_fn(_config(), "exdif")


def test_quality_marks_unscorable_items_nan(monkeypatch):
  """PESQ raising on an item, or ESTOI's 1e-5 for a reference too short to score, is NaN for
  that item only; SI-SDR of a perfect estimate is very large."""
  clean = 0.1 * np.random.default_rng(0).standard_normal((2, 800))
  monkeypatch.setattr(speech.metrics, "estoi",
                      lambda s, e, sr: 1e-5 if s[0] == clean[0, 0] else 0.7)

  def pesq_wb(s, e, sr):
    if s[0] == clean[1, 0]:
      raise ValueError("No utterances detected")
    return 2.5
  monkeypatch.setattr(speech.metrics, "pesq_wb", pesq_wb)
  noisy = clean + 0.1
  q = speech._quality(clean, noisy, clean, 16000)
  np.testing.assert_array_equal(q["estoi"], [np.nan, 0.7])
  np.testing.assert_array_equal(q["pesq"], [2.5, np.nan])
  assert np.all(q["si_sdr"] > 100)


def test_relative_note_compares_exdiff_with_sgmse_per_condition():
  """Differences in dB and relative to the magnitude of sgmse's (here negative) SI-SDR."""
  rows = [dict(condition="noise", method="sgmse", si_sdr=-2.0, si_sir=4.0),
          dict(condition="noise", method="exdiff", si_sdr=-1.0, si_sir=5.0),
          dict(condition="reverb", method="sgmse", si_sdr=3.0, si_sir=4.0)]
  note = speech._relative_note(rows)
  assert note.startswith("noise: Ex-Diff vs SGMSE+: SI-SDR +1.00 dB (+50.0% relative; paper: "
                         "+3.7%), SI-SIR +1.00 dB (+25.0%; paper: +10.0%).")
  assert "reverb" not in note and len(note.splitlines()) == 1


def test_error_rate_row_flips_accuracy_and_the_paired_difference():
  row = dict(corruption="noise", method="parallel", accuracy=0.3, accuracy_f_x0=0.25,
             ci95_lo=0.22, ci95_hi=0.4, diff_vs_reference=0.05, diff_ci95="[-0.0500, +0.1500]")
  out = speech.error_rate_row(row)
  assert out["condition"] == "noise" and out["accuracy"] == 0.3
  assert out["error_rate"] == pytest.approx(0.7) and out["error_rate_f_x0"] == pytest.approx(0.75)
  assert (out["ci95_lo"], out["ci95_hi"]) == pytest.approx((0.6, 0.78))
  assert out["diff_vs_reference"] == -0.05 and out["diff_ci95"] == "[-0.1500, +0.0500]"
  reference = speech.error_rate_row(dict(row, diff_vs_reference=None, diff_ci95=None))
  assert reference["diff_vs_reference"] is None and reference["diff_ci95"] is None


@pytest.mark.parametrize("experiment, field, value, message", [
    ("enhancement", "evaluation.methods", ("noisy", "sgmes"),
     r"evaluation.methods: unknown \['sgmes'\]"),
    ("enhancement", "sampling.signal_predictor", "reverse_difusion",
     r"sampling.signal_predictor='reverse_difusion': .*Did you mean 'reverse_diffusion'"),
    ("enhancement", "evaluation.batch_size", 7,
     r"evaluation.batch_size=7: .*use a multiple of 2, e.g. 8"),
    ("keywords", "sampling.corrector", "annealed",
     r"sampling.corrector='annealed': .*'annealed_langevin'"),
    ("keywords", "evaluation.methods.card.strategy", "crd",
     r"evaluation.methods.card.strategy='crd'"),
    ("keywords", "sampling.batch_size", 7, r"sampling.batch_size=7: .*use a multiple of 2"),
])
def test_speech_experiments_refuse_a_bad_config_before_training(experiment, field, value, message,
                                                                monkeypatch, tmp_path):
  config_module, run = {"enhancement": (speech_enhancement, speech.run_enhancement),
                        "keywords": (speech_keywords, speech.run_keywords)}[experiment]
  config = config_module.get_config()
  config.mesh.update(data=2, xla_flags="")
  config.update_from_flattened_dict({field: value})
  monkeypatch.setattr(train, "train", lambda *args: pytest.fail("training started"))
  with pytest.raises(ValueError, match=message):
    run(config, str(tmp_path / "work"), str(tmp_path / "out"))
