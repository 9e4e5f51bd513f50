"""Input pipeline: deterministic, per-host-sharded, checkpointable grain loaders, and small
in-memory splits for evaluation.

Model-facing examples keep "image" (float32 [H, W, C] in [-1, 1]), "audio" (float32 [L]),
"label" and "voice" (int32); other fields (e.g. catalog string ids) are dropped.
"""
from collections.abc import Callable, Sequence

import grain.python as grain
import jax
import numpy as np

from cdjax.data.sources import get_source

EXAMPLE_KEYS = ("image", "audio", "label", "voice")


def standardize(example: dict) -> dict:
  """One example's model-facing fields: uint8 images -> [-1, 1], int16 audio -> [-1, 1)."""
  out = {k: np.asarray(example[k]) for k in EXAMPLE_KEYS if k in example}
  if "image" in out and out["image"].dtype == np.uint8:
    out["image"] = out["image"].astype(np.float32) / 127.5 - 1.0
  if "audio" in out:
    scale = 32768.0 if out["audio"].dtype == np.int16 else 1.0
    out["audio"] = out["audio"].astype(np.float32) / scale
  for k in ("label", "voice"):
    if k in out:
      out[k] = out[k].astype(np.int32)
  return out


def host_batch_size(global_batch_size: int) -> int:
  """This host's share of the global batch; the global batch must divide the device count."""
  n = jax.device_count()
  if global_batch_size <= 0 or global_batch_size % n:
    nearest = max(n, round(global_batch_size / n) * n)
    raise ValueError(
        f"Global batch size {global_batch_size} is not divisible by the {n} devices; "
        f"use a multiple of {n}, e.g. {nearest}.")
  return global_batch_size // jax.process_count()


class _Map(grain.MapTransform):
  """A grain map step from a plain function of one example."""

  def __init__(self, fn: Callable[[dict], dict]):
    self.fn = fn

  def map(self, element: dict) -> dict:
    return self.fn(element)


def make_loader(source, global_batch_size: int, *, seed: int, shuffle: bool = True,
                num_epochs: int | None = None, transform: Callable[[dict], dict] | None = None,
                worker_count: int = 0) -> grain.DataLoader:
  """A grain loader of this host's batches: dicts of [global_batch_size / hosts, ...] arrays.

  Shuffling is deterministic in `seed` (a new order each epoch); each host reads a disjoint
  shard; batches run across epoch boundaries and the last partial batch is dropped.
  `transform` maps one standardized example. `it = iter(loader)` is checkpointable:
  `it.get_state()` / `it.set_state(state)` resume exactly. num_epochs=None repeats forever.
  """
  batch = host_batch_size(global_batch_size)
  if len(source) == 0:
    raise ValueError("The data source is empty; check the split name or slice (e.g. 'train[:0]').")
  per_host = len(source) // jax.process_count()
  if per_host < batch:
    raise ValueError(
        f"Each of the {jax.process_count()} hosts gets {per_host} examples, fewer than its "
        f"batch of {batch}; use a smaller global batch or a bigger split.")
  shard = grain.ShardOptions(jax.process_index(), jax.process_count(), drop_remainder=True)
  sampler = grain.IndexSampler(len(source), shard_options=shard, shuffle=shuffle,
                               num_epochs=num_epochs, seed=seed)
  ops = [_Map(standardize)] + ([_Map(transform)] if transform else [])
  return grain.DataLoader(data_source=source, sampler=sampler,
                          operations=ops + [grain.Batch(batch, drop_remainder=True)],
                          worker_count=worker_count)


def load_split(name: str, split: str, data_dir: str = "", max_examples: int = -1,
               label_subset: Sequence[int] | None = None) -> dict:
  """The first max_examples (-1: all) standardized examples of a split (of the labels in
  `label_subset`, relabelled, when given; see `get_source`), stacked: {key: [N, ...]}."""
  source = get_source(name, split, data_dir, label_subset)
  n = len(source) if max_examples < 0 else min(max_examples, len(source))
  if n == 0:
    raise ValueError(f"Split {split!r} of {name!r} has no examples (max_examples={max_examples}).")
  examples = [standardize(source[i]) for i in range(n)]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}
