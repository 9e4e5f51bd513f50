"""SGMSE+ at its published size: NCSN++ of 65.6M parameters (nf 128, ch_mult (1, 1, 2, 2, 2, 2, 2),
2 res blocks, attention at 16), trained on 256-frame crops with Adam 1e-4 and EMA 0.999; Ex-Diff's
ResUNet30-style enhancer (384 channels at F/64 x T/32). Shape-tested only (tests/speech_test.py);
needs an accelerator.

python experiments/speech_enhancement.py --config configs/sgmse_full.py --workdir runs/sgmse_full \
    --out experiments/results/sgmse_full
"""
import ml_collections

from configs import speech_enhancement
from configs.speech_enhancement import set_fields


def get_config():
  c = speech_enhancement.get_config()
  c.data.max_eval_examples = -1
  c.audio.update(train_crop_frames=256, frame_multiple=64)   # SGMSE+ crop; pad to 64 frames
  set_fields(c.enhancer, 
      net_kwargs=dict(widths=(32, 64, 128, 256, 384, 384, 384),
                      strides=((2, 2),) * 5 + ((2, 1),), blocks=2, groups=8, output="mask"),
      num_steps=100_000, batch_size=8)
  set_fields(c.signal, 
      net_kwargs=dict(nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2,
                      attn_resolutions=(16,), logit_hidden=64, latent_mode="film"),
      pretrain_steps=200_000, batch_size=8)
  c.optim.update(name="adam", lr=1e-4, schedule="constant", warmup_steps=0, grad_clip=0.0)
  c.train.update(ema_decay=0.999, log_every=500, ckpt_every=10_000)
  c.evaluation.update(crop_samples=0, batch_size=8)
  return c
