"""Speech enhancement: SGMSE+ and Ex-Diff enhancement, the speech experiments, and `--mode enhance`.

Signal path (`audio.Frontend`, SGMSE+ conventions): waveforms [B, L] are divided by the noisy
maximum, zero-padded to a multiple of `audio.frame_multiple` frames and turned into compressed
complex spectrograms [B, F, T]; enhanced spectrograms go back through the exact inverse.

Methods, all trained with the trainers of `cdjax.train` (one train step):
- "discriminative": the frozen enhancer `net(y) -> (x_hat, latent)` (trainer "enhancer");
- "sgmse": the score net alone (trainer "signal", zero logits, OUVE, "neg_score");
- "exdiff": the same score net reading the frozen enhancer's bottleneck latent (trainer "signal"
  with `checkpoint.enhancer` set; integration mode `signal.net_kwargs.latent_mode`).
Diffusion enhancement runs the compiled predictor-corrector sampler of `cdjax.sampling`
(SGMSE+: reverse-diffusion predictor, annealed Langevin corrector, snr 0.5, N = 30) and returns
the final mean.
"""
import copy
import dataclasses
import os
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cdjax import audio
from cdjax import checkpoint
from cdjax import coupled
from cdjax import data
from cdjax import evaluate
from cdjax import exdiff
from cdjax import experiment
from cdjax import metrics
from cdjax import nets
from cdjax import parallel
from cdjax import sampling
from cdjax import sde as sde_lib
from cdjax import train

ENHANCEMENT_METHODS = ("noisy", "discriminative", "sgmse", "exdiff")
ENHANCEMENT_COLUMNS = ["condition", "method", "si_sdr", "si_sir", "si_sar", "pesq", "estoi", "rtf",
                       "si_sdr_diff_vs_sgmse", "si_sdr_diff_ci95"]
ESTOI_UNDEFINED = 1e-5   # pystoi's value for references too short to score
KEYWORD_COLUMNS = ["condition", "method", "error_rate", "ci95", "error_rate_f_x0",
                   "diff_vs_reference", "diff_ci95", "wins", "losses", "nfe", "seconds_per_item"]


# ---- the models ---------------------------------------------------------------------------------
def _inference(section: ml_collections.ConfigDict) -> Callable:
  net = nets.get_network(section.net, **section.net_kwargs)
  return lambda params, *inputs: net.apply({"params": params}, *inputs, train=False)


def trained_params(workdir: str, method: str):
  """EMA parameters of enhancement `method` trained in a condition's workdir, as
  `get_enhance_fn(config, method)` takes them: the enhancer's ("discriminative"), {"score"}
  ("sgmse"), {"score", "enhancer"} ("exdiff")."""
  restore = lambda stage, frozen={}: checkpoint.restore_params(
      os.path.join(workdir, stage, "checkpoints"), frozen_sha256=frozen)
  if method == "discriminative":
    return restore("enhancer")
  if method == "sgmse":
    return {"score": restore(method)}
  enhancer = restore("enhancer")
  return {"score": restore(method, train.frozen_sha256({"enhancer": enhancer})),
          "enhancer": enhancer}


def coupled_model(config: ml_collections.ConfigDict) -> coupled.CoupledModel:
  """`coupled.model_from_config`; for Ex-Diff the signal params are {"score", "enhancer"} and the
  enhancer's latent of y, computed once per sampler call, enters the score net."""
  model = coupled.model_from_config(config)
  if not exdiff.uses_latent(config):
    return model
  score, latent = _inference(config.signal), exdiff.latent_fn(config)
  return dataclasses.replace(
      model, signal_context=lambda params, y: (y, latent(params["enhancer"], y)),
      signal_net=lambda params, x, t, cond, logits: score(params["score"], x, t, cond[0], logits,
                                                          cond[1]))


def load_coupled_params(config: ml_collections.ConfigDict, branch_dir: str):
  """`experiment.load_params`; for Ex-Diff each signal branch's params become {"score",
  "enhancer"} (the frozen enhancer of `checkpoint.enhancer`), as `coupled_model` expects."""
  if not exdiff.uses_latent(config):
    return experiment.load_params(config, branch_dir)
  enhancer = exdiff.load_enhancer(config)
  params, classifier_params = experiment.load_params(
      config, branch_dir, signal_frozen=train.frozen_sha256({"enhancer": enhancer}))
  params = {source: dict(p, signal={"score": p["signal"], "enhancer": enhancer})
            for source, p in params.items()}
  return params, classifier_params


