"""Datasets by name: local TFDS builders, built once into a data dir, and the TFDS catalog.

Every source is random access (`len(source)`, `source[i] -> dict of numpy`). Local builders
write array_record files without TensorFlow and are read back with `tfds.data_source`.
"""
import contextlib
import fcntl
import os
import urllib.error
import urllib.request
from collections.abc import Sequence

import numpy as np
import tensorflow_datasets as tfds
import tqdm

from cdjax import errors
from cdjax.registry import Registry

DATASETS = Registry("dataset")   # local TFDS builder classes, by TFDS name
DEFAULT_DATA_DIR = "~/.cache/cdjax/tensorflow_datasets"


def resolve_data_dir(data_dir: str = "") -> str:
  """The absolute data dir: `data_dir`, or the default cache dir when empty."""
  return os.path.abspath(os.path.expanduser(data_dir or DEFAULT_DATA_DIR))


@contextlib.contextmanager
def _build_lock(data_dir: str, name: str):
  """Serialises builds of `name` across processes sharing `data_dir`."""
  os.makedirs(data_dir, exist_ok=True)
  with open(os.path.join(data_dir, f".{name}.lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def get_builder(name: str, data_dir: str = "") -> tfds.core.DatasetBuilder:
  """The local builder `name`, prepared in `data_dir` (built on first use, reused after). A
  prepared copy that no longer loads (e.g. a damaged dataset_info.json) is a RuntimeError
  naming the folder to delete."""
  data_dir = resolve_data_dir(data_dir)
  builder_cls = DATASETS.get(name)
  prepared = os.path.join(data_dir, builder_cls.name)
  with _build_lock(data_dir, name):
    was_prepared = os.path.isdir(prepared)
    try:
      builder = builder_cls(data_dir=data_dir, file_format="array_record")
      builder.download_and_prepare()
    except Exception as e:
      if not was_prepared:
        raise
      raise _unreadable_copy(name, prepared, e) from e
  return builder


def _unreadable_copy(dataset: str, folder: str, e: Exception) -> RuntimeError:
  """The error of a prepared copy in `folder` that no longer loads, naming the folder to delete."""
  return RuntimeError(f"Dataset {dataset}: its prepared copy in {folder} does not load "
                      f"({errors.brief(e)}). Delete {folder} and rerun to prepare it again.")


def _read_labels(source, chunk: int = 4096) -> np.ndarray:
  """Every example's label [N], read in chunks (`__getitems__` where the source has it: about
  3x faster than one example at a time), with a progress bar."""
  n = len(source)

  def read(idx):
    try:
      return source.__getitems__(idx)
    except (AttributeError, TypeError):   # no batched reads: lists, TFDS mock data sources
      return [source[i] for i in idx]

  labels = []
  with tqdm.tqdm(total=n, desc="reading labels", unit="ex", disable=n <= 10 * chunk) as bar:
    for start in range(0, n, chunk):
      labels += [e["label"] for e in read(range(start, min(start + chunk, n)))]
      bar.update(min(chunk, n - start))
  return np.asarray(labels, np.int64)


class LabelSubset:
  """The examples of `source` whose label is in `labels`, relabelled to their position there
  (labels[k] -> k), as a random-access source. The kept indices are found once, by reading
  every example's label."""

  def __init__(self, source, labels: Sequence[int]):
    self.source, self.labels = source, tuple(int(k) for k in labels)
    if not self.labels or len(set(self.labels)) != len(self.labels):
      raise ValueError(f"A label subset must be a non-empty list of distinct labels, got "
                       f"{list(labels)!r}.")
    old = _read_labels(source)
    top = int(old.max(initial=-1))
    if min(self.labels) < 0 or max(self.labels) > top:
      raise ValueError(f"Label subset {list(self.labels)} is out of range: the labels of "
                       f"{source!r} run from 0 to {top}.")
    self.index = np.flatnonzero(np.isin(old, self.labels))
    if not len(self.index):
      raise ValueError(f"No example of {source!r} has a label in {list(self.labels)}.")
    self.new_label = {k: i for i, k in enumerate(self.labels)}

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int) -> dict:
    example = dict(self.source[int(self.index[i])])
    example["label"] = self.new_label[int(example["label"])]
    return example

  def __repr__(self) -> str:   # grain checks it when restoring an iterator
    return f"LabelSubset({self.source!r}, labels={list(self.labels)})"


def get_source(name: str, split: str, data_dir: str = "",
               label_subset: Sequence[int] | None = None):
  """A random-access source over `split` of dataset `name`.

  Local builders (`DATASETS`) are built into `data_dir` if needed; any other name is a TFDS
  catalog dataset, prepared there on first use, which needs internet (offline, a
  FileNotFoundError says how to get it).
  Examples are dicts: images {"image": uint8 [H, W, C], "label"}, audio {"audio": [L],
  "label", "voice"} (noise clips: {"audio", "label"}). With `label_subset` (a list of K labels),
  only the examples of those labels, relabelled 0..K-1 in that order (`LabelSubset`).
  """
  builder = _get_builder(name, data_dir)
  source = builder.as_data_source(split=split)
  _check_readable(source, name, split, os.path.dirname(builder.data_dir))
  return source if label_subset is None else LabelSubset(source, label_subset)


def _check_readable(source, name: str, split: str, folder: str) -> None:
  """Reads the first and last example of `source`: a truncated or damaged file (an interrupted
  copy, a full disk) is a RuntimeError naming `folder` to delete here, not riegeli's error
  in the middle of training."""
  for i in sorted({0, len(source) - 1}) if len(source) else ():
    try:
      source[i]
    except RuntimeError as e:
      raise _unreadable_copy(f"{name}, split {split!r}", folder, e) from e


def _get_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """The prepared builder of `name`: a local builder, or a TFDS catalog dataset."""
  if name in DATASETS:
    return get_builder(name, data_dir)
  base = name.split(":")[0].split("/")[0]
  if base not in tfds.list_builders(with_community_datasets=False):
    raise KeyError(
        f"Unknown dataset {name!r}: it is neither a local builder ({', '.join(DATASETS.names())}) "
        "nor in the TFDS catalog. Use one of the local builders or a TFDS catalog name "
        "such as 'cifar10'.")
  data_dir = resolve_data_dir(data_dir)
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      _download_and_prepare(builder, name, data_dir)
    return builder
  except ModuleNotFoundError as e:
    if "tensorflow" not in str(e):
      raise
    raise ModuleNotFoundError(
        f"The TFDS builder of {name!r} needs TensorFlow, which cdjax does not install. "
        "Install tensorflow (the CPU build is enough) to use this dataset.") from e


def _online(url: str = "https://storage.googleapis.com", timeout: float = 5.0) -> bool:
  """Whether `url` answers within about `timeout` seconds: a quick check for internet access."""
  try:
    urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
  except urllib.error.HTTPError:   # an HTTP error is still an answer
    return True
  except OSError:
    return False
  return True


def _unprepared_error(builder: tfds.core.DatasetBuilder, name: str, data_dir: str, reason: str):
  """The FileNotFoundError of a catalog dataset that is not prepared, with the ways to get it."""
  return FileNotFoundError(
      f"TFDS dataset {name!r} is not prepared in {data_dir} and could not be downloaded "
      f"({reason}). Run again with internet access, or prepare it on a machine that has it "
      f"(run cdjax there with data.data_dir=DIR, or `tfds build {name} --data_dir DIR "
      f"--file_format array_record`, which needs TensorFlow), then copy DIR/{builder.name} into "
      f"{data_dir} or point data.data_dir at the copy; or use a dataset built offline: "
      f"{', '.join(DATASETS.names())}.")


def _download_and_prepare(builder: tfds.core.DatasetBuilder, name: str, data_dir: str) -> None:
  """Downloads and prepares catalog dataset `name` into `data_dir`, or raises a
  FileNotFoundError saying how to get it: at once when offline (TFDS would retry for minutes)."""
  if not _online():
    raise _unprepared_error(builder, name, data_dir, "no internet")
  try:
    builder.download_and_prepare()
  except OSError as e:   # requests' and urllib's errors included
    raise _unprepared_error(builder, name, data_dir, f"{type(e).__name__}: {e}") from e
