"""The coupled paper's Speech Commands setup (as reported: error 5.58% noisy, 5.11%
enhance-then-classify, 4.85% coupled, reverberant condition): SGMSE+ signal branch with the logit
gate, OU logit SDE, 50-step OUVE in both branches, speech sampling settings (signal-first
Parallel, f(y) as round-one logits, the logits condition on x0_hat in the last 5 of 50 steps),
and speech joint training (from configs/speech_keywords.py: the signal net sees noised clean
logits when t < T/2, else f(y)).

Needs the TFDS catalog dataset `speech_commands`, whose builder needs TensorFlow (not installed
with cdjax; `pip install tensorflow-cpu` and internet on first use); here its stages are only
traced on synthetic 1-s clips (tests/paper_configs_test.py). Its clips are up to 1 s at 16 kHz
(the input pipeline centres the shorter ones in zeros to `data.shape`'s 16000 samples:
`data.audio_length`) with 12 labels (10 words, silence,
unknown); `noise_local` stands in for the noise.
python experiments/speech_keywords.py --config configs/speech_commands.py \
    --workdir runs/speech_commands --out experiments/results/speech_commands
after configs/sgmse_full.py's command, whose reverberant SGMSE+ the signal branch starts from
(`checkpoint.init_signal`).
"""
from configs import speech_keywords
from configs.speech_enhancement import set_fields

NUM_STEPS = 50
NUM_CLASSES = 12


def get_config():
  c = speech_keywords.get_config("sgmse")
  c.data.update(name="speech_commands", num_classes=NUM_CLASSES, eval_split="test",
                max_eval_examples=-1)
  c.audio.update(train_crop_frames=0, frame_multiple=64)
  set_fields(c.corruption, name="noise_reverb", kwargs=dict(rt60=(0.2, 0.8), snr_db=(0.0, 20.0)))
  set_fields(c.classifier, net_kwargs=dict(num_classes=NUM_CLASSES, width=64, depth=4, dropout=0.1,
                                      input_peak=0.5),
                      num_steps=30_000, batch_size=128,
                      crop_samples=0)   # whole clips, as the signal branch and evaluation see them
  set_fields(c.signal, net_kwargs=dict(nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
                                  attn_resolutions=(16,), logit_hidden=64, latent_mode="none"),
                  sde_kwargs=dict(theta=1.5, sigma_min=0.05, sigma_max=0.5, N=NUM_STEPS, t_eps=0.03),
                  pretrain_steps=200_000, batch_size=8)
  # From the reverberant SGMSE+ of this size (configs/sgmse_full.py; speech_keywords' is nf 8).
  c.checkpoint.init_signal = "runs/sgmse_full/noise_reverb/sgmse"
  set_fields(c.logits, net_kwargs=dict(num_classes=NUM_CLASSES, hidden=256, depth=3, heads=4,
                                  enc_width=32, enc_depth=3, pool=(8, 8)),
                  sde_kwargs=dict(theta=1.5, sigma_min=0.05, sigma_max=0.5, N=NUM_STEPS, t_eps=0.03),
                  pretrain_steps=50_000, batch_size=64)
  c.optim.update(lr=1e-4, schedule="constant", warmup_steps=0, grad_clip=0.0)
  c.train.update(ema_decay=0.999, log_every=500, ckpt_every=10_000, joint_steps=20_000,
                 loss_weights=dict(signal=1.0, logits=1.0))
  ts = sorted(_ouve_times(NUM_STEPS)[-6:-1])   # the last 5 steps' start times
  c.sampling.update(switch_t=5 / NUM_STEPS, rounds=5, nested_steps=tuple(ts), batch_size=16)
  set_fields(c.evaluation, corruptions={"reverb": dict(rt60=(0.2, 0.8), snr_db=(0.0, 20.0))},
             crop_samples=0)   # (`update` would keep speech_keywords' "noise" corruption too)
  return c


def _ouve_times(n: int):
  """The OUVE sampling grid [n + 1] (t from 1 to 0.03, then 0)."""
  import numpy as np   # pylint: disable=g-import-not-at-top
  return [float(t) for t in np.append(np.linspace(1.0, 0.03, n), 0.0).astype(np.float32)]
