"""Training checkpoints (state + iterator + meta, keep last N + best, unreadable -> clear error)
and frozen classifiers (provenance, hash checks)."""
import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from cdjax import checkpoint
from configs import default


def _state(v: float):
  return {"params": {"w": jnp.full((3, 2), v)}, "step": jnp.asarray(int(v), jnp.int32),
          "rng": jax.random.PRNGKey(int(v))}


def _ckpt_config(**kw):
  c = default.get_config().checkpoint
  c.update(kw)
  return c


def test_roundtrip_with_iterator_state_and_meta(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  data_state = json.dumps({"last_seen_indices": {"0": 7}}).encode()
  ckpt.save(1, _state(1.0), data_state, {"frozen_sha256": {"classifier": "abc"}})
  ckpt.wait()
  state, restored_data, meta = ckpt.restore(_state(0.0))
  ckpt.close()
  np.testing.assert_array_equal(state["params"]["w"], np.full((3, 2), 1.0))
  np.testing.assert_array_equal(state["rng"], jax.random.PRNGKey(1))
  assert json.loads(restored_data) == {"last_seen_indices": {"0": 7}}
  assert meta == {"frozen_sha256": {"classifier": "abc"}}


def test_every_host_resumes_its_own_iterator_state(monkeypatch):
  # Orbax writes the JSON item from the primary host only, so every host's state goes there.
  states = [json.dumps({"last_seen_indices": {"0": 46}}).encode(),
            json.dumps({"last_seen_indices": {"0": 47}, "shard": 1}).encode()]

  def process_allgather(x):   # what two hosts passing states[0] and states[1] would gather
    if np.ndim(x) == 0:
      return np.array([len(s) for s in states], np.int32)
    return np.stack([np.pad(np.frombuffer(s, np.uint8), (0, len(x) - len(s))) for s in states])
  monkeypatch.setattr(checkpoint.multihost_utils, "process_allgather", process_allgather)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  assert checkpoint.all_hosts(states[1]) == states
  saved = {"hosts": [json.loads(s) for s in states]}
  for host in range(2):
    monkeypatch.setattr(jax, "process_index", lambda host=host: host)
    assert checkpoint._this_host(saved, "ckpt/9") == states[host]
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(checkpoint.CheckpointError, match="written by 2 hosts, and this job has 3"):
    checkpoint._this_host(saved, "ckpt/9")


def test_legacy_single_host_iterator_state_and_none_saved():
  """Checkpoints before 2026-12-06 held one host's state itself (no "hosts" list); an empty
  `data` item means no iterator state was saved."""
  legacy = {"last_seen_indices": {"0": 5}}
  assert json.loads(checkpoint._this_host(legacy, "ckpt/3")) == legacy
  assert checkpoint._this_host({}, "ckpt/3") is None


def test_keep_below_one_is_refused(tmp_path):
  with pytest.raises(ValueError, match="checkpoint.keep=0 would delete every checkpoint"):
    checkpoint.Checkpointer(str(tmp_path), _ckpt_config(keep=0))


@pytest.mark.parametrize("mode,best", [("max", 2), ("min", 3)])
def test_keeps_last_n_and_the_best(tmp_path, mode, best):
  """The last 2 (4 and 5) and the best: the largest acc (step 2) for "max", the smallest (step 3)
  for "min"."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config(keep=2, best_metric="acc",
                                                             best_mode=mode))
  for step, acc in [(1, 0.5), (2, 0.9), (3, 0.05), (4, 0.7), (5, 0.1)]:
    ckpt.save(step, _state(step), None, {}, metrics={"acc": acc})
  ckpt.wait()
  assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == sorted([best, 4, 5])
  assert ckpt.best_step() == best and ckpt.latest_step() == 5
  ckpt.close()


def test_unreadable_checkpoint_names_path_and_is_kept(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ckpt.save(3, _state(3.0), None, {})
  ckpt.wait()
  state_dir = tmp_path / "3" / "state"
  data_files = [os.path.join(root, f) for root, _, files in os.walk(state_dir) for f in files
                if os.path.basename(root) == "d"]   # the arrays' bytes (OCDBT)
  assert data_files
  for path in data_files:   # cut short, as a disk filling up leaves them
    os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(checkpoint.CheckpointError, match=str(tmp_path / "3")) as info:
    ckpt.restore(_state(0.0))
  ckpt.close()
  assert state_dir.is_dir()
  message = str(info.value)   # the root cause's first line, not orbax's whole TensorStore spec
  assert "\n" not in message and len(message) < 700 and message.endswith("an earlier one.")
  # TensorStore's error, naming the array it could not read (of several read concurrently).
  assert re.search(rf"unreadable \(ValueError: OUT_OF_RANGE: .*Error reading \"[\w.]+/\.zarray\" "
                   rf"in OCDBT database at local file \"{re.escape(str(state_dir))}/\"", message)


def test_a_failed_save_names_the_directory_and_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A save that fails (here: the disk is full) is a CheckpointError naming the directory, the
  cause and the newest finished checkpoint, which stays and restores."""
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ckpt.save(1, _state(1.0), None, {})
  ckpt.wait()

  def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")
  expected = (rf"Saving a checkpoint in {re.escape(str(tmp_path))} failed \(OSError: \[Errno 28\] "
              rf"No space left on device\)\. The finished ones are intact \(latest: "
              rf"{re.escape(str(tmp_path / '1'))}\); free space")
  monkeypatch.setattr(ckpt.manager, "save", disk_full)
  with pytest.raises(checkpoint.CheckpointError, match=expected):
    ckpt.save(2, _state(2.0), None, {})
  monkeypatch.setattr(ckpt.manager, "wait_until_finished", disk_full)   # a pending save's failure
  with pytest.raises(checkpoint.CheckpointError, match=expected):
    ckpt.wait()
  monkeypatch.undo()
  ckpt.close()
  with checkpoint.Checkpointer(str(tmp_path), _ckpt_config()) as again:
    assert again.latest_step() == 1
    np.testing.assert_array_equal(again.restore(_state(0.0))[0]["params"]["w"], np.ones((3, 2)))


def test_frozen_classifier_provenance_and_hash_checks(tmp_path):
  params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.zeros(3, np.float32)}}
  config = ml_collections.ConfigDict({"seed": 0})
  record = checkpoint.save_classifier(str(tmp_path / "clf"), params, 0.97, config)
  assert record["sha256"] == checkpoint.params_sha256(params)
  with open(tmp_path / "clf" / checkpoint.PROVENANCE) as f:
    saved = json.load(f)
  assert saved["clean_test_accuracy"] == 0.97 and saved["checkpoint"] == str(tmp_path / "clf")
  assert saved["config"] == {"seed": 0}

  loaded, rec = checkpoint.load_classifier(str(tmp_path / "clf"), expected_sha256=record["sha256"])
  np.testing.assert_array_equal(loaded["dense"]["kernel"], params["dense"]["kernel"])
  with pytest.raises(checkpoint.CheckpointError, match="trained against the frozen classifier"):
    checkpoint.load_classifier(str(tmp_path / "clf"), expected_sha256="0" * 64)

  other = jax.tree.map(lambda x: x + 1, params)
  assert checkpoint.params_sha256(other) != record["sha256"]
  checkpoint.save_classifier(str(tmp_path / "clf"), params, 0.97, config)   # the same again: fine
  with pytest.raises(checkpoint.CheckpointError, match="holds another frozen classifier"):
    checkpoint.save_classifier(str(tmp_path / "clf"), other, 0.98, config)
  loaded, _ = checkpoint.load_classifier(str(tmp_path / "clf"), expected_sha256=record["sha256"])
  np.testing.assert_array_equal(loaded["dense"]["kernel"], params["dense"]["kernel"])   # kept
  with open(tmp_path / "clf" / checkpoint.PROVENANCE, "w") as f:   # record of another classifier
    json.dump(dict(saved, sha256=checkpoint.params_sha256(other)), f)
  with pytest.raises(checkpoint.CheckpointError, match="files were changed"):
    checkpoint.load_classifier(str(tmp_path / "clf"))
  with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
    checkpoint.load_classifier(str(tmp_path / "absent"))
  os.rename(tmp_path / "clf", tmp_path / "classifier")   # as the classifier trainer exports it
  with pytest.raises(checkpoint.CheckpointError, match=(
      rf"unreadable .* It is the classifier trainer's workdir: give "
      rf"{re.escape(str(tmp_path / 'classifier'))}\.")):
    checkpoint.load_classifier(str(tmp_path))


