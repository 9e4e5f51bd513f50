"""Checkpoints (orbax): the train state plus the data-iterator position, and frozen classifiers
with a provenance record.

A training checkpoint `<dir>/<step>/` holds three items: `state` (params, opt_state, ema_params,
step, rng), `data` (JSON: every host's grain iterator state, {"hosts": [state of process 0, ...]})
and `meta` (JSON, e.g. the sha256 of the frozen classifier the model was trained against). Saves
are atomic (orbax writes a temporary directory and renames it). An unreadable checkpoint, or one
of another train state (other parameter names or shapes, another optimizer), raises
`CheckpointError` naming its path and the difference; it is never deleted.

A frozen classifier `<dir>/` holds `params/` (orbax) and `provenance.json`: the path, the sha256
of its parameters' bytes, its clean test accuracy and the config that trained it.
"""
import hashlib
import json
import os
from typing import Any, Optional

from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from cdjax import errors

PROVENANCE = "provenance.json"


class CheckpointError(RuntimeError):
  """A checkpoint could not be read, or belongs to a different frozen classifier."""


def _abstract(tree):
  """Shapes, dtypes and shardings of a pytree of arrays (the restore target)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _saved_state(path: str):
  """The saved train state's tree of orbax array metadata (shapes, dtypes, shardings), read
  from checkpoint `<path>/state` without loading any array."""
  return ocp.StandardCheckpointHandler().metadata(epath.Path(path) / "state")


def _key_name(key) -> str:
  """A pytree key as saved by orbax: dict keys, attribute names and indices alike."""
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{dotted path: shape} of every array leaf of `tree` (arrays or orbax array metadata)."""
  return {".".join(map(_key_name, path)): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def tree_difference(saved, target, most: int = 4) -> str:
  """What differs between the arrays of `saved` and of `target` (paths and shapes), in words;
  "" when both hold the same paths with the same shapes."""
  a, b = _leaf_shapes(saved), _leaf_shapes(target)
  parts = []
  for what, paths in (("only in the checkpoint", sorted(a.keys() - b.keys())),
                      ("only in this config's state", sorted(b.keys() - a.keys())),
                      ("other shapes", [f"{p} {a[p]} vs {b[p]}" for p in sorted(a.keys() & b.keys())
                                        if a[p] != b[p]])):
    if paths:
      more = f" and {len(paths) - most} more" if len(paths) > most else ""
      parts.append(f"{len(paths)} {what} ({', '.join(paths[:most])}{more})")
  return "; ".join(parts)


class Checkpointer:
  """Training checkpoints in `directory`: the last `config.keep`, plus the best by
  `config.best_metric` (`config.best_mode` "max" | "min") when that is set."""

  def __init__(self, directory: str, config: ml_collections.ConfigDict):
    if config.keep < 1:
      raise ValueError(f"checkpoint.keep={config.keep} would delete every checkpoint, the newest "
                       "too; keep at least 1.")
    self.directory = os.path.abspath(directory)
    self.best_metric = config.best_metric
    policies = [ocp.checkpoint_managers.LatestN(n=config.keep)]
    best = {}
    if config.best_metric:
      if config.best_mode not in ("max", "min"):
        raise ValueError(f"checkpoint.best_mode={config.best_mode!r}; use 'max' or 'min'.")
      metric = lambda m: m[config.best_metric]
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=metric, reverse=config.best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
      best = dict(best_fn=metric, best_mode=config.best_mode)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies), **best)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "meta"),
                                         options=options)

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def best_step(self) -> Optional[int]:
    return self.manager.best_step()

  def save(self, step: int, state, data_state: Optional[bytes], meta: dict,
           metrics: Optional[dict] = None) -> None:
    """Saves `state` (a pytree of arrays), this host's iterator state (grain's JSON bytes; with
    every other host's, `all_hosts`) and `meta`; every host calls it. `metrics` must hold
    `checkpoint.best_metric` when one is set (else a ValueError, before anything is written)."""
    if self.best_metric and self.best_metric not in (metrics or {}):
      raise ValueError(
          f"checkpoint.best_metric={self.best_metric!r} is not a metric of this run; it has "
          f"{', '.join(sorted(metrics or {}))}. Set checkpoint.best_metric to one of them, or to "
          "'' to keep only the latest checkpoints.")
    data = {} if data_state is None else {"hosts": [json.loads(s) for s in all_hosts(data_state)]}
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data),
          meta=ocp.args.JsonSave(meta)), metrics=metrics)
    except Exception as e:
      raise self._save_failed(e) from e

  def _save_failed(self, e: Exception) -> "CheckpointError":
    """The CheckpointError of a save that failed (disk full, a directory that went away)."""
    latest = self.latest_step()
    return CheckpointError(
        f"Saving a checkpoint in {self.directory} failed ({errors.brief(e)}). The finished "
        f"ones are intact (latest: {'none yet' if latest is None else self.path(latest)}); free "
        "space or fix the directory, then rerun the same command to resume from the latest.")

  def restore(self, state_like, step: Optional[int] = None):
    """Restores step `step` (default: the latest) into the structure, shapes and shardings of
    `state_like`. Returns (state, data_state bytes or None, meta)."""
    step = self.latest_step() if step is None else step
    path = self.path(step)
    try:
      saved = _saved_state(path)
    except Exception:   # unreadable metadata: the restore below names the problem
      saved = None
    difference = tree_difference(saved, state_like) if saved is not None else ""
    if difference:
      raise CheckpointError(
          f"Checkpoint {path} holds a different train state than this config builds: "
          f"{difference}. It was left in place. Resume with the config it was trained with "
          "(config.json beside its checkpoints/), or train in a new workdir.")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(_abstract(state_like)), data=ocp.args.JsonRestore(),
          meta=ocp.args.JsonRestore()))
    except Exception as e:   # orbax raises many types for truncated or missing files
      raise CheckpointError(f"Checkpoint {path} is unreadable ({errors.brief(e)}). It was "
                            "left in place; move it aside to resume from an earlier one.") from e
    return out.state, _this_host(out.data, path), out.meta

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk (CheckpointError if one failed)."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(e) from e

  def close(self) -> None:
    """Waits for pending saves (CheckpointError if one failed) and stops the manager."""
    try:
      self.manager.close()
    except Exception as e:
      raise self._save_failed(e) from e

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def all_hosts(data_state: bytes) -> list[bytes]:
  """Every host's `data_state`, in process order (a collective: each host passes its own). Orbax
  writes a JSON item from the primary host alone, so the states travel there together."""
  if jax.process_count() == 1:
    return [data_state]
  sizes = multihost_utils.process_allgather(np.int32(len(data_state)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:len(data_state)] = np.frombuffer(data_state, np.uint8)
  states = multihost_utils.process_allgather(padded)
  return [bytes(s[:n]) for s, n in zip(states, sizes)]


def _this_host(data: dict, path: str) -> Optional[bytes]:
  """This host's iterator state in a restored `data` item (None when none was saved)."""
  if not data:
    return None
  hosts = data.get("hosts", [data])   # checkpoints before 2026-12-06 held one host's state
  if len(hosts) != jax.process_count():
    raise CheckpointError(f"Checkpoint {path} was written by {len(hosts)} hosts, and this job has "
                          f"{jax.process_count()}: each host resumes its own input shard, so "
                          f"resume with {len(hosts)} hosts (or train in a new workdir).")
  return json.dumps(hosts[jax.process_index()]).encode()


def restore_params(directory: str, step: Optional[int] = None, ema: bool = True,
                   frozen_sha256: Optional[dict] = None):
  """The (EMA) parameters of a training checkpoint (default: the latest step), on this process's
  first device whatever devices it was saved from (a pod's checkpoint loads on one GPU); callers
  replicate them over a mesh where they shard a batch. Only those arrays are read, not the rest
  of the train state (optimizer moments, ...).

  With `frozen_sha256` ({name: sha256}, see `check_frozen`), raises `CheckpointError` unless
  the model was trained against exactly those frozen networks."""
  name = "ema_params" if ema else "params"
  here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  # create=False: it only reads, as read_only=True would without logging three warnings per load
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data", "meta"),
                                  options=ocp.CheckpointManagerOptions(create=False))
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {directory}.")
    path = os.path.join(os.path.abspath(directory), str(step))
    try:
      wanted = {name: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=here),
                                   _saved_state(path)[name])}
      out = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(wanted, ocp.checkpoint_utils.construct_restore_args(wanted),
                                       partial_restore=True),
          meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"Checkpoint {path} is unreadable ({errors.brief(e)}). It was left "
                            "in place; move it aside to use an earlier one, or train the stage "
                            "again.") from e
  finally:
    manager.close()
  if frozen_sha256 is not None:
    check_frozen(recorded_frozen(out.meta), frozen_sha256, path)
  return out.state[name]


