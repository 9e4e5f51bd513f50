"""Shared defaults for every cdjax experiment; experiment configs start from `get_config()` here.

Sections: data, corruption, classifier, signal, logits, train, optim, sampling, mesh, checkpoint.
Network sections hold `net` (a registry name) and `net_kwargs` (the module's fields).
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict(dict(
      name="mnist_local",        # local builder or TFDS catalog name
      data_dir="",               # "" -> ~/.cache/cdjax/tensorflow_datasets
      train_split="train",
      eval_split="test",
      modality="image",          # image | audio
      shape=(28, 28, 1),         # one example, without batch
      num_classes=10,
      shuffle_seed=0,
      worker_count=0,
      max_eval_examples=-1,      # -1: the whole split
  ))

  c.corruption = ml_collections.ConfigDict(dict(name="gn_replace", kwargs=dict(p=0.3)))

  c.classifier = ml_collections.ConfigDict(dict(
      net="cnn_classifier", net_kwargs=dict(num_classes=10, width=32),
      num_steps=1500, batch_size=128,
  ))

  c.signal = ml_collections.ConfigDict(dict(
      net="coupled_unet", net_kwargs=dict(),
      sde="vp_discrete", sde_kwargs=dict(N=150, schedule="cosine"),
      pretrain_steps=2000, batch_size=64,
  ))

  c.logits = ml_collections.ConfigDict(dict(
      net="logit_net", net_kwargs=dict(),
      sde="vp_discrete", sde_kwargs=dict(N=150, schedule="cosine"),
      pretrain_steps=2000, batch_size=64,
      standardize_std=0.8,       # official: x0-estimate re-standardised per sample; <= 0 disables
  ))

  c.train = ml_collections.ConfigDict(dict(
      ema_decay=0.999,
      grad_accum_steps=1,
      remat=False,
      log_every=100,
      ckpt_every=1000,
      joint_steps=0,
      loss_weights=dict(signal=0.9, logits=0.1),
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=2e-4, weight_decay=0.0, schedule="constant",
      warmup_steps=0, grad_clip=1.0,
  ))

  c.sampling = ml_collections.ConfigDict(dict(
      strategy="parallel",       # parallel | alternating | nested
      signal_predictor="ancestral", logits_predictor="posterior_mean",
      corrector="none", snr=0.16, n_corrector=1,
      predictor_kwargs=dict(),   # e.g. eta for ddim, clip_x0 for DDPM
      parallel_order="logits_first",   # images; speech: signal_first
      initial_logits="zeros",    # round-one logits: zeros (images) | classifier = f(y) (speech)
      rounds=5,                  # alternating K
      skip_last_logits=False,    # alternating: end on the signal run (speech)
      final_signal_run=False,    # nested: one more signal run on the final logits (speech)
      return_trajectory=False,
      nested_steps=(39, 19),     # logit steps where nested re-runs the signal trajectory
      switch_t=0.5,              # fraction of the trajectory after which logits condition on x0_hat
      cond_source="clean",       # clean (x0_hat) | noisy (x_t): the paper's ablation
      guidance=dict(signal_scale=0.0, logits_scale=0.0, temperature=1.0),
      num_samples=1,             # per item; majority vote over final logits
      batch_size=256,
  ))

  c.mesh = ml_collections.ConfigDict(dict(data=-1))   # -1: every device
  c.checkpoint = ml_collections.ConfigDict(dict(keep=3, best_metric="", best_mode="max"))
  return c
