"""Do the PyTorch references of the benchmarks compute cdjax's networks? (issue 8)

The benchmark's JAX weights (`bench_sampler.init_params`) are copied into the torch modules
(`torch_reference.load_flax_params`), every network of the setup is called in both frameworks on
the same random inputs, and the largest difference of the outputs is recorded, relative to the
largest output (section `reference`, entries `reference_max_abs_diff_<network>`, for images;
section `reference_speech`, entries `speech_reference_max_abs_diff_<network>`, for speech):
  PYTHONPATH=. .venv/bin/python experiments/check_torch_reference.py --config configs/mnist_demo.py
  PYTHONPATH=. .venv/bin/python experiments/check_torch_reference.py \
      --config configs/speech_keywords.py
Exits with an error naming the network where the relative difference passes --tolerance.
"""
import os
import sys
from collections.abc import Mapping

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampler as bs  # noqa: E402  (its flags: --config, --frames; pins threads)
import bench_common as bc  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import torch_reference as tr  # noqa: E402

_BATCH = flags.DEFINE_integer("check_batch", 2, "Batch of the inputs.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "Largest allowed max |jax - torch| over "
                                "max |jax| of a network's output.")


def torch_order(params: Mapping) -> list:
  """Leaves of flax `params` (dicts in creation order, as an eager `init` returns them) in the
  order torch's `named_parameters` walks a module: each scope's own arrays, then its sub-scopes."""
  own = [v for v in params.values() if not isinstance(v, Mapping)]
  return own + [leaf for v in params.values() if isinstance(v, Mapping) for leaf in torch_order(v)]


def same_order(template: Mapping, params: Mapping) -> dict:
  """`params` with its dicts' keys in `template`'s order (jax.tree functions sort them)."""
  return {k: same_order(v, params[k]) if isinstance(v, Mapping) else params[k]
          for k, v in template.items()}


def random_inputs(config, key, b: int) -> dict:
  """{network: its inputs at batch b}, random: signals and latents N(0, 1) (complex for speech),
  logits N(0, 1), t uniform in [0.2, 0.9]."""
  out = {}
  for name, args in bs._network_inputs(config, b).items():
    keys = jax.random.split(jax.random.fold_in(key, len(out)), len(args))
    out[name] = tuple(
        jax.random.uniform(k, a.shape, minval=0.2, maxval=0.9) if a.ndim == 1 else
        jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, args))
  return out


def to_torch_layout(a) -> np.ndarray:
  """A JAX array in torch's layout: real 4-D maps NHWC -> NCHW; the rest as they are."""
  a = np.array(a)
  return np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if a.ndim == 4 and a.dtype.kind == "f" else a


def check(config, section: str) -> list[dict]:
  """One entry per network: max |jax - torch| over its outputs, baseline max |jax|."""
  torch, _ = bc.setup_torch()
  modules = bs.torch_networks(config)
  params, classifier = bs.init_params(config)
  weights = bs.params_by_network(params, classifier)
  inputs = random_inputs(config, jax.random.PRNGKey(3), _BATCH.value)
  prefix, entries = "speech_" if bs.is_speech(config) else "", []
  for name, module in modules.items():
    net = bs._net(config, name)
    template = net.init(jax.random.PRNGKey(0), *inputs[name])["params"]   # creation order
    tr.load_flax_params(module, torch_order(same_order(template, weights[name])))
    ours = jax.tree.leaves(net.apply({"params": weights[name]}, *inputs[name]))
    with torch.no_grad():
      theirs = module(*(torch.from_numpy(to_torch_layout(a)) for a in inputs[name]))
    theirs = [t.numpy() for t in (theirs if isinstance(theirs, tuple) else (theirs,))]
    diff = max(float(np.max(np.abs(to_torch_layout(a) - t))) for a, t in zip(ours, theirs))
    scale = max(float(np.max(np.abs(a))) for a in ours)
    entries.append(bc.entry(f"{prefix}reference_max_abs_diff_{name}", diff, "abs", scale,
                            section=section))
    print(f"{name}: max |jax - torch| {diff:.3g}, max |jax| {scale:.3g}")
  return entries


def main(_):
  config = bs._CONFIG.value
  section = bc.section("reference_speech" if bs.is_speech(config) else "reference")
  entries = check(config, section)
  worst = max(entries, key=lambda e: e["ratio"])
  notes = [f"the benchmark's random JAX weights copied into the torch modules; each network "
           f"called once at batch {_BATCH.value} on the same random inputs; value = max |jax - "
           f"torch| over its outputs, baseline = max |jax|, ratio = their quotient"]
  print(bc.write_results(entries, bc.command(sys.argv), notes, section))
  if worst["ratio"] > _TOLERANCE.value:
    sys.exit(f"error: {worst['name']}: the PyTorch reference differs from cdjax's network by "
             f"{worst['ratio']:.2g} of its output's scale (tolerance {_TOLERANCE.value:g}); fix "
             "the module in experiments/torch_reference*.py that no longer mirrors cdjax.nets.")


if __name__ == "__main__":
  app.run(main)
