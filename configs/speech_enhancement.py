"""Speech enhancement on spoken_digits + noise_local at SNR in [-5, 5] dB (of the whole 1 s clip; the
mixtures are cropped after mixing, in training and evaluation): noisy / discriminative
enhancer / SGMSE+ / Ex-Diff (DESIGN.md sections 1 "Speech" and 2), scaled down for a CPU.

python experiments/speech_enhancement.py --config configs/speech_enhancement.py \
    --workdir runs/speech_enhancement --out experiments/results/speech_enhancement
SGMSE+ conventions throughout (16 kHz, n_fft 510, hop 128, alpha 0.5, beta 0.15, OUVE theta 1.5,
sigma 0.05..0.5, reverse-diffusion + annealed Langevin, snr 0.5, N = 30, "neg_score", Adam)
except the sizes and schedule: a tiny NCSN++ (nf 8) and ResUNet, 2400 steps (the enhancer 800)
on random 0.5 s crops (lr 1e-3 cosine, EMA 0.99 instead of 1e-4 / 0.999, which need ~100k steps),
and the central 0.5 s of each of the 360 test clips (12 held-out voices), so that training and
evaluation of both conditions take about 50 min on two CPU cores (session 48).
The crops hold most of each word, as SGMSE+'s 2 s crops of its 3 s utterances do: on 0.25 s crops
(a fifth of them noise over silence) SGMSE+ learnt to suppress everything and fell 11 dB below its
noisy input (experiments/results/speech_enhancement.md).
configs/sgmse_full.py is the same pipeline at SGMSE+'s 65.6M size. `evaluation.corruptions`
names the conditions (one model set each; kwargs of `corruption.name` unless they name another,
as in the coupled experiments): additive noise, and the reverberant variant (a synthetic RIR
with RT60 in [0.2, 0.8] s, then noise; the target is the dry clean clip).
"""
import ml_collections

from configs import default

NOISE = dict(snr_db=(-5.0, 5.0))   # kwargs of corruption.name = add_noise
NOISE_REVERB = dict(name="noise_reverb", rt60=(0.2, 0.8), snr_db=(-5.0, 5.0))


def set_fields(section, **fields):
  """Sets fields of a config section; dict values replace the old dict (`update` would merge)."""
  for name, value in fields.items():
    setattr(section, name, value)


def get_config():
  c = default.get_config()
  c.data.update(name="spoken_digits", modality="audio", shape=(16000,), num_classes=10,
                eval_split="test", max_eval_examples=-1)
  c.audio.update(train_crop_frames=64, frame_multiple=32)   # 0.5 s: see the docstring
  c.mesh.cpu_sample_xla_flags = ""   # NCSN++ samples faster with YNNPACK's convolutions
  set_fields(c.corruption, name="add_noise", kwargs=dict(NOISE), noise_dataset="noise_local")

  set_fields(c.enhancer, 
      net="resunet_enhancer",
      net_kwargs=dict(widths=(16, 24, 32, 48), strides=((2, 2), (2, 2), (2, 2)), blocks=1,
                      groups=8, output="mask"),
      num_steps=800, batch_size=8)
  set_fields(c.signal, 
      net="ncsnpp",
      net_kwargs=dict(nf=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, attn_resolutions=(),
                      logit_hidden=16, latent_mode="film"),   # Ex-Diff integration: add | concat | film
      sde="ouve", sde_kwargs=dict(theta=1.5, sigma_min=0.05, sigma_max=0.5, N=30, t_eps=0.03),
      parameterization="neg_score", x0_clip=None,
      pretrain_steps=2400, batch_size=4)
  c.optim.update(name="adam", lr=1e-3, schedule="cosine", warmup_steps=20, grad_clip=1.0)
  c.train.update(ema_decay=0.99, log_every=100, ckpt_every=300)
  c.sampling.update(signal_predictor="reverse_diffusion", corrector="annealed_langevin", snr=0.5,
                    n_corrector=1)

  c.evaluation = ml_collections.ConfigDict(dict(
      corruptions={"noise": NOISE, "noise_reverb": NOISE_REVERB},   # one model set each
      methods=("noisy", "discriminative", "sgmse", "exdiff"),
      crop_samples=8064,               # evaluate the central 63 * 128 samples of the mixed clips
                                       # (0: whole clips)
      batch_size=20,
      corruption_seed=1234,            # every method sees the same mixtures
      sampling_seed=0,
  ))
  return c
