"""Flax Linen networks, registered by name: `get_network(name, **kwargs)` builds one from a config.

Call conventions (all inputs batched):
- classifiers:      f(x) -> logits [B, K]
- signal nets:      net(x_t, t, y, logits, latent=None) -> array shaped like x_t
- logit nets:       net(l_t, t, cond_logits, cond_signal) -> [B, K]
- enhancers:        net(y) -> (x_hat, latent)
"""
from cdjax.registry import Registry

NETWORKS = Registry("network")


def get_network(name: str, **kwargs):
  """Instantiates the Linen module registered as `name` with its fields `kwargs`."""
  return NETWORKS.get(name)(**kwargs)


from cdjax.nets import layers, image, logits  # noqa: E402,F401
from cdjax.nets import speech  # noqa: E402,F401
