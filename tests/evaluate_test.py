"""The results table's rows: accuracies, f(x0)'s accuracy and the paired comparison with the
reference method, on hand-made predictions; the degraded inputs every method sees; the
evaluation cache's fingerprint; the Markdown table."""
import jax
import ml_collections
import numpy as np

from cdjax import evaluate
from cdjax import parallel
from configs import default


def _result(method, predictions, classifier_predictions):
  return evaluate.MethodResult(method, np.asarray(predictions), np.asarray(classifier_predictions),
                               nfe=50, seconds_per_item=0.1, compile_seconds=2.0, x0=np.zeros(1))


def test_rows_pair_each_method_with_the_reference():
  """Reference right on 6 of 10 items, the method on 8: right on 3 the reference gets wrong,
  wrong on 1 it gets right, so +0.2 with 3 wins and 1 loss; f(x0)'s accuracy comes from the
  classifier's predictions; the reference's row has no difference."""
  labels = np.arange(10) % 3
  wrong = (labels + 1) % 3
  ref_right = np.array([1, 1, 1, 1, 1, 1, 0, 0, 0, 0], bool)
  method_right = np.array([1, 1, 1, 1, 1, 0, 1, 1, 1, 0], bool)
  ref = _result("enhance_then_classify", np.where(ref_right, labels, wrong), labels)
  method = _result("parallel", np.where(method_right, labels, wrong), wrong)
  rows = {r["method"]: r for r in evaluate.result_rows([ref, method], labels, corruption="gn30")}

  assert rows["parallel"]["accuracy"] == 0.8 and rows["enhance_then_classify"]["accuracy"] == 0.6
  assert rows["parallel"]["accuracy_f_x0"] == 0.0 and rows["enhance_then_classify"]["accuracy_f_x0"] == 1.0
  assert abs(rows["parallel"]["diff_vs_reference"] - 0.2) < 1e-12
  assert (rows["parallel"]["wins"], rows["parallel"]["losses"]) == (3, 1)
  lo, hi = (float(v) for v in rows["parallel"]["diff_ci95"].strip("[]").split(","))
  assert -0.25 < lo < 0.2 < hi < 0.65           # 4 discordant items of 10: wide, around +0.2
  assert "diff_vs_reference" not in rows["enhance_then_classify"]
  assert rows["parallel"]["corruption"] == "gn30" and rows["parallel"]["nfe"] == 50
  lo95, hi95 = rows["parallel"]["ci95_lo"], rows["parallel"]["ci95_hi"]
  assert lo95 < 0.8 < hi95 and abs(rows["parallel"]["ci95"] - (hi95 - lo95) / 2) < 1e-12


def test_degrade_draws_each_chunk_with_its_own_key(monkeypatch):
  """Chunk c of the items (here 2 a chunk: items 0-1, 2-3, 4) is corrupted with key
  fold_in(key, c), so an item's noise depends on its index alone and chunks get different noise."""
  monkeypatch.setattr(evaluate, "DEGRADE_CHUNK", 2)
  corruption = lambda key, x: x + jax.random.randint(key, x.shape, 0, 1000)
  clean, key = np.zeros((5, 3), np.int32), jax.random.PRNGKey(4)
  noise = evaluate.degrade(corruption, key, clean)
  expected = [corruption(jax.random.fold_in(key, c), clean[s:s + 2])
              for c, s in enumerate((0, 2, 4))]
  np.testing.assert_array_equal(noise, np.concatenate(expected))
  assert (noise[0:2] != noise[2:4]).any()


def test_fingerprint_changes_with_every_input_it_names():
  """The cache file's digest: equal for equal inputs, different when any one of the sampling
  config, model config, parameter values or names, inputs, key, batch size or the sampler's
  compiler options changes."""
  mesh = parallel.make_mesh(default.get_config())
  base = dict(cfg=ml_collections.ConfigDict({"strategy": "parallel"}), model_config=None,
              params={"w": np.ones(3, np.float32)}, y=np.zeros((4, 2), np.float32),
              key=jax.random.PRNGKey(0), batch_size=8, mesh=mesh)
  digest = lambda **kw: evaluate._fingerprint(**dict(base, **kw))
  assert digest() == digest(params={"w": np.ones(3, np.float32)}, key=jax.random.PRNGKey(0))
  changed = [digest(cfg=ml_collections.ConfigDict({"strategy": "card"})),
             digest(model_config=ml_collections.ConfigDict({"N": 5})),
             digest(params={"w": np.array([1, 1, 2], np.float32)}),
             digest(params={"v": np.ones(3, np.float32)}),
             digest(y=np.eye(4, 2, dtype=np.float32)),
             digest(key=jax.random.PRNGKey(1)),
             digest(batch_size=16),
             digest(compiler_options={"xla_cpu_use_thunk_runtime": False})]
  assert len(set(changed + [digest()])) == len(changed) + 1


def test_markdown_table_formats_floats_to_4_significant_digits():
  """Floats to 4 significant digits whatever their size, other values as str, None and missing
  columns empty."""
  rows = [dict(method="parallel", ci95=0.0123456, seconds=1234.56, nfe=50),
          dict(method="card", ci95=None)]
  assert evaluate.markdown_table(rows, ["method", "ci95", "seconds", "nfe"]).split("\n") == [
      "| method | ci95 | seconds | nfe |", "|---|---|---|---|",
      "| parallel | 0.01235 | 1235 | 50 |", "| card |  |  |  |"]
