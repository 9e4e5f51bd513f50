"""Shared defaults for every cdjax experiment; experiment configs start from `get_config()` here.

Sections: data, audio, corruption, classifier, signal, logits, enhancer, train, optim, sampling,
evaluation, mesh, checkpoint.
Network sections hold `net` (a registry name) and `net_kwargs` (the module's fields).
"""
import ml_collections
from ml_collections import config_dict


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
      worker_count=0,            # grain worker processes (0: in this process)
      read_threads=0,            # grain threads reading ahead (0: read each batch when needed)
      prefetch_buffer_size=0,    # examples those threads read ahead (with read_threads > 0)
      max_eval_examples=-1,      # -1: the whole split
      # K labels: only their examples, relabelled 0..K-1 (None: all). A typed placeholder, so
      # --config.data.label_subset=(1,2) parses.
      label_subset=config_dict.placeholder(tuple),
  ))

  c.audio = ml_collections.ConfigDict(dict(   # speech (modality "audio"): cdjax.speech
      sample_rate=16_000,
      n_fft=510, hop_length=128,   # SGMSE+: 256 bins, periodic Hann, centered
      alpha=0.5, beta=0.15,        # amplitude compression beta |c|^alpha exp(i angle c)
      frame_multiple=64,           # clips are zero-padded to a multiple of this many frames
      train_crop_frames=0,         # > 0: random crops of this many frames in training (SGMSE+: 256)
  ))

  c.corruption = ml_collections.ConfigDict(dict(
      name="gn_replace", kwargs=dict(p=0.3),   # cdjax.data.corruptions.CORRUPTIONS
      noise_dataset="noise_local",             # clips for add_noise / noise_reverb
  ))

  c.classifier = ml_collections.ConfigDict(dict(
      net="cnn_classifier", net_kwargs=dict(num_classes=10, width=32, depth=3),
      num_steps=1500, batch_size=128,
      crop_samples=0,   # audio: train on random windows of this many samples (eval: the middle one)
  ))

  c.signal = ml_collections.ConfigDict(dict(
      net="coupled_unet", net_kwargs=dict(
          num_classes=10, width=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_levels=(2,),
          dropout=0.0),
      sde="vp_discrete", sde_kwargs=dict(N=150, schedule="cosine"),
      parameterization="eps",    # eps | neg_score (SGMSE+)
      x0_clip=(-1.0, 1.0),       # clip of x0_hat while sampling (images); None: no clip
      pretrain_steps=2000, batch_size=64,
  ))

  c.logits = ml_collections.ConfigDict(dict(
      net="logit_net", net_kwargs=dict(
          num_classes=10, hidden=256, depth=3, heads=4, enc_width=16, enc_depth=3),
      sde="vp_discrete", sde_kwargs=dict(N=150, schedule="cosine"),
      pretrain_steps=2000, batch_size=64,
      parameterization="eps",
      standardize_std=0.8,       # official: x0-estimate re-standardised per sample; <= 0 disables
  ))

  c.enhancer = ml_collections.ConfigDict(dict(   # discriminative enhancer (Ex-Diff), net(y) -> (x_hat, latent)
      net="resunet_enhancer", net_kwargs=dict(widths=(32, 64, 96), strides=((2, 2), (2, 2))),
      num_steps=2000, batch_size=16,
  ))

  c.train = ml_collections.ConfigDict(dict(
      trainer="classifier",      # cdjax.train.TRAINERS: classifier | signal | logits | enhancer | joint
      ema_decay=0.999,           # warmed up as min(ema_decay, (1 + step) / (10 + step))
      grad_accum_steps=1,        # micro-batches per step, one after another (global batch split)
      remat=False,               # recompute the networks' blocks in the backward pass (maybe_remat)
      log_every=100,
      ckpt_every=1000,
      joint_steps=0,
      loss_weights=dict(signal=0.9, logits=0.1),
      joint_logits_cond="estimate",   # joint signal net's logits: estimate | noised_clean (speech)
      joint_switch_t=0.5,        # noised_clean: noised l0 below this fraction of T, else f(y)
      joint_lr_scales=dict(signal=1.0, logits=1.0),   # per-branch factors of the learning rate
      joint_signal_cond="estimate",   # joint logit net's signal: estimate (x0_hat nearer the steps after sampling.switch_t) | observation
      tensorboard=True,          # also TensorBoard scalars (workdir/tensorboard), if installed
  ))

  c.optim = ml_collections.ConfigDict(dict(
      name="adam", lr=2e-4, weight_decay=0.0, schedule="constant",   # adam | adamw; constant | cosine
      warmup_steps=0, grad_clip=1.0,   # global-norm clip; <= 0 disables
      b1=0.9, b2=0.999, eps=1e-8,
  ))

  c.sampling = ml_collections.ConfigDict(dict(
      strategy="parallel",       # parallel | alternating | nested
      signal_predictor="ancestral", logits_predictor="posterior_mean",
      corrector="none", snr=0.16, n_corrector=1,
      logits_corrector="same",   # the logit branch's: same (as corrector) | none | langevin | ...
      predictor_kwargs=dict(),   # signal predictor's extra arguments, e.g. eta for ddim
      parallel_order="logits_first",   # images; speech: signal_first
      initial_logits="zeros",    # round-one logits: zeros (images) | classifier = f(y) (speech)
      rounds=5,                  # alternating K
      skip_last_logits=False,    # alternating: end on the signal run (speech)
      nested_first_signal_run=True,   # nested: logits see a first signal run (images) | y (speech)
      final_signal_run=False,    # nested: one more signal run on the final logits (speech)
      return_trajectory=False,
      nested_steps=(39, 19),     # logit steps before which nested re-runs the signal trajectory
      switch_t=0.5,              # parallel: the last fraction of steps whose logit step sees x0_hat
      cond_source="clean",       # clean (x0_hat) | noisy (x_t): the paper's ablation
      guidance=dict(signal_scale=0.0, logits_scale=0.0, temperature=1.0),
      num_samples=1,             # per item; majority vote over final logits
      batch_size=256,
      micro_batch=0,             # > 0: run the batch as sequential chunks of this many items (CPU)
  ))

  c.evaluation = ml_collections.ConfigDict(dict(
      corruptions={"gn30": dict(p=0.3)},   # name -> corruption kwargs (one model each; a "name"
                                           # entry picks another corruption than corruption.name)
      methods={   # name -> overrides of `sampling` (nested dicts merge); params: pretrained | joint
          "noisy": dict(strategy="noisy"),
          # Official: signal_predictor="posterior_mean" (model_enhanced.py's is_ddim, default
          # true); ancestral is the stronger baseline here (demo: 84.0% against 67.3%).
          "enhance_then_classify": dict(strategy="enhance_then_classify", params="pretrained",
                                        signal_predictor="ancestral"),
          "parallel": dict(strategy="parallel"),
      },
      figure_methods=("enhance_then_classify", "parallel"),
      corruption_seed=1234,                # every method sees the same degraded inputs
      sampling_seed=0,
  ))

  # data: mesh size (-1: every device); host_cpu_devices: split a CPU host into that many
  # devices before JAX starts (0: XLA's default of one); xla_flags: added to XLA_FLAGS before JAX
  # starts. See parallel.configure_xla. Default: XLA:CPU runs forward convolutions through YNNPACK
  # instead of Eigen, 1.5-1.7x faster sampling of these small-channel networks on CPU
  # (experiments/results/bench_notes.md); other backends ignore it.
  # cpu_train_xla_flags: XLA options of train steps' programs alone on CPU devices
  # (parallel.train_compiler_options): YNNPACK for reductions, XLA's own convolutions, 1.0-1.4x
  # faster train steps than with xla_flags' YNNPACK convolutions. cpu_sample_xla_flags: the same
  # for samplers' programs where the CPU host is one device (parallel.sample_compiler_options):
  # image sampling 1.1x faster there (the speech configs set "": 0.92x). Both are written as
  # XLA_FLAGS are; a name or value XLA does not take raises a ValueError naming the field.
  # compilation_cache_dir: programs that took >= 1 s to compile are kept there (a subdirectory per
  # CPU type; the least recently used go beyond compilation_cache_max_gib) and loaded by later
  # runs, e.g. after a preemption; "" turns it off, and JAX_COMPILATION_CACHE_DIR wins
  # (parallel.configure_compilation_cache).
  ynn_reductions = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_REDUCE"
  c.mesh = ml_collections.ConfigDict(dict(data=-1, host_cpu_devices=0, xla_flags=(
      "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"),
      cpu_train_xla_flags=ynn_reductions, cpu_sample_xla_flags=ynn_reductions,
      compilation_cache_dir="~/.cache/cdjax/xla", compilation_cache_max_gib=4.0))
  c.checkpoint = ml_collections.ConfigDict(dict(
      keep=3, best_metric="", best_mode="max",   # keep the last `keep` (+ the best, if a metric)
      classifier="",     # frozen classifier dir (<classifier workdir>/classifier)
      init_signal="",    # workdir whose latest EMA params start the signal branch ("{corruption}"
                         # stands for the evaluation corruption's name)
      init_logits="",    # workdir whose latest EMA params start the logit branch (same)
      enhancer="",       # Ex-Diff: workdir of the frozen enhancer whose latent the signal net reads
  ))
  return c