def test_restore_params_only_reads_quietly_and_checks_frozen_hashes(tmp_path, caplog,
                                                                    files_under):
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  state = {"params": {"w": jnp.ones(2)}, "ema_params": {"w": jnp.full(2, 2.0)}}
  frozen = {"classifier": "a" * 64, "enhancer": "c" * 64}
  ckpt.save(4, state, None, {"frozen_sha256": frozen})
  ckpt.close()
  saved = files_under(str(tmp_path))
  with caplog.at_level("WARNING"):
    ema = checkpoint.restore_params(str(tmp_path), frozen_sha256=frozen)
  assert files_under(str(tmp_path)) == saved   # it only reads
  assert not caplog.records, [r.getMessage() for r in caplog.records]   # and quietly
  np.testing.assert_array_equal(ema["w"], [2.0, 2.0])
  raw = checkpoint.restore_params(str(tmp_path), ema=False)   # only that subtree, as jax arrays
  assert list(raw) == ["w"] and isinstance(raw["w"], jax.Array)
  np.testing.assert_array_equal(raw["w"], [1.0, 1.0])
  with pytest.raises(checkpoint.CheckpointError, match="frozen classifier with sha256 a+, but the "
                                                       "classifier given has sha256 b+"):
    checkpoint.restore_params(str(tmp_path), frozen_sha256=dict(frozen, classifier="b" * 64))
  with pytest.raises(checkpoint.CheckpointError, match="frozen enhancer with sha256 c+, but the "
                                                       "enhancer given has sha256 None"):
    checkpoint.restore_params(str(tmp_path), frozen_sha256={"classifier": "a" * 64})
  # Checkpoints written before the enhancer was recorded name only the classifier.
  assert checkpoint.recorded_frozen({"classifier_sha256": "a" * 64}) == {"classifier": "a" * 64}
  assert checkpoint.recorded_frozen({"trainer": "signal", "classifier_sha256": None}) == {}