def get_enhance_fn(config: ml_collections.ConfigDict, method: str) -> Callable:
  """`enhance(params, key, y) -> x0` on compressed spectrograms [B, F, T] ("nfe" attribute set).

  method "discriminative": params are the enhancer's; "sgmse" / "exdiff": the PC sampler of
  `config.sampling` (signal_predictor, corrector, snr, n_corrector) over `config.signal.sde` with
  zero logits; params {"score"} (+ {"enhancer"} for Ex-Diff).
  """
  if method == "discriminative":
    enhancer = _inference(config.enhancer)
    fn = lambda params, key, y: enhancer(params, y)[0]
    fn.nfe = 1
    return fn
  if method not in ("sgmse", "exdiff"):
    raise ValueError(f"Unknown enhancement method {method!r}; use one of {ENHANCEMENT_METHODS[1:]}.")
  s, cfg = config.signal, config.sampling
  sde = sde_lib.get_sde(s.sde, **s.sde_kwargs)
  score_net = _inference(s)
  latent_fn = exdiff.latent_fn(config) if method == "exdiff" else None
  step_kwargs = dict(predictor=cfg.signal_predictor, corrector=cfg.corrector, snr=cfg.snr,
                     n_corrector=cfg.n_corrector, predictor_kwargs=cfg.predictor_kwargs)

  def fn(params, key, y):
    logits = jnp.zeros((y.shape[0], config.data.num_classes), jnp.float32)
    extra = () if latent_fn is None else (latent_fn(params["enhancer"], y),)

    def score_fn(x, t):
      out = score_net(params["score"], x, t, y, logits, *extra)
      return sde.score_from_output(out, t, s.parameterization)

    x0, _ = sampling.get_sampling_fn(sde, y.shape, **step_kwargs)(score_fn, key, y)
    return x0

  fn.nfe = sampling.get_step_fn(sde, **step_kwargs).nfe * sde.N
  return fn


def enhance_waveforms(enhance: Callable, params, frontend: audio.Frontend, y: np.ndarray,
                      key, batch_size: int, mesh: Optional[Mesh] = None):
  """Enhances noisy waveforms y [N, L] in batches (batch b uses fold_in(key, b)), each batch
  sharded over `mesh`'s `data` axis and the parameters replicated (default: one device).

  Returns (enhanced waveforms [N, L] at the input scale, steady-state seconds, compile seconds).
  """
  def one(params, key, y):
    y_spec, scale = frontend.analyze(y)
    return frontend.synthesize(enhance(params, key, y_spec), y.shape[-1], scale)

  mesh = mesh or Mesh(np.asarray(jax.local_devices()[:1]), (parallel.DATA_AXIS,))
  num_batches, batch = parallel.sharded_batches(np.asarray(y, np.float32), batch_size, mesh)
  fn = jax.jit(one)
  params = parallel.replicate(params, mesh)
  tic = time.perf_counter()
  compiled = fn.lower(params, key, batch(0)).compile()
  compile_seconds = time.perf_counter() - tic
  out = []
  tic = time.perf_counter()
  for b in range(num_batches):
    out.append(np.asarray(compiled(params, jax.random.fold_in(key, b), batch(b))))
  return np.concatenate(out)[:len(y)], time.perf_counter() - tic, compile_seconds


# ---- the enhancement experiment -----------------------------------------------------------------
def condition_config(config: ml_collections.ConfigDict, condition: str, stage: str = "",
                     workdir: str = "") -> ml_collections.ConfigDict:
  """A copy of `config` for one `evaluation.corruptions` entry (`experiment.with_corruption`)
  and training stage ("enhancer", "sgmse", "exdiff"; checkpoints under workdir)."""
  cfg = experiment.with_corruption(config, condition)
  with cfg.unlocked():
    base = os.path.join(workdir, condition)
    cfg.checkpoint.enhancer = os.path.join(base, "enhancer") if stage == "exdiff" else ""
    if stage == "sgmse":
      cfg.signal.net_kwargs.latent_mode = "none"
  return cfg


