"""The README demo: a small coupled model on embedded mnist_local, 30% GN, in minutes on a CPU.

make demo   (= python -m cdjax.demo --config configs/mnist_demo.py --workdir runs/demo)
Small networks, 50 DDPM steps instead of the paper's 150, a few hundred training steps and 300
test digits, so that training and evaluation fit in about 10 minutes on 2 CPU cores.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.data.max_eval_examples = 300
  c.classifier.update(net_kwargs=dict(num_classes=10, width=8, depth=3), num_steps=400, batch_size=64,
                      lr=1e-2)   # configs/mnist_classifier.py: ~97% clean test accuracy
  c.signal.update(
      net_kwargs=dict(num_classes=10, width=16, ch_mult=(1, 2), num_res_blocks=1, attn_levels=()),
      sde_kwargs=dict(N=50, schedule="cosine"), pretrain_steps=400, batch_size=32)
  c.logits.update(
      net_kwargs=dict(num_classes=10, hidden=128, depth=2, enc_width=8, enc_depth=2),
      sde_kwargs=dict(N=50, schedule="cosine"), pretrain_steps=300, batch_size=64)
  c.train.update(joint_steps=0, ema_decay=0.99, log_every=50, ckpt_every=200)
  c.optim.update(lr=3e-3, schedule="cosine", warmup_steps=20)
  c.sampling.batch_size = 150
  c.mesh.host_cpu_devices = 2   # both cores of a CPU-only machine (sampler 1.3-1.6x faster there)
  return c
