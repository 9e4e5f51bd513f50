"""The speech-enhancement experiment (`speech.run_enhancement`, experiments/speech_enhancement.py):
its conditions, an end-to-end run at toy scale, and its metric means. In a file of its own so that
xdist (`--dist loadfile`) runs it beside speech_test.py.
"""
import json
import os
import shutil
import warnings

import jax
import matplotlib.image
import numpy as np
import pytest

from cdjax import audio
from cdjax import data
from cdjax import evaluate
from cdjax import metrics
from cdjax import speech
from configs import speech_enhancement


def test_enhancement_conditions_read_evaluation_corruptions_like_the_coupled_experiments():
  """configs/speech_enhancement.py's conditions: additive noise (corruption.name's kwargs) and the
  reverberant entry naming its own corruption; SGMSE+ has no latent, Ex-Diff reads the enhancer
  of its condition; the keyword experiment evaluates the same conditions."""
  from configs import speech_keywords
  config = speech_enhancement.get_config()
  noise = speech.condition_config(config, "noise", "sgmse", "runs/se")
  reverb = speech.condition_config(config, "noise_reverb", "exdiff", "runs/se")
  assert (noise.corruption.name, noise.corruption.kwargs.to_dict()) == (
      "add_noise", {"snr_db": (-5.0, 5.0)})
  assert (reverb.corruption.name, reverb.corruption.kwargs.to_dict()) == (
      "noise_reverb", {"rt60": (0.2, 0.8), "snr_db": (-5.0, 5.0)})
  assert noise.signal.net_kwargs.latent_mode == "none" and noise.checkpoint.enhancer == ""
  assert reverb.signal.net_kwargs.latent_mode == "film"
  assert reverb.checkpoint.enhancer == os.path.join("runs/se", "noise_reverb", "enhancer")
  assert config.evaluation.corruptions["noise_reverb"]["name"] == "noise_reverb"   # not consumed
  assert (speech_keywords.get_config().evaluation.corruptions.to_dict()
          == config.evaluation.corruptions.to_dict())


def test_enhancement_experiment_end_to_end(tmp_path):
  """experiments/speech_enhancement.py at toy scale: every method is evaluated on both conditions'
  mixtures; the report, table and figure (a row per condition and item) are written. The stages
  are trained once and copied to the second condition, which the run then reuses."""
  config = speech_enhancement.get_config()
  config.data.max_eval_examples = 8
  config.audio.update(n_fft=62, hop_length=16, frame_multiple=4, train_crop_frames=8)
  config.enhancer.update(net_kwargs=dict(widths=(8, 16), strides=((2, 2),), blocks=1, groups=4,
                                         output="mask"), num_steps=2, batch_size=8)
  config.signal.net_kwargs.update(ch_mult=(1, 2))   # mid-block attention on 16 x 130 positions
  config.signal.sde_kwargs.N = 2
  config.signal.update(pretrain_steps=2, batch_size=8)
  config.train.update(log_every=1, ckpt_every=2)
  config.evaluation.update(crop_samples=4096, batch_size=8)
  config.mesh.xla_flags = ""   # this process's JAX is running already
  config.mesh.data = 1   # one device: 8 virtual ones on 2 CPU cores cost ~20% more time
  workdir, out = str(tmp_path / "work"), str(tmp_path / "results" / "speech")
  speech._train_enhancement(config, workdir, "noise")   # pylint: disable=protected-access
  shutil.copytree(os.path.join(workdir, "noise"), os.path.join(workdir, "noise_reverb"))
  rows = speech.run_enhancement(config, workdir, out)

  assert [(r["condition"], r["method"]) for r in rows] == [
      (c, m) for c in ("noise", "noise_reverb") for m in ("noisy", "discriminative", "sgmse", "exdiff")]
  by = {(r["condition"], r["method"]): r for r in rows}
  for c in ("noise", "noise_reverb"):
    assert by[c, "noisy"]["nfe"] == 0 and by[c, "sgmse"]["nfe"] == by[c, "exdiff"]["nfe"] == 2 * 2
    for m in ("noisy", "discriminative", "exdiff"):
      assert np.isfinite([by[c, m][k] for k in ("si_sdr", "si_sir", "pesq")]).all() and by[c, m]["items"] == 8
    assert by[c, "exdiff"]["si_sdr_diff_vs_sgmse"] == pytest.approx(
        by[c, "exdiff"]["si_sdr"] - by[c, "sgmse"]["si_sdr"], abs=1e-4)
  # Same clean clips, other mixtures: the reverberant one is further from the dry target.
  assert by["noise_reverb", "noisy"]["si_sdr"] < by["noise", "noisy"]["si_sdr"] - 1
  # The mixtures are of whole clips (their SNR is the clip's, as in training), then cropped.
  cfg = speech.condition_config(config, "noise")
  whole = data.load_split(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir, 8,
                          audio_length=data.audio_length(cfg))["audio"]
  mixed = evaluate.degrade(data.corruption_from_config(cfg, cfg.data.eval_split),
                           jax.random.PRNGKey(cfg.evaluation.corruption_seed), whole)
  crop = lambda w: audio.center_crop(w, 4096)
  assert by["noise", "noisy"]["si_sdr"] == pytest.approx(
      metrics.si_sdr(crop(whole), crop(mixed)).mean(), abs=1e-5)
  report = json.load(open(out + ".json"))
  assert report["command"] and report["rows"] == json.loads(json.dumps(rows))
  assert "noise_reverb" in report["config"]["evaluation"]["corruptions"]
  assert "noise_reverb: Ex-Diff vs SGMSE+" in open(out + ".md").read()
  height, width = matplotlib.image.imread(out + ".png").shape[:2]
  assert height > width / 2   # 2 conditions x 2 items in rows, 4 methods in columns