def _train_enhancement(config, workdir: str, condition: str) -> None:
  base = os.path.join(workdir, condition)
  experiment.train_stage(condition_config(config, condition, "enhancer", workdir),
                         os.path.join(base, "enhancer"), "enhancer")
  for stage in ("sgmse", "exdiff"):
    cfg = condition_config(config, condition, stage, workdir)
    if stage == "exdiff" and "enhancer" not in (train.TRAINERS.get("signal")(cfg).frozen or {}):
      raise RuntimeError("The signal trainer does not read the frozen enhancer's latent "
                         "(config.checkpoint.enhancer); Ex-Diff cannot be trained.")
    experiment.train_stage(cfg, os.path.join(base, stage), "signal")


def _quality(clean: np.ndarray, noisy: np.ndarray, estimate: np.ndarray, sample_rate: int,
             clean_gain: float = 1.0) -> dict:
  """Per-item SI-SDR, SI-SIR, SI-SAR, PESQ (wide-band) and ESTOI, each [N]. The interference of
  SI-SIR / SI-SAR is what the corruption added: noisy - clean_gain x clean, where clean_gain is
  the clean signal's gain in the mixture (`data.clean_gain_from_config`: the direct path of a
  reverberant one), so that no part of the target counts as interference."""
  si_sdr, si_sir, si_sar = metrics.energy_ratios(clean, estimate, noisy - clean_gain * clean)

  def safe(fn):   # PESQ raises on items it finds no utterance in: NaN, reported as such
    out = []
    for s, e in zip(clean, estimate):
      try:
        out.append(float(fn(s, e, sample_rate)))
      except Exception:   # pylint: disable=broad-except
        out.append(np.nan)
    return np.asarray(out)
  estoi = safe(metrics.estoi)
  # pystoi returns 1e-5 when fewer than 30 non-silent frames (384 ms) of the reference remain,
  # as for short words: undefined there, so NaN (the same items for every method).
  estoi[estoi == ESTOI_UNDEFINED] = np.nan
  return dict(si_sdr=si_sdr, si_sir=si_sir, si_sar=si_sar, pesq=safe(metrics.pesq_wb), estoi=estoi)


def _finite_mean(values: np.ndarray) -> float:
  """Mean of the finite entries of values [N]; NaN when none is (e.g. ESTOI of clips too short)."""
  finite = np.asarray(values)[np.isfinite(values)]
  return float(finite.mean()) if finite.size else float("nan")


def evaluate_enhancement(config, workdir: str, condition: str) -> tuple[list[dict], dict]:
  """Rows (means over the eval clips) of every method on one condition, and the waveforms."""
  cfg = condition_config(config, condition)
  frontend = audio.Frontend.from_config(cfg)
  split = data.load_split(cfg.data.name, cfg.data.eval_split, cfg.data.data_dir,
                          cfg.data.max_eval_examples, audio_length=data.audio_length(cfg))
  corrupt = data.corruption_from_config(cfg, cfg.data.eval_split)
  # Whole clips are mixed (training mixes them so too, `audio.make_observe`), then cropped.
  noisy = evaluate.degrade(corrupt, jax.random.PRNGKey(cfg.evaluation.corruption_seed),
                           split["audio"])
  clean, noisy = (audio.center_crop(w, cfg.evaluation.crop_samples) for w in (split["audio"], noisy))
  seconds_of_audio = clean.size / cfg.audio.sample_rate
  mesh = parallel.make_mesh(cfg)
  clean_gain = data.clean_gain_from_config(cfg)
  waves, scores, runs = {"clean": clean, "noisy": noisy}, {}, {}
  for method in cfg.evaluation.methods:
    if method == "noisy":
      estimate, runs[method] = noisy, dict(rtf=0.0, nfe=0)
    else:
      method_cfg = condition_config(config, condition, method, workdir)
      enhance = get_enhance_fn(method_cfg, method)
      params = trained_params(os.path.join(workdir, condition), method)
      estimate, seconds, compile_seconds = enhance_waveforms(
          enhance, params, frontend, noisy, jax.random.PRNGKey(cfg.evaluation.sampling_seed),
          cfg.evaluation.batch_size, mesh)
      runs[method] = dict(rtf=seconds / seconds_of_audio, nfe=enhance.nfe,
                          compile_seconds=compile_seconds)
    waves[method] = estimate
    failed = ~np.isfinite(estimate).all(-1) | ~np.asarray(estimate).any(-1)
    runs[method]["failed_items"] = int(failed.sum())
    scores[method] = _quality(clean, noisy, estimate, cfg.audio.sample_rate, clean_gain)
    print(f"[{condition}] {method}: " + ", ".join(
        f"{k} {_finite_mean(v):.3f}" for k, v in scores[method].items())
        + f", rtf {runs[method]['rtf']:.3f}, failed items {runs[method]['failed_items']}")
  return _score_rows(condition, scores, runs), waves


