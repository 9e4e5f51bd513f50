"""Evaluate coupled strategies and baselines on a labelled test set.

Every method sees the same degraded inputs (the corruption key is fixed per chunk of items), so
differences between methods are paired. Compile time is measured apart from steady-state time.
"""
import dataclasses
import time

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from cdjax import coupled
from cdjax import metrics

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


def run_method(name: str, model: coupled.CoupledModel, cfg: ml_collections.ConfigDict, params,
               classifier_params, y: np.ndarray, key, batch_size: int) -> MethodResult:
  """Runs one sampling config over y [N, ...] in batches (batch b uses fold_in(key, b))."""
  fn = jax.jit(coupled.get_coupled_fn(model, cfg))
  n = len(y)
  pad = -n % batch_size
  y_padded = np.concatenate([y, np.repeat(y[-1:], pad, 0)]) if pad else y
  start = time.perf_counter()
  compiled = fn.lower(params, classifier_params, key, y_padded[:batch_size]).compile()
  compile_seconds = time.perf_counter() - start
  preds, clf_preds, first_x0, nfe = [], [], None, 0
  start = time.perf_counter()
  for b in tqdm(range(len(y_padded) // batch_size), desc=name, leave=False):
    out = compiled(params, classifier_params, jax.random.fold_in(key, b),
                   y_padded[b * batch_size:(b + 1) * batch_size])
    preds.append(np.asarray(out.logits.argmax(-1)))
    clf_preds.append(np.asarray(out.classifier_logits.argmax(-1)))
    if first_x0 is None:
      first_x0, nfe = np.asarray(out.x0), int(out.nfe)
  seconds = time.perf_counter() - start
  return MethodResult(name, np.concatenate(preds)[:n], np.concatenate(clf_preds)[:n], nfe,
                      seconds / n, compile_seconds, first_x0)


def result_rows(results: list[MethodResult], labels: np.ndarray, reference: str = "enhance_then_classify",
                **extra) -> list[dict]:
  """One row per method: accuracy with its 95% CI, the accuracy of f(x0), and the paired
  difference to `reference` (bootstrap 95% CI, wins / losses) where that method was run."""
  ref = {r.method: r for r in results}.get(reference)
  rows = []
  for r in results:
    correct = r.predictions == labels
    acc, ci = metrics.accuracy_ci(correct)
    row = dict(extra, method=r.method, accuracy=acc, ci95=ci,
               accuracy_f_x0=float(np.mean(r.classifier_predictions == labels)),
               nfe=r.nfe, seconds_per_item=r.seconds_per_item, compile_seconds=r.compile_seconds)
    if ref is not None and r is not ref:
      diff = metrics.paired_difference(correct, ref.predictions == labels)
      row.update(diff_vs_reference=diff["diff"], diff_ci95=diff["ci95"],
                 wins=diff["wins"], losses=diff["losses"])
    rows.append(row)
  return rows


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  """A Markdown table of `columns` from rows (floats to 4 significant digits)."""
  fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(row.get(c)) for c in columns) + " |" for row in rows]
  return "\n".join(lines)