def test_checkpoints_restore_onto_other_devices_than_they_were_saved_from(tmp_path):
  half = Mesh(np.asarray(jax.devices()[2:4]), ("data",))   # trained on 2 of the 8 devices
  state = jax.device_put({"params": {"w": jnp.ones(3)}, "ema_params": {"w": jnp.arange(3.0)}},
                         NamedSharding(half, P()))
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ckpt.save(1, state, None, {})
  ckpt.wait()
  ema = checkpoint.restore_params(str(tmp_path))   # evaluation: on this process's first device
  assert ema["w"].devices() == {jax.local_devices()[0]} and len(jax.devices()) == 8
  np.testing.assert_array_equal(ema["w"], [0.0, 1.0, 2.0])
  everywhere = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P())
  resumed, _, _ = ckpt.restore(jax.device_put(jax.tree.map(jnp.zeros_like, state), everywhere))
  ckpt.close()   # resuming: onto the new run's mesh
  assert resumed["params"]["w"].sharding == everywhere
  np.testing.assert_array_equal(resumed["params"]["w"], [1.0, 1.0, 1.0])


def test_restore_into_another_train_state_names_the_difference(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ckpt.save(2, _state(2.0), None, {})
  ckpt.wait()
  other = _state(0.0)
  other["params"] = {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)}   # a wider layer, a new bias
  with pytest.raises(checkpoint.CheckpointError) as e:
    ckpt.restore(other)
  ckpt.close()
  message = str(e.value)
  assert str(tmp_path / "2") in message and "left in place" in message
  assert "1 only in this config's state (params.b)" in message
  assert "1 other shapes (params.w (3, 2) vs (3, 4))" in message
  assert "only in the checkpoint" not in message
  assert (tmp_path / "2" / "state").is_dir()


