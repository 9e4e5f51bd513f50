"""Evaluate coupled strategies and baselines on a labelled test set.

Every method sees the same degraded inputs (the corruption key is fixed per chunk of items), so
differences between methods are paired. Compile time is measured apart from steady-state time.
Long evaluations resume: with a cache directory, `run_method` saves its progress after every
batch and an interrupted run goes on from the last saved batch.
"""
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Optional
import zipfile

from absl import logging
import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cdjax import coupled
from cdjax import metrics
from cdjax import parallel
from cdjax import provenance

DEGRADE_CHUNK = 1000   # items degraded per corruption call; item keys depend only on their index


def degrade(corruption, key, clean: np.ndarray) -> np.ndarray:
  """Degraded copies [N, ...] of clean [N, ...]; chunk c uses fold_in(key, c)."""
  fn = jax.jit(corruption)
  chunks = [np.asarray(fn(jax.random.fold_in(key, c), clean[s:s + DEGRADE_CHUNK]))
            for c, s in enumerate(range(0, len(clean), DEGRADE_CHUNK))]
  return np.concatenate(chunks)


@dataclasses.dataclass
class MethodResult:
  method: str
  predictions: np.ndarray              # argmax of the method's final logits [N]
  classifier_predictions: np.ndarray   # argmax f(x0) [N]
  nfe: int                             # network evaluations per item
  seconds_per_item: float              # steady state, compile excluded
  compile_seconds: float
  x0: np.ndarray                       # the enhanced signals of the first batch


@functools.cache
def _source_digest() -> bytes:
  """sha256 of the cdjax sources: a code change invalidates every saved evaluation."""
  h = hashlib.sha256()
  root = os.path.dirname(os.path.abspath(__file__))
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for f in sorted(files):
      if f.endswith(".py"):
        h.update(open(os.path.join(folder, f), "rb").read())
  return h.digest()


def _fingerprint(cfg: ml_collections.ConfigDict, model_config, params, y: np.ndarray, key,
                 batch_size: int, mesh, compiler_options=None) -> str:
  """Hex digest of everything a method's predictions depend on: code, jax version, platform,
  XLA_FLAGS, the sampler's compiler options and mesh size, sampling config, model config,
  parameters, inputs, key and batch size."""
  h = hashlib.sha256(_source_digest())
  key = jax.random.key_data(key) if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  h.update(f"{jax.__version__}|{jax.default_backend()}|{os.environ.get('XLA_FLAGS', '')}|"
           f"{sorted((compiler_options or {}).items())}|{mesh.size}|{batch_size}|".encode())
  h.update(cfg.to_json(sort_keys=True).encode())
  if model_config is not None:
    h.update(model_config.to_json_best_effort(sort_keys=True).encode())
  h.update(str(jax.tree.structure(params)).encode())
  for a in jax.tree.leaves(params) + [y, key]:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def _load_progress(path: str) -> dict:
  """The saved progress of a method ({} when there is none or it is unreadable: then it is
  recomputed, with a warning)."""
  if not path or not os.path.exists(path):
    return {}
  try:
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    logging.warning("Ignoring unreadable evaluation progress %s (%s); recomputing.", path, e)
    return {}