def _score_rows(condition: str, scores: dict, runs: dict) -> list[dict]:
  """One row per method from `scores` ({method: {metric: per-item scores [N]}}) and `runs`
  ({method: its other columns}): each metric's mean over the items that every method scores
  (finite for all), so that the methods are compared on the same items. `si_items`, `pesq_items`
  and `estoi_items` count those items (SI-SDR / SIR / SAR share theirs); an item a method fails
  on (a silent or non-finite estimate: `failed_items`) drops out for every method. Ex-Diff's and
  the discriminative model's rows add the paired SI-SDR difference to sgmse's."""
  def scored(metric):
    return np.all([np.isfinite(s[metric]) for s in scores.values()], axis=0)
  si = scored("si_sdr") & scored("si_sir") & scored("si_sar")
  masks = dict(si_sdr=si, si_sir=si, si_sar=si, pesq=scored("pesq"), estoi=scored("estoi"))
  rows = []
  for method, score in scores.items():
    row = dict(condition=condition, method=method,
               **{k: _finite_mean(v[masks[k]]) for k, v in score.items()},
               items=len(si), si_items=int(si.sum()), pesq_items=int(masks["pesq"].sum()),
               estoi_items=int(masks["estoi"].sum()), **runs[method])
    if method in ("exdiff", "discriminative") and "sgmse" in scores:
      d = metrics.paired_bootstrap(score["si_sdr"][si], scores["sgmse"]["si_sdr"][si])
      row.update(si_sdr_diff_vs_sgmse=d.diff, si_sdr_diff_ci95=f"[{d.lo:+.3f}, {d.hi:+.3f}]",
                 si_sdr_wins_vs_sgmse=d.wins, si_sdr_losses_vs_sgmse=d.losses)
    rows.append(row)
  return rows


def plot_spectrograms(waves_by_condition: dict, path: str, frontend: audio.Frontend,
                      methods=("clean", "noisy", "sgmse", "exdiff"), num_items: int = 2) -> None:
  """A PNG of log-magnitude spectrograms: `num_items` rows per condition of `waves_by_condition`
  ({condition: {method: waves [N, L]}}), one column per entry of `methods`."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top

  first = next(iter(waves_by_condition.values()))
  methods = [m for m in methods if m in first]
  rows = [(c, i) for c in waves_by_condition for i in range(num_items)]
  fig, axes = plt.subplots(len(rows), len(methods), figsize=(2.6 * len(methods), 2.0 * len(rows)),
                           squeeze=False)
  for j, m in enumerate(methods):
    for r, (condition, i) in enumerate(rows):
      wave = waves_by_condition[condition][m][i]
      mag = np.abs(np.asarray(audio.stft(wave, frontend.n_fft, frontend.hop_length)))
      ax = axes[r, j]
      ax.imshow(20 * np.log10(mag + 1e-5), origin="lower", aspect="auto", cmap="magma",
                vmin=-80, vmax=20)
      ax.set_xticks([]), ax.set_yticks([])
      if r == 0:
        ax.set_title(m, fontsize=9)
      if j == 0:
        ax.set_ylabel(f"{condition} #{i}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def check_enhancement(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError, naming the config field, on an unknown method of `evaluation.methods`
  (`ENHANCEMENT_METHODS`), `sampling` predictor or corrector, or an `evaluation.batch_size` the
  devices of the mesh do not divide: `run_enhancement` checks before anything trains."""
  parallel.initialize_distributed()   # before the mesh starts JAX's backend
  mesh = parallel.make_mesh(config)
  experiment.check_setting("evaluation.batch_size", config.evaluation.batch_size,
                           lambda b: parallel.check_batch_size(b, mesh.size))
  for key in ("signal_predictor", "corrector"):
    experiment.check_setting(f"sampling.{key}", config.sampling[key],
                             experiment.SAMPLING_NAMES[key])
  unknown = [m for m in config.evaluation.methods if m not in ENHANCEMENT_METHODS]
  if unknown:
    raise ValueError(f"evaluation.methods: unknown {unknown}; use any of {ENHANCEMENT_METHODS}.")


