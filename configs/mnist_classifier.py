"""Stage 1 of the image recipe: the frozen classifier f on clean mnist_local (4,000 digits).

python -m cdjax.main --config configs/mnist_classifier.py --workdir /tmp/mnist_classifier
The classifier ends in <workdir>/classifier with its provenance record; point the later stages'
`checkpoint.classifier` there.
"""
from configs import default


def get_config():
  c = default.get_config()
  c.train.trainer = "classifier"
  c.classifier.net_kwargs = dict(num_classes=10, width=8, depth=3)   # 28 -> 4 x 4, 7.6k params
  c.classifier.num_steps = 400     # ~6 epochs; ~97% clean test accuracy
  c.classifier.batch_size = 64
  c.optim.update(lr=1e-2, schedule="cosine", warmup_steps=20)
  c.train.update(ema_decay=0.99, log_every=50, ckpt_every=200)
  return c


def sweep():
  """`--mode sweep`: learning rates x seeds."""
  return dict(product={"optim.lr": [3e-3, 1e-2]}, zip={"seed": [0, 1]})