def test_tree_difference_counts_every_path_and_names_the_first_four():
  """Sorted paths, at most `most` named per kind with the rest counted; equal trees: ""."""
  z = np.zeros
  saved = {"enc": {f"w{i}": z(1) for i in range(6)}, "b": z((2, 3))}
  target = {"dec": {"w": z(1)}, "b": z((3, 2))}
  assert checkpoint.tree_difference(saved, target) == (
      "6 only in the checkpoint (enc.w0, enc.w1, enc.w2, enc.w3 and 2 more); "
      "1 only in this config's state (dec.w); 1 other shapes (b (2, 3) vs (3, 2))")
  assert checkpoint.tree_difference(saved, target, most=6).startswith(
      "6 only in the checkpoint (enc.w0, enc.w1, enc.w2, enc.w3, enc.w4, enc.w5); ")
  assert checkpoint.tree_difference(saved, jax.tree.map(lambda a: a + 1, saved)) == ""


def test_check_frozen_wants_exactly_the_recorded_networks():
  """A network given but not recorded (a model trained before the enhancer was frozen) is as
  wrong as one recorded but not given, or another hash."""
  recorded = {"classifier": "a" * 64}
  checkpoint.check_frozen(recorded, {"classifier": "a" * 64}, "model")
  checkpoint.check_frozen({}, {}, "model")
  with pytest.raises(checkpoint.CheckpointError, match=r"model was trained against the frozen "
                     r"enhancer with sha256 None, but the enhancer given has sha256 c+\."):
    checkpoint.check_frozen(recorded, {"classifier": "a" * 64, "enhancer": "c" * 64}, "model")
  with pytest.raises(checkpoint.CheckpointError, match="frozen classifier with sha256 a+, but the "
                     "classifier given has sha256 None"):
    checkpoint.check_frozen(recorded, {}, "model")


def test_params_sha256_sees_names_shapes_and_dtypes_not_just_bytes():
  """Parameters with the same bytes under another name, in another shape or as another dtype of
  the same width are other parameters; equal trees hash equal, however built."""
  w = np.arange(6, dtype=np.float32).reshape(2, 3)
  sha = checkpoint.params_sha256({"dense": {"kernel": w}})
  assert sha == checkpoint.params_sha256({"dense": {"kernel": jnp.asarray(w)}})
  others = [{"dense": {"bias": w}}, {"dense": {"kernel": w.reshape(3, 2)}},
            {"dense": {"kernel": w.view(np.int32)}}, {"dense": {"kernel": w + 1}}]
  assert all(a.tobytes() == w.tobytes() for a in jax.tree.leaves(others[:3]))
  assert len({sha} | {checkpoint.params_sha256(o) for o in others}) == 5


def test_tree_difference_reads_optax_states_as_orbax_saves_them(tmp_path):
  """Named tuples (optax states) and dicts name their leaves alike; another optimizer differs."""
  import optax
  params = {"w": jnp.ones((3, 2))}
  state = dict(params=params, opt_state=optax.adam(1e-3).init(params))
  ckpt = checkpoint.Checkpointer(str(tmp_path), _ckpt_config())
  ckpt.save(1, state, None, {})
  ckpt.wait()
  restored, _, _ = ckpt.restore(state)
  np.testing.assert_array_equal(restored["opt_state"][0].mu["w"], np.zeros((3, 2)))
  sgd = dict(params=params, opt_state=optax.sgd(1e-3, momentum=0.9).init(params))
  with pytest.raises(checkpoint.CheckpointError, match="only in the checkpoint .*mu.w"):
    ckpt.restore(sgd)
  ckpt.close()