def run_enhancement(config: ml_collections.ConfigDict, workdir: str, out_prefix: str) -> list[dict]:
  """Trains what `workdir` lacks (per condition: enhancer, sgmse, exdiff), evaluates noisy /
  discriminative / sgmse / exdiff and writes `<out_prefix>.json`, `.md` and `.png`."""
  parallel.configure_xla(config.mesh)
  check_enhancement(config)   # not after hours of training
  evaluate.check_writable(out_prefix)
  rows, waves = [], {}
  for condition in config.evaluation.corruptions:
    _train_enhancement(config, workdir, condition)
    condition_rows, waves[condition] = evaluate_enhancement(config, workdir, condition)
    rows += condition_rows
  note = _relative_note(rows)
  table = evaluate.write_results(out_prefix, config, rows, ENHANCEMENT_COLUMNS, note)
  plot_spectrograms(waves, out_prefix + ".png", audio.Frontend.from_config(config))
  print(table + "\n" + note)
  print(f"Wrote {out_prefix}.json, .md and .png")
  return rows


def _relative_note(rows: list[dict]) -> str:
  """Ex-Diff's relative SI-SDR / SI-SIR change over sgmse per condition vs the paper's targets."""
  lines = []
  for cond in dict.fromkeys(r["condition"] for r in rows):
    by = {r["method"]: r for r in rows if r["condition"] == cond}
    if "sgmse" in by and "exdiff" in by:
      diff = {k: by["exdiff"][k] - by["sgmse"][k] for k in ("si_sdr", "si_sir")}
      rel = {k: diff[k] / abs(by["sgmse"][k]) for k in diff}
      lines.append(f"{cond}: Ex-Diff vs SGMSE+: SI-SDR {diff['si_sdr']:+.2f} dB "
                   f"({100 * rel['si_sdr']:+.1f}% relative; paper: +3.7%), SI-SIR "
                   f"{diff['si_sir']:+.2f} dB ({100 * rel['si_sir']:+.1f}%; paper: +10.0%). "
                   "Relative changes are of the baseline's magnitude; near 0 dB read the dB.")
  return "\n".join(lines)


# ---- the coupled spoken-keyword experiment ------------------------------------------------------
def run_keywords(config: ml_collections.ConfigDict, workdir: str, out_prefix: str) -> list[dict]:
  """Trains the frozen classifier (clean spoken digits) and, per corruption, the signal / logit
  (/ joint) branches (`experiment.train_all`); evaluates every method of `evaluation.methods` on
  the same degraded test clips; writes `<out_prefix>.json` and `.md` (error rates, 95% CIs)."""
  parallel.configure_xla(config.mesh)
  experiment.check_config(config)   # not after hours of training
  evaluate.check_writable(out_prefix)
  experiment.train_all(config, workdir)
  frontend = audio.Frontend.from_config(config)
  analyze = jax.jit(lambda y: frontend.analyze(y)[0])
  to_model = lambda y: np.asarray(analyze(audio.center_crop(y, config.evaluation.crop_samples)))
  rows = []
  for corruption in config.evaluation.corruptions:
    corruption_rows, _ = experiment.evaluate_corruption(
        config, workdir, corruption, dict(config.evaluation.methods),
        to_model=to_model, model=coupled_model, load=load_coupled_params)
    rows += [error_rate_row(r) for r in corruption_rows]
  note = ("error_rate: 1 - accuracy of argmax of each method's final logits (95% Wilson CI "
          "half-width); error_rate_f_x0: of the frozen classifier on the enhanced signal; "
          "diff_vs_reference: paired error-rate difference to enhance_then_classify (bootstrap "
          "95% CI; wins = items only this method gets right).")
  table = evaluate.write_results(out_prefix, config, rows, KEYWORD_COLUMNS, note)
  print(table)
  print(f"Wrote {out_prefix}.json and .md")
  return rows


