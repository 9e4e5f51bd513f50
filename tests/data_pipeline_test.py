"""Grain input pipeline: batches, determinism, per-host sharding, exact resume, errors."""
import jax
import numpy as np
import pytest

from cdjax import data
from configs import default
from configs import speech_commands

NUM_RECORDS = 100


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _indexed_source(n=NUM_RECORDS):
  """In-memory source whose example i is an image filled with i (uint8 [4, 4, 1])."""
  return [{"image": np.full((4, 4, 1), i, np.uint8), "label": i % 10, "id": f"x{i}"}
          for i in range(n)]


def _indices(batch):
  """The source indices of a batch of `_indexed_source` examples."""
  return np.round((batch["image"][:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_batches_are_standardized():
  batch = next(iter(data.make_loader(_indexed_source(), 16, seed=0)))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 4, 4, 1) and batch["image"].dtype == np.float32
  assert batch["label"].dtype == np.int32
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1


def test_standardize_maps_int16_audio_to_the_unit_interval_exactly():
  """int16 audio is divided by 32768, so -32768 -> -1 and 16384 -> 0.5 exactly ([-1, 1)); float
  audio is kept as it is."""
  out = data.standardize({"audio": np.array([-32768, 0, 16384, 32767], np.int16), "label": 3})
  np.testing.assert_array_equal(out["audio"], [-1.0, 0.0, 0.5, 32767 / 32768])
  assert out["audio"].dtype == np.float32 and out["label"].dtype == np.int32
  floats = np.array([-1.5, 0.25], np.float32)
  np.testing.assert_array_equal(data.standardize({"audio": floats})["audio"], floats)


def test_epoch_is_a_permutation_and_shuffle_is_seeded():
  def epoch(seed, shuffle=True):
    loader = data.make_loader(_indexed_source(), 8, seed=seed, shuffle=shuffle, num_epochs=1)
    return sum((_indices(b) for b in loader), [])
  order = epoch(0)
  assert len(order) == 96 and len(set(order)) == 96       # 12 full batches, no repeats
  assert order == epoch(0) and order != epoch(1)
  assert epoch(0, shuffle=False) == list(range(96))


def test_read_ahead_threads_give_the_same_batches_and_need_a_buffer():
  def epoch(**read):
    loader = data.make_loader(_indexed_source(), 8, seed=0, num_epochs=1, **read)
    return sum((_indices(b) for b in loader), [])
  assert epoch(read_threads=2, prefetch_buffer_size=16) == epoch()
  with pytest.raises(ValueError, match="prefetch_buffer_size > 0"):
    data.make_loader(_indexed_source(), 8, seed=0, read_threads=2)


def test_restore_mid_epoch_gives_the_same_batches(data_dir):
  source = data.get_source("mnist_local", "train[:600]", data_dir)
  assert len(source) == 600
  loader = data.make_loader(source, 64, seed=3)
  iterator = iter(loader)
  _take(iterator, 5)
  state = iterator.get_state()
  expected = _take(iterator, 15)                          # crosses the 9.4-batch epoch end
  resumed = iter(data.make_loader(source, 64, seed=3))
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 15)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  fresh = _take(iter(data.make_loader(source, 64, seed=3)), 6)[5]
  np.testing.assert_array_equal(fresh["image"], expected[0]["image"])


def test_hosts_read_disjoint_shards_of_host_sized_batches(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  seen = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    batches = list(data.make_loader(_indexed_source(), 16, seed=0, num_epochs=1))
    assert len(batches) == 6 and all(len(b["label"]) == 8 for b in batches)
    seen.append(set(sum(map(_indices, batches), [])))
  assert len(seen[0]) == len(seen[1]) == 48 and not seen[0] & seen[1]


def test_transform_applies_to_standardized_examples():
  loader = data.make_loader(_indexed_source(), 8, seed=0,
                            transform=lambda ex: {**ex, "label": ex["label"] + 100})
  assert np.all(next(iter(loader))["label"] >= 100)


def test_batch_not_divisible_by_devices():
  assert jax.device_count() == 8   # tests/conftest.py
  with pytest.raises(ValueError, match="batch size 12 is not divisible by the 8 devices.*16"):
    data.make_loader(_indexed_source(), 12, seed=0)
  # a mesh over 4 of the 8 devices (mesh.data=4) shards the batch over those 4
  assert next(iter(data.make_loader(_indexed_source(), 12, seed=0, num_devices=4)))["label"].shape == (12,)


def test_empty_and_too_small_sources():
  with pytest.raises(ValueError, match="empty"):
    data.make_loader([], 8, seed=0)
  with pytest.raises(ValueError, match="5 examples, fewer than its batch of 8"):
    data.make_loader(_indexed_source(5), 8, seed=0)
  with pytest.raises(ValueError, match="batch size 0 is not positive"):
    data.make_loader(_indexed_source(), 0, seed=0)


def test_too_small_source_counts_each_hosts_share(monkeypatch):
  """10 examples over 2 hosts are 5 per host: too few for a host batch of 8 (global 16)."""
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  with pytest.raises(ValueError, match="Each of the 2 hosts gets 5 examples, fewer than its batch"
                                       " of 8"):
    data.make_loader(_indexed_source(10), 16, seed=0)


def test_load_split(data_dir):
  split = data.load_split("mnist_local", "test", data_dir, max_examples=100)
  assert split["image"].shape == (100, 28, 28, 1) and split["image"].dtype == np.float32
  assert split["image"].min() == -1 and split["image"].max() == 1
  assert split["label"].shape == (100,) and len(np.unique(split["label"])) == 10
  assert len(data.load_split("mnist_local", "test", data_dir)["label"]) == 1000
  with pytest.raises(ValueError, match="Split 'test' of 'mnist_local' has no examples"):
    data.load_split("mnist_local", "test", data_dir, max_examples=0)


def _clips(lengths=(699, 1000, 1300)):   # 699: 301 zeros, 150 before and 151 after
  """Audio examples {"audio": int16 [n], "label": k} of these lengths, with distinct samples."""
  return [{"audio": (np.arange(n) * 7 + 1000 * k).astype(np.int16), "label": k}
          for k, n in enumerate(lengths)]


def _check_fitted(clips, fitted, length=1000):
  """Each fitted [length] wave: short clips centred in zeros, exact ones unchanged, long ones a
  contiguous window; returns the windows' starts."""
  starts = []
  for clip, wave in zip(clips, fitted):
    x = data.standardize(clip)["audio"]
    n = len(x)
    assert wave.shape == (length,) and wave.dtype == np.float32
    if n <= length:
      before = (length - n) // 2
      np.testing.assert_array_equal(wave[before:before + n], x)   # bit-identical, in zeros
      assert not wave[:before].any() and not wave[before + n:].any()
    else:
      start = int(np.flatnonzero(x == wave[0])[0])
      np.testing.assert_array_equal(wave, x[start:start + length])
      starts.append(start)
  return starts


def test_loader_fits_variable_length_audio():
  clips = _clips() * 8                                    # 24 examples, 8 of each length
  loader = data.make_loader(clips, 8, seed=0, num_epochs=1, audio_length=1000)
  starts = []
  for batch in loader:
    assert batch["audio"].shape == (8, 1000)
    starts += _check_fitted([clips[k] for k in batch["label"]], batch["audio"])
  assert len(starts) == 8 and all(0 <= s <= 300 for s in starts)
  assert len(set(starts)) > 1                             # random crops of the long clip
  again = next(iter(data.make_loader(clips, 8, seed=0, num_epochs=1, audio_length=1000)))
  np.testing.assert_array_equal(again["audio"], next(iter(loader))["audio"])
  # The transform maps fitted clips: it sees [1000] samples.
  lengths = data.make_loader(clips, 8, seed=0, audio_length=1000,
                             transform=lambda ex: {**ex, "label": len(ex["audio"])})
  assert next(iter(lengths))["label"].tolist() == [1000] * 8
  with pytest.raises(ValueError):                         # unfitted clips cannot be batched
    next(iter(data.make_loader(clips, 8, seed=0)))


def test_fit_audio_draws_every_window_start():
  """A clip one sample longer than the length has two windows (starts 0 and 1): both are drawn."""
  wave = np.arange(1001, dtype=np.float32)
  rng = np.random.default_rng(0)
  starts = {int(data.fit_audio({"audio": wave}, 1000, rng)["audio"][0]) for _ in range(20)}
  assert starts == {0, 1}


def test_load_split_fits_variable_length_audio(monkeypatch):
  clips = _clips()
  monkeypatch.setattr(data.pipeline, "get_source", lambda *args: clips)
  split = data.load_split("speech_commands", "test", audio_length=1000)
  assert split["audio"].shape == (3, 1000) and split["label"].tolist() == [0, 1, 2]
  assert _check_fitted(clips, split["audio"]) == [150]    # the central window
  np.testing.assert_array_equal(
      data.load_split("speech_commands", "test", audio_length=1000)["audio"], split["audio"])


def test_audio_length_of_config():
  assert data.audio_length(speech_commands.get_config()) == 16000
  assert data.audio_length(default.get_config()) == 0   # images
  config = default.get_config()
  config.data.shape = (64,)                              # 1-D but not audio
  assert data.audio_length(config) == 0
  config.data.modality = "audio"
  assert data.audio_length(config) == 64
