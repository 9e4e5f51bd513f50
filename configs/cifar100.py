"""The paper's cifar100 setup: cifar100, 30% GN, 150-step cosine DDPM, ~4M-parameter signal U-Net.

Paper (as reported): best coupled strategy Nested (71.9% vs 60.4%).
Needs the TFDS catalog dataset (internet on first use); tests run it on mock data.
python experiments/image_table.py --config configs/cifar100.py --workdir runs/cifar100 --out experiments/results/cifar100
"""
from configs import default
from configs import fashion_mnist


def get_config():
  c = default.get_config()
  c.data.update(name="cifar100", shape=(32, 32, 3), num_classes=100)
  c.classifier.update(net="resnet_classifier",
                      net_kwargs=dict(num_classes=100, widths=(64, 128, 256), blocks=(2, 2, 2)),
                      num_steps=40000, batch_size=128)
  c.signal.update(
      net_kwargs=dict(num_classes=100, width=64, ch_mult=(1, 2, 2), num_res_blocks=2, attn_levels=(2,)),
      sde_kwargs=dict(N=150, schedule="cosine"), pretrain_steps=40000, batch_size=128)
  c.logits.update(net_kwargs=dict(num_classes=100, hidden=512, depth=4, enc_width=32, enc_depth=3),
                  sde_kwargs=dict(N=150, schedule="cosine"), pretrain_steps=20000, batch_size=128)
  c.train.update(joint_steps=20000, ckpt_every=2000)
  c.optim.update(lr=2e-4, schedule="cosine", warmup_steps=1000)
  c.evaluation.corruptions = {"gn30": dict(p=0.3)}
  c.evaluation.methods = fashion_mnist.get_config().evaluation.methods
  return c
