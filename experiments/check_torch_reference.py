"""Do the PyTorch references of the benchmarks compute cdjax's networks and sampler? (issue 8)

The benchmark's JAX weights (`bench_sampler.init_params`) are copied into the torch modules
(`torch_reference.load_flax_params`); every network of the setup is called in both frameworks on
the same random inputs, and the whole Parallel trajectory is run in both (cdjax's one jit against
the reference's Python loop) from the same y, with one fixed pattern in place of every noise draw.
The largest difference of each output is recorded, relative to the largest output (section
`reference`, entries `reference_max_abs_diff_<network>` and `..._parallel_<output>`, for images;
section `reference_speech`, entries prefixed `speech_`, for speech):
  PYTHONPATH=. .venv/bin/python experiments/check_torch_reference.py --config configs/mnist_demo.py
  PYTHONPATH=. .venv/bin/python experiments/check_torch_reference.py \
      --config configs/speech_keywords.py
Exits with an error naming the output whose relative difference passes --tolerance (networks) or
--trajectory_tolerance (trajectories).
"""
import os
import sys
from collections.abc import Mapping
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sampler as bs  # noqa: E402  (its flags: --config, --frames; pins threads)
import bench_common as bc  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

torch, _ = bc.setup_torch()   # the bench extra (a clear error without it); threads, seed
import torch_reference as tr  # noqa: E402

from cdjax import coupled  # noqa: E402
from cdjax import overrides  # noqa: E402
from cdjax import sde as sde_lib  # noqa: E402
from cdjax import speech  # noqa: E402

_BATCH = flags.DEFINE_integer("check_batch", 2, "Batch of the inputs.")
_TOLERANCE = flags.DEFINE_float("tolerance", 1e-4, "Largest allowed max |jax - torch| over "
                                "max |jax| of a network's output.")
_TRAJECTORY_TOLERANCE = flags.DEFINE_float(
    "trajectory_tolerance", 1e-3, "The same for the outputs of the whole Parallel trajectory "
    "(50 steps of the image U-Net's 4e-5 add up to ~1e-4; an off-by-one switch step gives 2e-2).")


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


def relative_entry(config, what: str, section: str, ours, theirs) -> dict:
  """bench.json entry `[speech_]reference_max_abs_diff_<what>`: max |jax - torch| over the outputs
  (JAX arrays, torch's numpy arrays), baseline max |jax|."""
  name = f"{'speech_' if bs.is_speech(config) else ''}reference_max_abs_diff_{what}"
  diff = max(float(np.max(np.abs(to_torch_layout(a) - t))) for a, t in zip(ours, theirs))
  scale = max(float(np.max(np.abs(a))) for a in ours)
  print(f"{name}: max |jax - torch| {diff:.3g}, max |jax| {scale:.3g}")
  return bc.entry(name, diff, "abs", scale, section=section)


def load_reference(config) -> tuple:
  """(torch modules with the benchmark's JAX weights, params, classifier): `bs.init_params`'
  random weights."""
  modules = bs.torch_networks(config)
  params, classifier = bs.init_params(config)
  weights = bs.params_by_network(params, classifier)
  for name, args in bs._network_inputs(config, 1).items():
    template = bs._net(config, name).init(jax.random.PRNGKey(0), *args)["params"]   # creation order
    tr.load_flax_params(modules[name], torch_order(same_order(template, weights[name])))
  return modules, params, classifier


def check_networks(config, section: str, modules: dict, params, classifier) -> list[dict]:
  """One entry per network, called once on the same random inputs in both frameworks."""
  weights = bs.params_by_network(params, classifier)
  inputs = random_inputs(config, jax.random.PRNGKey(3), _BATCH.value)
  entries = []
  for name, module in modules.items():
    ours = jax.tree.leaves(bs._net(config, name).apply({"params": weights[name]}, *inputs[name]))
    with torch.no_grad():
      theirs = module(*(torch.from_numpy(to_torch_layout(a)) for a in inputs[name]))
    theirs = [t.numpy() for t in (theirs if isinstance(theirs, tuple) else (theirs,))]
    entries.append(relative_entry(config, name, section, ours, theirs))
  return entries