def _save_progress(path: str, **arrays) -> None:
  """Writes `arrays` to path atomically (a killed run leaves the previous file whole)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".tmp", "wb") as f:
    np.savez(f, **arrays)
  os.replace(path + ".tmp", path)


def run_method(name: str, model: coupled.CoupledModel, cfg: ml_collections.ConfigDict, params,
               classifier_params, y: np.ndarray, key, batch_size: int, mesh,
               cache_dir: str = "", compiler_options: Optional[dict] = None,
               model_config: Optional[ml_collections.ConfigDict] = None) -> MethodResult:
  """Runs one sampling config over y [N, ...] in batches (batch b uses fold_in(key, b)), each
  batch sharded over the mesh's `data` axis and the parameters replicated (as in training).

  With `cache_dir`, progress is saved there after every batch (`<name>-<fingerprint>.npz`, see
  `_fingerprint`): a rerun goes on from the last saved batch, or reads a finished one back
  without compiling. seconds_per_item sums the batches' times over the runs. `compiler_options`:
  XLA's for the sampler's program (`parallel.sample_compiler_options`). `model_config`: the
  config the model was built from (SDEs, networks), part of the fingerprint, so that a changed
  `signal.sde_kwargs.N` is not read back from an earlier run."""
  n = len(y)
  num_batches, batch = parallel.sharded_batches(y, batch_size, mesh)
  path = ""
  if cache_dir:
    digest = _fingerprint(cfg, model_config, (params, classifier_params), y, key, batch_size, mesh,
                          compiler_options)
    path = os.path.join(cache_dir, f"{name}-{digest[:16]}.npz")
  saved = _load_progress(path)
  first = int(saved.get("batches", 0))
  preds = [saved["preds"]] if first else []
  clf_preds = [saved["clf_preds"]] if first else []
  first_x0, nfe = saved.get("x0"), int(saved.get("nfe", 0))
  seconds, compile_seconds = float(saved.get("seconds", 0.0)), float(saved.get("compile_seconds", 0.0))
  if first < num_batches:
    if first:
      tqdm.write(f"{name}: resuming at batch {first + 1}/{num_batches} ({path})")
    fn = jax.jit(coupled.get_coupled_fn(model, cfg), compiler_options=compiler_options)
    params, classifier_params = parallel.replicate((params, classifier_params), mesh)
    start = time.perf_counter()
    compiled = fn.lower(params, classifier_params, key, batch(0)).compile()
    compile_seconds = time.perf_counter() - start
    for b in tqdm(range(first, num_batches), desc=name, leave=False, initial=first,
                  total=num_batches):
      start = time.perf_counter()
      out = compiled(params, classifier_params, jax.random.fold_in(key, b), batch(b))
      preds.append(np.asarray(out.logits.argmax(-1)))
      clf_preds.append(np.asarray(out.classifier_logits.argmax(-1)))
      if first_x0 is None:
        first_x0, nfe = np.asarray(out.x0), int(out.nfe)
      seconds += time.perf_counter() - start
      if path:
        _save_progress(path, preds=np.concatenate(preds), clf_preds=np.concatenate(clf_preds),
                       x0=first_x0, nfe=nfe, batches=b + 1, seconds=seconds,
                       compile_seconds=compile_seconds)
  return MethodResult(name, np.concatenate(preds)[:n], np.concatenate(clf_preds)[:n], nfe,
                      seconds / n, compile_seconds, first_x0)


def result_rows(results: list[MethodResult], labels: np.ndarray, reference: str = "enhance_then_classify",
                **extra) -> list[dict]:
  """One row per method: accuracy with its 95% Wilson interval (`ci95` its half-width), the
  accuracy of f(x0), and the paired difference to `reference` (bootstrap 95% CI, wins / losses)
  where that method was run."""
  ref = {r.method: r for r in results}.get(reference)
  rows = []
  for r in results:
    acc = metrics.accuracy(r.predictions, labels)
    row = dict(extra, method=r.method, accuracy=acc.value, ci95=(acc.hi - acc.lo) / 2,
               ci95_lo=acc.lo, ci95_hi=acc.hi,
               accuracy_f_x0=metrics.accuracy(r.classifier_predictions, labels).value,
               nfe=r.nfe, seconds_per_item=r.seconds_per_item, compile_seconds=r.compile_seconds)
    if ref is not None and r is not ref:
      d = metrics.paired_bootstrap(r.predictions == labels, ref.predictions == labels)
      row.update(diff_vs_reference=d.diff, diff_ci95=f"[{d.lo:+.4f}, {d.hi:+.4f}]",
                 wins=d.wins, losses=d.losses)
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """A Markdown table of `columns` from rows (floats to 4 significant digits)."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)


def check_writable(out_prefix: str) -> None:
  """Creates the folder of `out_prefix` and checks that a file can be written there (an OSError
  naming it otherwise): experiments call it before hours of training and evaluation."""
  folder = os.path.dirname(os.path.abspath(out_prefix))
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
      pass
  except OSError as e:
    raise OSError(f"Cannot write the results to {folder} ({e}); give a writable output "
                  "location (--out, or the demo's --workdir).") from e


def write_results(out_prefix: str, config: ml_collections.ConfigDict, rows: list[dict],
                  columns: list[str], note: str = "") -> str:
  """Writes `<out_prefix>.json` (command, commit, machine, software, config, rows) and
  `<out_prefix>.md` (the command, the commit, machine and software, a Markdown table of `columns`,
  then `note`); returns the table."""
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  command = " ".join([os.path.basename(sys.executable)] + sys.argv)
  prov = provenance.record()
  with open(out_prefix + ".json", "w") as f:
    json.dump(dict(command=command, **prov, config=json.loads(config.to_json_best_effort()),
                   rows=rows), f, indent=2)
  table = markdown_table(rows, columns)
  with open(out_prefix + ".md", "w") as f:
    f.write(f"Command: `{command}`\n\nCommit {prov['commit']}, on {prov['machine']}; "
            f"{prov['software']}.\n\n{table}\n"
            + (f"\n{note}\n" if note else ""))
  return table


def plot_examples(title: str, outputs: dict, path: str, methods=("enhance_then_classify", "parallel"),
                  num_items: int = 8) -> None:
  """A PNG grid: one row per item, columns clean / degraded / each method's enhanced image,
  titled with the true label and each method's predicted class (images in [-1, 1])."""
  import matplotlib   # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt   # pylint: disable=g-import-not-at-top

  by_name = {r.method: r for r in outputs["results"]}
  methods = [m for m in methods if m in by_name]
  labels = outputs["labels"]
  n = min(num_items, len(by_name[methods[0]].x0) if methods else len(labels))
  columns = [("clean", outputs["clean"], labels), ("degraded", outputs["y"], None)]
  columns += [(m, by_name[m].x0, by_name[m].predictions) for m in methods]
  fig, axes = plt.subplots(n, len(columns), figsize=(1.6 * len(columns), 1.6 * n), squeeze=False)
  for j, (name, images, predicted) in enumerate(columns):
    for i in range(n):
      ax = axes[i, j]
      image = np.clip((np.asarray(images[i]) + 1) / 2, 0, 1)
      ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray", vmin=0, vmax=1)
      ax.set_xticks([]), ax.set_yticks([])
      if predicted is not None:
        ok = predicted[i] == labels[i]
        ax.set_title(f"{'label' if j == 0 else 'pred'} {predicted[i]}", fontsize=8,
                     color="black" if j == 0 or ok else "red")
      if i == 0:
        ax.set_xlabel(name, fontsize=8)
        ax.xaxis.set_label_position("top")
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
