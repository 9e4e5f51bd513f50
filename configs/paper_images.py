"""The paper's 32x32 image setups, shared by configs/cifar10.py, cifar100.py, imagenet32_100.py:
150-step cosine DDPM, ~4M-parameter signal U-Net, ResNet classifier, p% GN.

These need the TFDS catalog dataset (internet on first use); here they take one step of each stage
on TFDS's mock data (tests/paper_configs_test.py).
"""
import math

from configs import default
from configs import fashion_mnist

BATCH_SIZE = 128
SIGNAL_EPOCHS = 10   # the official signal pre-training (DESIGN.md, Training 3)


def make(tfds_name: str, num_classes: int, p: float, train_examples: int, eval_split: str = "test",
         label_subset: tuple[int, ...] | None = None):
  """The setup on TFDS dataset `tfds_name` (restricted to `label_subset` when given, with
  `train_examples` training images) at p% GN."""
  c = default.get_config()
  c.data.update(name=tfds_name, shape=(32, 32, 3), num_classes=num_classes, eval_split=eval_split)
  c.data.label_subset = label_subset   # cdjax.data.get_source: keep these labels, as 0..K-1
  c.classifier.net = "resnet_classifier"
  c.classifier.net_kwargs = dict(num_classes=num_classes, widths=(64, 128, 256), blocks=(2, 2, 2))   # replaces, not merges
  c.classifier.update(num_steps=40000, batch_size=BATCH_SIZE)
  c.signal.update(
      net_kwargs=dict(num_classes=num_classes, width=36, ch_mult=(1, 2, 2), num_res_blocks=2,
                      attn_levels=(2,)),
      sde_kwargs=dict(N=150, schedule="cosine"), batch_size=BATCH_SIZE,
      pretrain_steps=math.ceil(SIGNAL_EPOCHS * train_examples / BATCH_SIZE))
  c.logits.update(net_kwargs=dict(num_classes=num_classes, hidden=512, depth=4, enc_width=32, enc_depth=3),
                  sde_kwargs=dict(N=150, schedule="cosine"), pretrain_steps=20000, batch_size=BATCH_SIZE)
  c.train.update(joint_steps=20000, ckpt_every=2000)
  c.optim.update(lr=2e-4, schedule="cosine", warmup_steps=1000)
  c.corruption.kwargs = dict(p=p)   # what a stage trained on its own (`cdjax.main`) sees
  c.evaluation.corruptions = {f"gn{round(100 * p)}": dict(p=p)}
  c.evaluation.methods = fashion_mnist.get_config().evaluation.methods
  return c