def error_rate_row(row: dict) -> dict:
  """An accuracy row of `experiment.evaluate_corruption` with its error-rate view added: error
  rates, their CI, and the paired difference to the reference (and its CI) negated."""
  diff, interval = row.get("diff_vs_reference"), row.get("diff_ci95")
  if interval:
    lo, hi = (float(v) for v in interval.strip("[]").split(","))
    interval = f"[{-hi:+.4f}, {-lo:+.4f}]"
  return dict(row, condition=row["corruption"], error_rate=1 - row["accuracy"],
              error_rate_f_x0=1 - row["accuracy_f_x0"], ci95_lo=1 - row["ci95_hi"],
              ci95_hi=1 - row["ci95_lo"], diff_vs_reference=None if diff is None else -diff,
              diff_ci95=interval)


# ---- enhancing a user's file --------------------------------------------------------------------
def read_wav(path: str, sample_rate: int) -> np.ndarray:
  """A mono float32 waveform [L] at `sample_rate` (resampled with librosa); clear errors on an
  unreadable, empty or silent file."""
  import librosa   # pylint: disable=g-import-not-at-top
  import soundfile   # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No audio file {path!r}.")
  try:
    wave, rate = soundfile.read(path, dtype="float32", always_2d=True)
  except Exception as e:   # soundfile raises LibsndfileError / RuntimeError / OSError
    raise ValueError(f"Cannot read audio file {path!r} ({type(e).__name__}: {e}). Give a WAV "
                     "(or FLAC / OGG) file.") from e
  wave = wave.mean(axis=1)
  if wave.size == 0:
    raise ValueError(f"Audio file {path!r} has no samples.")
  if not np.all(np.isfinite(wave)) or np.max(np.abs(wave)) < 1e-6:
    raise ValueError(f"Audio file {path!r} is silent (peak {np.max(np.abs(wave)):.2e}) or not "
                     "finite; there is nothing to enhance.")
  if rate != sample_rate:
    wave = librosa.resample(wave, orig_sr=rate, target_sr=sample_rate)
  return wave.astype(np.float32)


def enhance_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                 output_path: str, method: str = "", seed: int = 0) -> str:
  """Enhances one audio file with the models trained in `workdir` (an enhancement workdir of one
  condition: `<workdir>/enhancer`, `sgmse`, `exdiff`) and writes `output_path` (16-bit WAV at
  `config.audio.sample_rate`). method: "" (Ex-Diff if trained, else SGMSE+, else the enhancer)."""
  import soundfile   # pylint: disable=g-import-not-at-top
  paths = (input_path, output_path)
  if all(map(os.path.exists, paths)) and os.path.samefile(*paths):
    raise ValueError(f"The output {output_path!r} is the input file, which writing it would "
                     "destroy; give another output path.")
  trained = [m for m in ("exdiff", "sgmse", "discriminative")
             if os.path.isdir(os.path.join(workdir, "enhancer" if m == "discriminative" else m,
                                           "checkpoints"))]
  method = method or (trained[0] if trained else "exdiff")
  if method not in trained:
    raise FileNotFoundError(f"No trained {method!r} model under {workdir!r} (found: "
                            f"{', '.join(trained) or 'none'}). Train it with "
                            "experiments/speech_enhancement.py first.")
  wave = read_wav(input_path, config.audio.sample_rate)
  cfg = copy.deepcopy(config)
  with cfg.unlocked():
    cfg.checkpoint.enhancer = os.path.join(workdir, "enhancer") if method == "exdiff" else ""
  enhanced, seconds, _ = enhance_waveforms(get_enhance_fn(cfg, method),
                                           trained_params(workdir, method),
                                           audio.Frontend.from_config(cfg), wave[None],
                                           jax.random.PRNGKey(seed), 1)
  out = np.clip(enhanced[0], -1.0, 1.0)
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  soundfile.write(output_path, out, config.audio.sample_rate, subtype="PCM_16")
  print(f"Enhanced {input_path} ({len(wave) / config.audio.sample_rate:.2f} s) with {method} in "
        f"{seconds:.2f} s -> {output_path}")
  return output_path