def recorded_frozen(meta: Optional[dict]) -> dict:
  """{name: sha256} of the frozen networks a checkpoint's `meta` records (checkpoints written
  before the enhancer was recorded hold only "classifier_sha256")."""
  meta = meta or {}
  if "frozen_sha256" in meta:
    return meta["frozen_sha256"]
  return {"classifier": meta["classifier_sha256"]} if meta.get("classifier_sha256") else {}


def check_frozen(recorded: dict, given: dict, what: str) -> None:
  """Raises `CheckpointError` unless `what` was trained against exactly the frozen networks
  `given`: both {name: sha256 hex digest of its params}, e.g. {"classifier": ..., "enhancer": ...}."""
  for name in sorted(set(recorded) | set(given)):
    if recorded.get(name) != given.get(name):
      raise CheckpointError(
          f"{what} was trained against the frozen {name} with sha256 {recorded.get(name)}, but "
          f"the {name} given has sha256 {given.get(name)}. Use the {name} it was trained with, "
          "or retrain it against this one.")


def params_sha256(params) -> str:
  """sha256 over a params pytree: each leaf's path, dtype, shape and bytes, in pytree order."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    leaf = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype.str}|{leaf.shape}|".encode())
    h.update(leaf.tobytes())
  return h.hexdigest()


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def save_classifier(directory: str, params, accuracy: float,
                    config: ml_collections.ConfigDict) -> dict:
  """Saves frozen classifier `params` and its provenance record; returns the record. Raises
  `CheckpointError` rather than replace another classifier saved there (other stages may have
  been trained against it)."""
  directory = os.path.abspath(directory)
  params = jax.device_get(params)
  sha = params_sha256(params)
  try:
    with open(os.path.join(directory, PROVENANCE)) as f:
      saved = json.load(f)["sha256"]
  except (OSError, ValueError, KeyError):
    saved = sha   # none there, or an export cut short: save
  if saved != sha:
    raise CheckpointError(
        f"{directory} holds another frozen classifier (sha256 {saved}), which stages trained "
        f"since may depend on; the new one (sha256 {sha}) was not saved over it. Move or delete "
        f"{directory} and rerun to export the new one from its last checkpoint.")
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(directory, "params"), params, force=True)
  record = dict(checkpoint=directory, sha256=sha,
                clean_test_accuracy=float(accuracy), config=json.loads(config.to_json_best_effort()))
  if jax.process_index() == 0:
    _write_json(os.path.join(directory, PROVENANCE), record)
  return record


def load_classifier(directory: str, expected_sha256: Optional[str] = None):
  """Loads a frozen classifier saved by `save_classifier` -> (params, provenance record).

  Raises `CheckpointError` if it is unreadable, if its parameters no longer match the hash in
  its record, or if `expected_sha256` is given and differs."""
  directory = os.path.abspath(directory)
  try:
    with open(os.path.join(directory, PROVENANCE)) as f:
      record = json.load(f)
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(os.path.join(directory, "params"))
  except Exception as e:
    inside = os.path.join(directory, "classifier")   # given the classifier trainer's workdir
    hint = (f" It is the classifier trainer's workdir: give {inside}."
            if os.path.exists(os.path.join(inside, PROVENANCE)) else "")
    raise CheckpointError(f"Frozen classifier {directory} is unreadable "
                          f"({errors.brief(e)}).{hint}") from e
  sha = params_sha256(params)
  if sha != record["sha256"]:
    raise CheckpointError(f"Frozen classifier {directory}: its parameters hash to {sha}, not to "
                          f"the {record['sha256']} in its {PROVENANCE}; the files were changed.")
  if expected_sha256 is not None and sha != expected_sha256:
    check_frozen({"classifier": expected_sha256}, {"classifier": sha}, "This model")
  return params, record
