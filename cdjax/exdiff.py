"""Ex-Diff: the frozen discriminative enhancer whose bottleneck latent the score net reads.

Shared by training (`train.signal_trainer`) and enhancement (`cdjax.speech`): the enhancer is
trained in workdir `config.checkpoint.enhancer` (trainer "enhancer") and never updated after.
"""
import os
from typing import Callable

import jax
import ml_collections

from cdjax import checkpoint
from cdjax import nets


def uses_latent(config: ml_collections.ConfigDict) -> bool:
  """Whether the signal net reads the frozen enhancer's latent: `checkpoint.enhancer` set and a
  latent integration mode (`signal.net_kwargs.latent_mode`) other than "none"."""
  return bool(config.checkpoint.enhancer) and (
      config.signal.net_kwargs.get("latent_mode", "none") != "none")


def latent_fn(config: ml_collections.ConfigDict) -> Callable:
  """`latent(enhancer_params, y) -> [B, F', T', C']`: the enhancer's bottleneck, no gradient."""
  net = nets.get_network(config.enhancer.net, **config.enhancer.net_kwargs)
  return lambda params, y: jax.lax.stop_gradient(net.apply({"params": params}, y, train=False)[1])


def load_enhancer(config: ml_collections.ConfigDict):
  """EMA parameters of the enhancer trained in workdir `config.checkpoint.enhancer`."""
  return checkpoint.restore_params(os.path.join(config.checkpoint.enhancer, "checkpoints"))
