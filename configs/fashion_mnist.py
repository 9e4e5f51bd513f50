"""The image table (issue #6): Fashion-MNIST (60k / 10k, Debian dataset-fashion-mnist), 15% and
30% GN, every strategy and baseline plus the ablations, over the full test set.

python experiments/image_table.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist
Writes experiments/results/fashion_mnist.{json,md,png}. Paper setup: 150-step cosine DDPM,
signal step ancestral, logit step posterior mean (Parallel); deterministic for Alternating/Nested.

`--config configs/fashion_mnist.py:cpu` is the same table at the scale a 2-core CPU finishes in
about an hour: the demo's network sizes, 25 DDPM steps, a 1,000-step joint stage,
the first 600 test images. Everything else (corruptions, methods, ablations, samplers) is unchanged.
"""
from configs import default
from configs import mnist_demo

DETERMINISTIC = dict(signal_predictor="posterior_mean", logits_predictor="posterior_mean")


def get_config(scale: str = "full"):
  if scale not in ("full", "cpu"):
    raise ValueError(f"configs/fashion_mnist.py:{scale}: unknown scale; use 'full' or 'cpu'.")
  c = default.get_config()
  c.data.name = "fashion_mnist_local"
  c.classifier.net = "resnet_classifier"
  c.classifier.net_kwargs = dict(num_classes=10, widths=(32, 64, 128), blocks=(1, 1, 1))   # replaces, not merges
  c.classifier.update(num_steps=3000, batch_size=128)
  c.signal.update(
      net_kwargs=dict(num_classes=10, width=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,)),
      sde_kwargs=dict(N=150, schedule="cosine"), pretrain_steps=6000, batch_size=64)
  c.logits.update(
      net_kwargs=dict(num_classes=10, hidden=256, depth=3, enc_width=16, enc_depth=3),
      sde_kwargs=dict(N=150, schedule="cosine"), pretrain_steps=3000, batch_size=128)
  c.train.update(joint_steps=2000, log_every=100, ckpt_every=1000)
  c.optim.update(lr=1e-3, schedule="cosine", warmup_steps=200)
  c.sampling.batch_size = 500
  c.evaluation.corruptions = {"gn15": dict(p=0.15), "gn30": dict(p=0.3)}
  c.evaluation.methods = {
      "noisy": dict(strategy="noisy"),
      # Baselines sample with the pre-trained branches: enhancement alone, logits given y alone.
      # The official enhancement baseline is deterministic (signal_predictor="posterior_mean").
      "enhance_then_classify": dict(strategy="enhance_then_classify", params="pretrained",
                                    signal_predictor="ancestral"),
      "card": dict(strategy="card", params="pretrained"),
      "parallel": dict(strategy="parallel"),
      "alternating_k5": dict(strategy="alternating", rounds=5, **DETERMINISTIC),
      "alternating_k1": dict(strategy="alternating", rounds=1, **DETERMINISTIC),
      "nested": dict(strategy="nested", **DETERMINISTIC),
      # Ablations (Parallel): guidance on, noisy-state conditioning, deterministic sampling.
      "parallel_guided": dict(strategy="parallel", guidance=dict(signal_scale=0.1, logits_scale=0.01)),
      "parallel_guided_strong": dict(strategy="parallel", guidance=dict(signal_scale=1.0, logits_scale=0.1)),
      "parallel_noisy_state": dict(strategy="parallel", cond_source="noisy"),
      "parallel_deterministic": dict(strategy="parallel", **DETERMINISTIC),
      "parallel_ddim": dict(strategy="parallel", signal_predictor="ddim"),
  }
  c.evaluation.figure_methods = ("enhance_then_classify", "parallel", "alternating_k5")
  if scale == "cpu":
    c.data.max_eval_examples = 600
    c.classifier.net = "cnn_classifier"
    c.classifier.net_kwargs = dict(num_classes=10, width=16, depth=3)
    c.classifier.update(num_steps=1500, batch_size=64, lr=1e-2)
    demo = mnist_demo.get_config()   # the demo's branch networks
    for section in ("signal", "logits"):
      c[section].net_kwargs = demo[section].net_kwargs
    c.signal.update(sde_kwargs=dict(N=25, schedule="cosine"), pretrain_steps=1000, batch_size=32)
    c.logits.update(sde_kwargs=dict(N=25, schedule="cosine"), pretrain_steps=500, batch_size=64)
    c.train.update(joint_steps=1000, lr=1e-3, ema_decay=0.99, log_every=100, ckpt_every=500)
    c.optim.update(lr=3e-3, warmup_steps=20)
    c.sampling.batch_size = 200
    c.evaluation.methods.nested.nested_steps = (6, 3)   # the official t = 39, 19 of 150, scaled
    c.mesh.host_cpu_devices = 2
  return c