def fixed_noise(shape, complex_: bool = False) -> np.ndarray:
  """A deterministic stand-in for N(0, 1) noise of `shape` (JAX's layout): sqrt(2) cos(0.7 i + 0.3)
  over the flat index i (mean ~0, variance ~1); complex: (re + 1j im) / sqrt(2) from the pattern of
  [2, *shape], as `sde.normal` draws it."""
  if complex_:
    re, im = fixed_noise((2,) + tuple(shape))
    return ((re + 1j * im) / np.sqrt(2)).astype(np.complex64)
  i = np.arange(int(np.prod(shape)), dtype=np.float64)
  return (np.sqrt(2) * np.cos(0.7 * i + 0.3)).reshape(shape).astype(np.float32)


def jax_fixed_noise(key, shape, dtype=jnp.float32):
  """`fixed_noise` in place of `cdjax.sde.normal` (the key is ignored)."""
  del key
  return jnp.asarray(fixed_noise(shape, jnp.issubdtype(dtype, jnp.complexfloating)), dtype)


def torch_fixed_noise(x):
  """`fixed_noise` in place of `torch_reference.randn_like`: drawn in JAX's layout (images NHWC),
  returned in torch's."""
  shape = x.shape if x.ndim != 4 else (x.shape[0], *x.shape[2:], x.shape[1])
  z = fixed_noise(shape, x.is_complex())
  return torch.from_numpy(np.ascontiguousarray(to_torch_layout(z))).to(x.dtype)


def check_trajectory(config, section: str, modules: dict, params, classifier) -> list[dict]:
  """The whole Parallel trajectory, cdjax's (`coupled.run` in one jit) against the reference's
  Python loop, from the same y and weights, `fixed_noise` in place of every noise draw: entries
  for x0, the logits and f(x0)."""
  cfg = bs.sampling_config(config, "parallel")
  cfg.micro_batch = 0   # chunks would reorder the items against the noise pattern
  y = bs.make_y(config, jax.random.PRNGKey(4), _BATCH.value)
  with mock.patch.object(sde_lib, "normal", jax_fixed_noise):
    fn = jax.jit(coupled.get_coupled_fn(speech.coupled_model(config), cfg))
    ours = fn(params, classifier, jax.random.PRNGKey(1), y)[:3]
  with mock.patch.object(tr, "randn_like", torch_fixed_noise), torch.no_grad():
    theirs = bs.torch_parallel_sampler(config, modules)(torch.from_numpy(to_torch_layout(y)))
  return [relative_entry(config, f"parallel_{name}", section, [a], [t.numpy()])
          for name, a, t in zip(("x0", "logits", "classifier_logits"), ours, theirs)]


def main(_):
  config = bs._CONFIG.value
  section = bc.section("reference_speech" if bs.is_speech(config) else "reference")
  modules, params, classifier = load_reference(config)
  networks = check_networks(config, section, modules, params, classifier)
  trajectory = check_trajectory(config, section, modules, params, classifier)
  notes = [f"the benchmark's random JAX weights copied into the torch modules; each network "
           f"called once at batch {_BATCH.value} on the same random inputs; value = max |jax - "
           f"torch| over its outputs, baseline = max |jax|, ratio = their quotient",
           f"*_parallel_*: the whole Parallel trajectory at batch {_BATCH.value}, cdjax's jit + "
           "scan against the reference's Python loop, a fixed pattern in place of every noise "
           "draw (`fixed_noise`)"]
  print(bc.write_results(networks + trajectory, bc.command(sys.argv), notes, section))
  for entries, tolerance, fix in (
      (networks, _TOLERANCE.value, "the module in experiments/torch_reference*.py that no longer "
       "mirrors cdjax.nets"),
      (trajectory, _TRAJECTORY_TOLERANCE.value, "the ParallelSampler in "
       "experiments/torch_reference*.py that no longer mirrors cdjax.coupled's parallel strategy")):
    worst = max(entries, key=lambda e: e["ratio"])
    if worst["ratio"] > tolerance:
      sys.exit(f"error: {worst['name']}: the PyTorch reference differs from cdjax by "
               f"{worst['ratio']:.2g} of the output's scale (tolerance {tolerance:g}); fix {fix}.")


if __name__ == "__main__":
  overrides.run(main, "configs/mnist_demo.py")