def test_enhance_waveforms_draws_each_batch_with_its_own_key():
  """Batch b is enhanced with key fold_in(key, b): 4 copies of one clip in 2 batches of 2 are
  each batch's enhancement with that key (as `one` computes it), and the two batches differ."""
  frontend = audio.Frontend(n_fft=62, hop_length=16, frame_multiple=4)
  enhance = lambda params, key, y: y * (1 + 0.01 * jax.random.normal(key, y.shape))
  t = np.arange(480) / 16000
  y = np.repeat(0.5 * np.sin(2 * np.pi * 220 * t)[None] * np.hanning(480), 4, 0).astype(np.float32)
  key = jax.random.key(3)
  out, _, _ = speech.enhance_waveforms(enhance, {}, frontend, y, key, 2)

  @jax.jit
  def one(key, y):
    y_spec, scale = frontend.analyze(y)
    return frontend.synthesize(enhance({}, key, y_spec), y.shape[-1], scale)
  for b in range(2):
    np.testing.assert_allclose(out[2 * b:2 * b + 2], one(jax.random.fold_in(key, b), y[:2]),
                               atol=1e-6)
  assert np.abs(out[2:] - out[:2]).max() > 1e-4


def test_finite_mean_skips_unscorable_clips_without_warning():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert speech._finite_mean(np.array([1.0, np.nan, 3.0])) == 2.0
    assert np.isnan(speech._finite_mean(np.array([np.nan, np.nan])))


def test_score_rows_compare_methods_on_the_items_every_method_scores():
  """Item 0 lacks exdiff's SI-SDR, item 3 sgmse's SI-SIR, item 4 exdiff's SI-SAR: the three
  scale-invariant metrics share one mask, so all three items drop out of every SI mean."""
  ones, nan_at = np.ones(5), lambda i: np.where(np.arange(5) == i, np.nan, 1.0)
  scores = {"sgmse": dict(si_sdr=np.array([1.0, 2.0, 3.0, 4.0, 5.0]), si_sir=nan_at(3),
                          si_sar=ones, pesq=ones, estoi=nan_at(0)),
            "exdiff": dict(si_sdr=np.array([np.nan, 3.0, 4.0, 5.0, 6.0]), si_sir=ones,
                           si_sar=nan_at(4), pesq=2 * ones, estoi=0.5 * nan_at(0))}
  runs = {"sgmse": dict(failed_items=0), "exdiff": dict(failed_items=1)}
  sgmse, exdiff = speech._score_rows("noise", scores, runs)
  assert sgmse["si_sdr"] == 2.5 and exdiff["si_sdr"] == 3.5   # items 1 and 2 only, for both
  assert sgmse["si_sir"] == exdiff["si_sar"] == 1.0
  assert (sgmse["si_items"], sgmse["pesq_items"], sgmse["estoi_items"]) == (2, 5, 4)
  assert (sgmse["pesq"], exdiff["pesq"], exdiff["estoi"]) == (1.0, 2.0, 0.5)
  assert exdiff["si_sdr_diff_vs_sgmse"] == pytest.approx(1.0) and exdiff["failed_items"] == 1
  assert "si_sdr_diff_vs_sgmse" not in sgmse
  # The discriminative enhancer is compared with sgmse on the same items too.
  scores["discriminative"] = dict(scores["sgmse"], si_sdr=np.array([9.0, 2.5, 2.0, 9.0, 9.0]))
  runs["discriminative"] = dict(failed_items=0)
  disc = speech._score_rows("noise", scores, runs)[-1]
  assert disc["method"] == "discriminative" and disc["si_sdr"] == 2.25
  assert disc["si_sdr_diff_vs_sgmse"] == pytest.approx(-0.25)
