"""Coupled strategies on a toy with analytic scores: two Gaussian classes and a linear classifier."""
import dataclasses
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cdjax import coupled
from cdjax import evaluate
from cdjax import guidance
from cdjax import parallel
from cdjax import sde as sde_lib
from configs import default

D, MU, S, SIGMA_Y, TAU = 2, jnp.array([1.0, 0.0]), 0.5, 1.0, 0.3
W = 2 * MU / S**2   # Bayes-optimal logit difference on clean data: w . x


def classifier(params, x):
  """f(x) = [-w.x / 2, w.x / 2]: a linear two-class classifier [B, 2]."""
  z = x @ W
  return jnp.stack([-z / 2, z / 2], -1)


def _mixture_score(x, means, var, log_weights):
  """Score of sum_c exp(log_w_c) N(means_c, var I) at x [B, D]; means [B, C, D]."""
  log_p = log_weights - jnp.sum((x[:, None] - means) ** 2, -1) / (2 * var[:, None])
  r = jax.nn.softmax(log_p, -1)
  return jnp.sum(r[..., None] * -(x[:, None] - means), 1) / var[:, None]


def make_model(n_steps=50):
  sde = sde_lib.get_sde("vp_discrete", N=n_steps)
  class_means = jnp.stack([-MU, MU])   # class 0 at -mu, class 1 at +mu

  def signal_net(params, x, t, y, logits):
    """eps of the exact posterior p(x0 | y, class prior softmax(logits)), diffused to t."""
    v = 1 / (1 / S**2 + 1 / SIGMA_Y**2)
    m = v * (class_means[None] / S**2 + y[:, None] / SIGMA_Y**2)            # [B, 2, D]
    log_w = jax.nn.log_softmax(logits, -1) - jnp.sum((y[:, None] - class_means) ** 2, -1) / (
        2 * (S**2 + SIGMA_Y**2))
    a, std = sde.coeffs(t)
    score = _mixture_score(x, a[:, None, None] * m, a**2 * v + std**2, log_w)
    return -sde_lib.bcast(std, x) * score

  def logits_net(params, l, t, cond_logits, cond_signal):
    """eps of l0 ~ N(f(c), TAU^2 I) diffused to t."""
    a, std = sde.coeffs(t)
    var = a**2 * TAU**2 + std**2
    score = -(l - a[:, None] * cond_logits) / var[:, None]
    return -std[:, None] * score

  return coupled.CoupledModel(sde, sde, signal_net, logits_net, classifier, num_classes=2,
                              signal_x0_range=None, logits_std=0.0)


def sampling_config(**overrides):
  cfg = default.get_config().sampling
  cfg.update(dict(signal_predictor="ancestral", logits_predictor="posterior_mean"))
  cfg.update(overrides)
  return cfg


def toy_data(n, key):
  k_c, k_x, k_y = jax.random.split(key, 3)
  c = jax.random.bernoulli(k_c, 0.5, (n,)).astype(jnp.int32)
  x0 = (2 * c[:, None] - 1) * MU + S * jax.random.normal(k_x, (n, D))
  return c, x0 + SIGMA_Y * jax.random.normal(k_y, (n, D))


def run(model, cfg, y, key=0):
  fn = jax.jit(coupled.get_coupled_fn(model, cfg))
  return fn({"signal": {}, "logits": {}}, {}, jax.random.PRNGKey(key), y)


def test_coupled_beats_enhance_then_classify_on_the_toy():
  labels, y = toy_data(4000, jax.random.PRNGKey(0))
  model = make_model()
  acc = lambda out: float(jnp.mean(out.logits.argmax(-1) == labels))
  enhance = acc(run(model, sampling_config(strategy="enhance_then_classify"), y))
  noisy = acc(run(model, sampling_config(strategy="noisy"), y))
  bayes = float(jnp.mean((classifier(None, y).argmax(-1)) == labels))   # MAP from y (symmetric)
  par = acc(run(model, sampling_config(strategy="parallel", switch_t=1.0), y))
  alt = acc(run(model, sampling_config(strategy="alternating", rounds=3), y))
  # One posterior sample classifies by probability matching (about 0.75 here); Parallel's logit
  # branch reads the early, mean-like x0_hat and steers the signal to that class, which
  # approaches the MAP decision (0.81). Alternating is a Gibbs-like chain: no worse, little gain.
  assert par > enhance + 0.04, (noisy, enhance, par, bayes)
  assert par <= bayes + 0.02
  assert alt >= enhance - 0.01, (enhance, alt)


def test_micro_batches_are_the_batch_run_in_chunks():
  """micro_batch=2 on 6 items: chunk i holds items i, i + 3 and runs with key fold_in(key, i);
  its x0, logits and f(x0) go back to those items."""
  _, y = toy_data(6, jax.random.PRNGKey(1))
  model = make_model(10)
  cfg = sampling_config(strategy="parallel")
  out = jax.jit(coupled.get_coupled_fn(model, sampling_config(strategy="parallel", micro_batch=2)))(
      {"signal": {}, "logits": {}}, {}, jax.random.PRNGKey(3), y)
  assert out.x0.shape == y.shape and int(out.nfe) == 20
  fn = jax.jit(coupled.get_coupled_fn(model, cfg))
  for i in range(3):
    chunk = fn({"signal": {}, "logits": {}}, {}, jax.random.fold_in(jax.random.PRNGKey(3), i),
               y[i::3])
    np.testing.assert_allclose(out.x0[i::3], chunk.x0, atol=1e-6)
    np.testing.assert_allclose(out.logits[i::3], chunk.logits, atol=1e-6)
    np.testing.assert_allclose(out.classifier_logits[i::3], chunk.classifier_logits, atol=1e-6)
  np.testing.assert_allclose(out.classifier_logits, classifier(None, out.x0), atol=1e-6)   # f(x0)
  with pytest.raises(ValueError, match="micro_batch=4 must divide the batch size 6"):
    run(model, sampling_config(strategy="parallel", micro_batch=4), y)


def test_alternating_k1_equals_enhance_then_classify():
  _, y = toy_data(64, jax.random.PRNGKey(1))
  model = make_model(20)
  alt = run(model, sampling_config(strategy="alternating", rounds=1), y, key=3)
  ref = run(model, sampling_config(strategy="enhance_then_classify"), y, key=3)
  np.testing.assert_array_equal(alt.x0, ref.x0)
  np.testing.assert_array_equal(alt.classifier_logits, ref.logits)
  assert int(alt.nfe) == 40 and int(ref.nfe) == 20


def test_parallel_without_switch_runs_cards_logit_steps(monkeypatch):
  """With switch_t = 0 Parallel's logit branch sees y throughout, as `card`'s does: with every
  Gaussian draw zeroed (so the two strategies' different keys cannot matter) the final logits are
  equal; with a switch they differ (the logits then see f(x0_hat)). Likewise the signal branch
  of signal_first Parallel."""
  monkeypatch.setattr(sde_lib, "normal",
                      lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
  _, y = toy_data(32, jax.random.PRNGKey(4))
  model = make_model(20)
  card = run(model, sampling_config(strategy="card"), y)
  no_switch = run(model, sampling_config(strategy="parallel", switch_t=0.0), y, key=1)
  np.testing.assert_array_equal(no_switch.logits, card.logits)
  switched = run(model, sampling_config(strategy="parallel", switch_t=0.5), y, key=1)
  assert np.abs(np.asarray(switched.logits - card.logits)).max() > 1e-3
  # signal_first (speech): before the switch the signal steps see f(y), not the logit branch
  # (here a logit net far off, whose l0_hat is not f(y)), so without a switch the signal is one
  # trajectory conditioned on f(y): Alternating K=1's first run from f(y).
  off = coupled.CoupledModel(**{**model.__dict__,
                                "logits_net": lambda p, l, t, cl, cs: jnp.full_like(l, 1.5)})
  speech = dict(initial_logits="classifier", switch_t=0.0)
  on_f_y = run(off, sampling_config(strategy="alternating", rounds=1, **speech), y)
  signal_first = run(off, sampling_config(strategy="parallel", parallel_order="signal_first",
                                          **speech), y, key=1)
  np.testing.assert_allclose(signal_first.x0, on_f_y.x0, atol=1e-6)
  switched = run(off, sampling_config(strategy="parallel", parallel_order="signal_first",
                                      initial_logits="classifier", switch_t=0.5), y, key=1)
  assert np.abs(np.asarray(switched.x0 - on_f_y.x0)).max() > 1e-3


@pytest.mark.parametrize("strategy", ["parallel", "alternating", "nested", "card", "enhance_then_classify"])
def test_strategies_are_deterministic_and_trace_networks_a_bounded_number_of_times(strategy):
  _, y = toy_data(16, jax.random.PRNGKey(2))
  counts = {}
  for n_steps in (10, 30):
    base = make_model(n_steps)
    traces = {"signal": 0, "logits": 0}

    def counted(name, fn):
      def wrapper(*args):
        traces[name] += 1
        return fn(*args)
      return wrapper

    model = coupled.CoupledModel(**{**base.__dict__, "signal_net": counted("signal", base.signal_net),
                                    "logits_net": counted("logits", base.logits_net)})
    cfg = sampling_config(strategy=strategy, rounds=2, nested_steps=(7, 3))
    a, b = run(model, cfg, y, key=5), run(model, cfg, y, key=5)
    np.testing.assert_array_equal(a.x0, b.x0)
    np.testing.assert_array_equal(a.logits, b.logits)
    counts[n_steps] = dict(traces)
    assert all(v <= 4 for v in traces.values()), traces
  assert counts[10] == counts[30]


def test_nfe_counts():
  _, y = toy_data(4, jax.random.PRNGKey(2))
  model = make_model(20)
  nfe = lambda **kw: int(run(model, sampling_config(**kw), y).nfe)
  assert nfe(strategy="noisy") == 0
  assert nfe(strategy="parallel") == 40
  assert nfe(strategy="alternating", rounds=5) == 200
  assert nfe(strategy="alternating", rounds=5, skip_last_logits=True) == 180
  assert nfe(strategy="nested", nested_steps=(19, 7, 3, 3)) == 4 * 20 + 20   # repeats count once
  with pytest.raises(ValueError, match=r"nested_steps \[39.0, 2.5\] are not steps"):
    nfe(strategy="nested", nested_steps=(39, 19, 2.5))
  assert nfe(strategy="nested", nested_steps=(7, 3), final_signal_run=True) == 4 * 20 + 20
  assert nfe(strategy="parallel", num_samples=3) == 120
  # The corrector runs on both branches, as in the official speech sampler.
  assert nfe(strategy="parallel", corrector="langevin") == 80
  assert nfe(strategy="enhance_then_classify", corrector="langevin") == 40
  assert nfe(strategy="parallel", corrector="langevin", logits_corrector="none") == 60


def test_logits_corrector_switch():
  """The logit branch alone (card): its corrector follows `corrector` by default; with
  logits_corrector "none" it runs as with no corrector at all, whatever the signal's."""
  _, y = toy_data(8, jax.random.PRNGKey(3))
  model = make_model(10)
  card = lambda **kw: run(model, sampling_config(strategy="card", **kw), y).logits
  plain = card()
  np.testing.assert_array_equal(card(corrector="langevin", logits_corrector="none"), plain)
  np.testing.assert_array_equal(card(logits_corrector="langevin"),
                                card(corrector="langevin"))
  assert not np.allclose(card(corrector="langevin"), plain, atol=1e-3)


def test_guidance_scale_zero_never_calls_guidance(monkeypatch):
  _, y = toy_data(32, jax.random.PRNGKey(4))
  model = make_model(20)
  cfg = sampling_config(strategy="parallel")
  unguided = run(model, cfg, y)

  def boom(*args, **kwargs):
    raise AssertionError("guidance evaluated at scale 0")
  monkeypatch.setattr(guidance, "signal_guidance", boom)
  monkeypatch.setattr(guidance, "logits_guidance", boom)
  np.testing.assert_array_equal(run(model, cfg, y).x0, unguided.x0)


def test_signal_guidance_moves_toward_the_believed_class():
  labels, y = toy_data(512, jax.random.PRNGKey(5))
  model = make_model(20)
  cfg = sampling_config(strategy="parallel")

  def confidence(out):   # mean log p_f(c* | x0), c* the logit branch's class
    log_p = jax.nn.log_softmax(out.classifier_logits, -1)
    return float(jnp.mean(jnp.take_along_axis(log_p, out.logits.argmax(-1)[:, None], -1)))

  plain = run(model, cfg, y)
  cfg.guidance.signal_scale = 2.0
  guided = run(model, cfg, y)
  assert -confidence(guided) < 0.75 * -confidence(plain)   # measured: 0.0070 vs 0.0118
  # The gradient term itself: ascent on log p(c | x) for the weighted class.
  x0 = jnp.zeros((1, D))
  g = guidance.signal_guidance(lambda x: classifier(None, x), x0, jnp.array([[0.0, 10.0]]), 1.0, 1.0)
  np.testing.assert_allclose(g @ MU, [0.5 * float(W @ MU)], rtol=1e-4)   # at x=0, p=1/2: grad = w/2


def test_signal_guidance_ascends_on_complex_signals():
  """Speech x0_hat is complex: the guidance is (d/dRe + i d/dIm) / 2 of log p(c | x) (jax.grad
  gives twice its conjugate), the complex SDEs' score convention, so a small step along it raises
  log p(c | x) in both parts."""
  a, b = jnp.array([1.0, -2.0, 0.5]), jnp.array([0.5, 1.5, -1.0])
  classify = lambda x: jnp.stack([jnp.zeros(x.shape[0]), x.real @ a + x.imag @ b], -1)
  x0 = jnp.zeros((1, 3), jnp.complex64)
  g = guidance.signal_guidance(classify, x0, jnp.array([[0.0, 10.0]]), 1.0, 1.0)
  w1 = jax.nn.softmax(jnp.array([0.0, 10.0]))[1]   # the class weights: grad = (w1 - p1) (a + ib)
  np.testing.assert_allclose(g[0], (w1 - 0.5) * (a + 1j * b) / 2, rtol=1e-5)
  log_p1 = lambda x: float(jax.nn.log_softmax(classify(x))[0, 1])
  assert log_p1(x0 + 0.1 * g) > log_p1(x0) + 0.05


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
def test_signal_guidance_weights_classes_by_the_tempered_logits(temperature):
  """Closed form on the linear toy: grad_x sum_c w_c log p(c | x) = (w_1 - sigmoid(w.x)) w with
  w = softmax(l0_hat / tau); here w_1 = sigmoid(1 / tau): 0.881, 0.731, 0.562."""
  x0 = jnp.stack([jnp.zeros(D), 0.1 * MU])
  l0_hat = jnp.array([[0.0, 1.0], [1.0, 0.0]])
  g = guidance.signal_guidance(lambda x: classifier(None, x), x0, l0_hat, 2.0, temperature)
  w1 = jax.nn.sigmoid(jnp.array([1.0, -1.0]) / temperature)
  expected = 2.0 * (w1 - jax.nn.sigmoid(x0 @ W))[:, None] * W
  np.testing.assert_allclose(g, expected, rtol=1e-5, atol=1e-6)


def test_guided_scores_follow_the_guide_not_the_conditioning():
  """A branch's guided score is its net's score plus the guidance term evaluated on the guide,
  which Parallel passes apart from the conditioning (signal_first before the switch: signal on
  f(y), guided by l0_hat; logits on y, guided by x0_hat): the signal's s_x (w_1 - sigmoid(w.x0_hat))
  w with w_1 = sigmoid(guide logit difference / tau), and the logits' s_l (f(guide) - l0_hat) with
  f on the logit scale, x0_hat and l0_hat the Tweedie estimates of the unguided scores."""
  _, y = toy_data(4, jax.random.PRNGKey(3))
  model = dataclasses.replace(make_model(10), logits_std=0.8)
  branches = {}
  for s_x, s_l in ((0.0, 0.0), (2.0, 0.5)):
    cfg = sampling_config(strategy="parallel")
    cfg.guidance.update(signal_scale=s_x, logits_scale=s_l, temperature=0.5)
    branches[s_x] = coupled._Branches(model, cfg, {"signal": {}, "logits": {}}, {}, y)
  t = jnp.full((4,), 5.0)
  a, std = (np.asarray(v)[:, None] for v in model.signal_sde.coeffs(t))
  # Signal: conditioned on zero logits, guided toward class 1 (logit difference 1, tau 0.5).
  x = jax.random.normal(jax.random.PRNGKey(4), (4, D))
  cond, guide = jnp.zeros((4, 2)), jnp.tile(jnp.array([[0.0, 1.0]]), (4, 1))
  plain, guided = (b.signal_score_fn(cond, guide)(x, t) for b in branches.values())
  x0_hat = (x + std**2 * plain) / a
  expected = 2.0 * (jax.nn.sigmoid(2.0) - jax.nn.sigmoid(x0_hat @ W))[:, None] * W
  np.testing.assert_allclose(guided - plain, expected, rtol=1e-4, atol=1e-6)
  # Logits: conditioned on y and f(y), guided by -y (whose classifier logits are f(y)'s reversed).
  st = lambda v: coupled.standardize_logits(v, 0.8)   # the model's logits_std
  l = jax.random.normal(jax.random.PRNGKey(5), (4, 2))
  plain, guided = (b.logits_score_fn(y, st(classifier(None, y)), -y)(l, t)
                   for b in branches.values())
  l0_hat = (l + std**2 * plain) / a
  np.testing.assert_allclose(guided - plain, 0.5 * (st(classifier(None, -y)) - l0_hat), rtol=1e-4,
                             atol=1e-5)


def test_logits_guidance_pulls_the_logits_toward_the_classifier():
  """The term is s_l (f(x0_hat) - l0_hat); on card (guided toward f(y)), with ancestral logit
  steps so that the logits keep their spread about f(y), a positive scale ends closer to f(y)
  than no guidance, and a larger one closer still."""
  l0, f = jnp.array([[0.5, -1.0]]), jnp.array([[2.0, 1.0]])
  np.testing.assert_allclose(guidance.logits_guidance(l0, f, 0.5), [[0.75, 1.0]], rtol=1e-6)
  _, y = toy_data(64, jax.random.PRNGKey(9))
  model = make_model(10)
  cfg = sampling_config(strategy="card", logits_predictor="ancestral")

  def distance(scale):   # mean |l0 - f(y)| of the final logits
    cfg.guidance.logits_scale = scale
    out = run(model, cfg, y, key=2)
    return float(jnp.mean(jnp.abs(out.logits - out.classifier_logits)))
  d0, d1, d4 = distance(0.0), distance(1.0), distance(4.0)
  assert d1 < 0.95 * d0 and d4 < 0.8 * d1, (d0, d1, d4)   # measured: 0.166, 0.147, 0.107


def test_clear_errors():
  _, y = toy_data(4, jax.random.PRNGKey(0))
  model = make_model(10)
  with pytest.raises(KeyError, match="Known: alternating, card, enhance_then_classify, nested, noisy, parallel"):
    run(model, sampling_config(strategy="paralel"), y)
  with pytest.raises(ValueError, match="cond_source"):
    run(model, sampling_config(strategy="parallel", cond_source="x0"), y)
  with pytest.raises(ValueError, match="equal step counts"):
    unequal = coupled.CoupledModel(**{**model.__dict__, "logits_sde": sde_lib.get_sde("vp_discrete", N=20)})
    run(unequal, sampling_config(strategy="parallel"), y)
  # The inputs: floats of the model's input shape, and both branches' parameters.
  shaped = coupled.CoupledModel(**{**model.__dict__, "input_shape": (2,)})
  assert run(shaped, sampling_config(strategy="parallel"), y).x0.shape == y.shape
  with pytest.raises(ValueError, match=r"y has shape \(4, 3\); this model takes \[B, 2\]"):
    run(shaped, sampling_config(strategy="parallel"), jnp.zeros((4, 3)))
  with pytest.raises(TypeError, match="y has dtype uint8; give floats"):
    run(model, sampling_config(strategy="parallel"), y.astype(jnp.uint8))
  fn = jax.jit(coupled.get_coupled_fn(model, sampling_config(strategy="parallel")))
  with pytest.raises(KeyError, match=r"params lacks \['logits'\]"):
    fn({"signal": {}}, {}, jax.random.PRNGKey(0), y)


def test_reverting_branches_start_at_the_observation_and_its_logits(monkeypatch):
  """With OUVE on both branches (speech), x_T = y + std(T) z and l_T = f(y) + std(T) z, f(y) on the
  logit scale (the logit SDE reverts to its conditioning): with z zeroed exactly y and f(y)."""
  monkeypatch.setattr(sde_lib, "normal",
                      lambda key, shape, dtype=jnp.float32: jnp.zeros(shape, dtype))
  _, y = toy_data(4, jax.random.PRNGKey(2))
  ouve = sde_lib.get_sde("ouve", N=10)
  model = dataclasses.replace(make_model(10), signal_sde=ouve, logits_sde=ouve, logits_std=0.8)
  b = coupled._Branches(model, sampling_config(), {"signal": {}, "logits": {}}, {}, y)
  np.testing.assert_array_equal(b.signal_init(jax.random.PRNGKey(0)), y)
  np.testing.assert_allclose(b.logits_init(jax.random.PRNGKey(0)),
                             coupled.standardize_logits(classifier(None, y), 0.8), atol=1e-6)


def test_model_from_config_takes_each_sections_settings():
  """Each CoupledModel field comes from its own config section: the SDEs with their kwargs, the
  parameterizations, the x0 clip (None: none), the logit std and, for images only, y's shape."""
  config = default.get_config()
  config.signal.update(sde="ouve", parameterization="neg_score", x0_clip=None)
  config.signal.sde_kwargs = ml_collections.ConfigDict(dict(N=7, theta=2.0))
  config.logits.sde_kwargs = ml_collections.ConfigDict(dict(N=5, schedule="linear"))
  config.logits.standardize_std, config.data.num_classes, config.data.shape = 0.5, 3, (8, 6, 2)
  model = coupled.model_from_config(config)
  assert model.signal_sde == sde_lib.get_sde("ouve", N=7, theta=2.0)
  assert model.logits_sde == sde_lib.get_sde("vp_discrete", N=5, schedule="linear")
  assert (model.signal_parameterization, model.logits_parameterization) == ("neg_score", "eps")
  assert (model.signal_x0_range, model.logits_std, model.num_classes) == (None, 0.5, 3)
  assert model.input_shape == (8, 6, 2)
  config.signal.x0_clip, config.data.modality = (-2.0, 3.0), "audio"
  model = coupled.model_from_config(config)
  assert (model.signal_x0_range, model.input_shape) == ((-2.0, 3.0), None)


def test_alternating_skip_last_logits_reports_the_previous_rounds_logits():
  """Speech's Alternating ends on a signal run: its logits are the round before's logit
  trajectory (K = 1: the initial logits f(y)), as the official code returns them."""
  _, y = toy_data(16, jax.random.PRNGKey(1))
  model = make_model(10)
  alt = lambda **kw: run(model, sampling_config(strategy="alternating", initial_logits="classifier",
                                                **kw), y, key=3)
  np.testing.assert_array_equal(alt(rounds=2, skip_last_logits=True).logits,
                                alt(rounds=1).logits)
  np.testing.assert_allclose(alt(rounds=1, skip_last_logits=True).logits, classifier(None, y),
                             rtol=1e-6)


def test_alternating_conditions_each_round_on_the_previous_rounds_logits():
  """Round r's signal run, key fold_in(fold_in(key, r), 0), is conditioned on round r - 1's
  final logits (round one: the initial logits, zeros), not on the initial logits again."""
  _, y = toy_data(16, jax.random.PRNGKey(1))
  model = make_model(10)
  cfg = sampling_config(strategy="alternating", rounds=2, return_trajectory=True)
  x0s, l0s = run(model, cfg, y, key=3).trajectory
  b = coupled._Branches(model, cfg, {"signal": {}, "logits": {}}, {}, y)
  signal_run = jax.jit(lambda r, logits: b.signal_trajectory(
      jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), r), 0), logits))
  np.testing.assert_allclose(x0s[0], signal_run(0, b.zero_logits), atol=1e-6)
  np.testing.assert_allclose(x0s[1], signal_run(1, l0s[0]), atol=1e-6)
  assert np.abs(np.asarray(x0s[1] - signal_run(1, b.zero_logits))).max() > 0.1


def test_nested_without_refreshes_is_alternating_k1_or_card():
  """No re-runs: Nested's first signal run and its logit trajectory are Alternating K=1's (same
  keys); without the first run its logit trajectory sees y and f(y) throughout: card's."""
  _, y = toy_data(16, jax.random.PRNGKey(1))
  model = make_model(10)
  nested = lambda **kw: run(model, sampling_config(strategy="nested", nested_steps=(), **kw), y, key=3)
  alt = run(model, sampling_config(strategy="alternating", rounds=1), y, key=3)
  first = nested()
  np.testing.assert_array_equal(first.x0, alt.x0)
  np.testing.assert_array_equal(first.logits, alt.logits)
  assert int(first.nfe) == int(alt.nfe) == 20
  no_first = nested(nested_first_signal_run=False)
  k_logits = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 0), 1)
  card = jax.jit(coupled.get_coupled_fn(model, sampling_config(strategy="card")))(
      {"signal": {}, "logits": {}}, {}, k_logits, y)
  np.testing.assert_array_equal(no_first.logits, card.logits)
  np.testing.assert_array_equal(no_first.x0, y)
  assert int(no_first.nfe) == 10


@pytest.mark.parametrize("first_run", [True, False])
def test_nested_refreshes_the_signal_before_its_logit_step(first_run):
  """A re-run listed at step j (time 9 - j here) conditions logit step j onward: the l0_hat
  trajectory equals the run without it before step j and differs from step j on; a re-run before
  the last step still changes the final logits (the official order: signal run, then the step)."""
  _, y = toy_data(16, jax.random.PRNGKey(1))
  model = make_model(10)

  def nested(steps):
    cfg = sampling_config(strategy="nested", nested_steps=steps, nested_first_signal_run=first_run,
                          final_signal_run=True, return_trajectory=True)
    return run(model, cfg, y, key=3)
  plain = nested(())
  for j in (4, 9):
    out = nested((9 - j,))
    np.testing.assert_array_equal(out.trajectory[:j], plain.trajectory[:j])
    assert np.abs(np.asarray(out.trajectory[j] - plain.trajectory[j])).max() > 1e-3
    assert int(out.nfe) == int(plain.nfe) + 10


def test_nested_reruns_the_signal_on_the_current_logit_estimate():
  """A re-run at time 5 (before logit step 4) is a signal run with key fold_in(k_refresh, 4),
  k_refresh = fold_in(fold_in(key, 0), 2), conditioned on step 3's l0_hat, not the initial logits."""
  _, y = toy_data(16, jax.random.PRNGKey(1))
  model = make_model(10)
  cfg = sampling_config(strategy="nested", nested_steps=(5,), final_signal_run=False,
                        return_trajectory=True)
  out = run(model, cfg, y, key=3)
  b = coupled._Branches(model, cfg, {"signal": {}, "logits": {}}, {}, y)
  k_refresh = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(3), 0), 2)
  signal_run = jax.jit(lambda logits: b.signal_trajectory(jax.random.fold_in(k_refresh, 4), logits))
  np.testing.assert_allclose(out.x0, signal_run(out.trajectory[3]), atol=1e-6)
  assert np.abs(np.asarray(out.x0 - signal_run(b.zero_logits))).max() > 0.1


def test_num_samples_vote_and_return_the_first_samples_trajectory():
  """Sample i runs with key split(key, n)[i]; the logits are the majority vote of their classes
  plus 1e-3 softmax(mean logits), which breaks ties (n = 2: items whose samples disagree) and
  never outweighs a vote; x0, f(x0) and the trajectory are the first sample's."""
  _, y = toy_data(64, jax.random.PRNGKey(1))
  model = make_model(10)
  for strategy, n in (("parallel", 2), ("nested", 3)):
    cfg = sampling_config(strategy=strategy, nested_steps=(3,), return_trajectory=True)
    fn = jax.jit(coupled.get_coupled_fn(model, cfg))
    singles = [fn({"signal": {}, "logits": {}}, {}, k, y)
               for k in jax.random.split(jax.random.PRNGKey(0), n)]
    cfg.num_samples = n
    many = run(model, cfg, y)
    jax.tree.map(np.testing.assert_array_equal, (many.x0, many.trajectory),
                 (singles[0].x0, singles[0].trajectory))
    np.testing.assert_array_equal(many.classifier_logits, singles[0].classifier_logits)
    np.testing.assert_allclose(many.classifier_logits, classifier(None, many.x0), atol=1e-6)
    votes = sum(jax.nn.one_hot(o.logits.argmax(-1), 2) for o in singles)
    mean = sum(o.logits for o in singles) / n
    np.testing.assert_allclose(many.logits, votes + 1e-3 * jax.nn.softmax(mean, -1), atol=1e-7)
    tie = np.asarray(votes[:, 0] == votes[:, 1])   # ties go to the higher mean logit
    assert tie.any() == (n == 2)
    np.testing.assert_array_equal(many.logits.argmax(-1),
                                  np.where(tie, mean.argmax(-1), votes.argmax(-1)))
    assert len({tuple(np.asarray(o.logits.argmax(-1))) for o in singles}) > 1   # they disagree


@pytest.mark.parametrize("strategy", ["parallel", "alternating", "nested"])
def test_strategies_clip_x0_and_restandardise_logits(strategy):
  """With the model's x0 range and logit std (images: [-1, 1] and 0.8), every step's estimates go
  through them, so the final posterior-mean steps land on a clipped x0 and logits of std 0.8."""
  _, y = toy_data(16, jax.random.PRNGKey(7))
  model = dataclasses.replace(make_model(10), signal_x0_range=(-0.5, 0.5), logits_std=0.8)
  out = run(model, sampling_config(strategy=strategy, rounds=2, nested_steps=(3,)), y)
  assert float(jnp.abs(out.x0).max()) == 0.5   # the toy's x0 spreads beyond 0.5
  np.testing.assert_allclose(out.logits.mean(-1), 0.0, atol=1e-6)
  np.testing.assert_allclose(out.logits.std(-1), 0.8, rtol=1e-5)


def test_classifier_logits_reach_the_logit_branch_standardised():
  """With logits_std 0.8, f(y) goes through `standardize_logits` before it is the noisy
  baseline's logits and card's conditioning (the logit net saw std-0.8 logits in training): the
  logits noisy returns and every one the logit net receives equal standardize_logits(f(y), 0.8)."""
  _, y = toy_data(8, jax.random.PRNGKey(7))
  base = dataclasses.replace(make_model(3), logits_std=0.8)
  seen = []

  def logits_net(params, l, t, cond_logits, cond_signal):
    jax.debug.callback(lambda c: seen.append(np.asarray(c)), cond_logits)
    return base.logits_net(params, l, t, cond_logits, cond_signal)
  model = dataclasses.replace(base, logits_net=logits_net)
  expected = coupled.standardize_logits(classifier(None, y), 0.8)
  np.testing.assert_allclose(run(model, sampling_config(strategy="noisy"), y).logits, expected,
                             atol=1e-6)
  run(model, sampling_config(strategy="card"), y)
  assert len(seen) == 3
  for cond_logits in seen:
    np.testing.assert_allclose(cond_logits, expected, atol=1e-6)
  assert np.abs(np.asarray(classifier(None, y).std(-1)) - 0.8).min() > 0.05   # raw f(y) is not


def test_parallel_trajectory_spans_both_sides_of_the_switch():
  _, y = toy_data(8, jax.random.PRNGKey(6))
  out = run(make_model(10), sampling_config(strategy="parallel", switch_t=0.3, return_trajectory=True), y)
  x0_traj, l0_traj = out.trajectory
  assert x0_traj.shape == (10, 8, D) and l0_traj.shape == (10, 8, 2)
  np.testing.assert_allclose(x0_traj[-1], out.x0, rtol=1e-5, atol=1e-6)   # last step lands on x0_hat


def test_noisy_conditioning_is_the_same_in_either_order():
  """cond_source='noisy': each branch sees the other's state x_t / l_t at the current step, so
  with no guidance the two orders compute the same trajectory; with 'clean' they differ."""
  _, y = toy_data(8, jax.random.PRNGKey(8))
  model = make_model(10)
  out = {(src, order): run(model, sampling_config(strategy="parallel", switch_t=0.3, cond_source=src,
                                                  parallel_order=order), y, key=3)
         for src in ("noisy", "clean") for order in ("logits_first", "signal_first")}
  for field in ("x0", "logits"):
    np.testing.assert_array_equal(getattr(out["noisy", "logits_first"], field),
                                  getattr(out["noisy", "signal_first"], field))
  assert np.abs(np.asarray(out["clean", "logits_first"].logits
                           - out["clean", "signal_first"].logits)).max() > 0.1   # measured 0.44


@pytest.mark.parametrize("order", ["logits_first", "signal_first"])
def test_parallel_signal_steps_see_the_logit_estimate_their_order_gives(order):
  """The logits each signal step is conditioned on, recorded in step order: logits_first, logit
  step i's l0_hat (computed just before it in the same step); signal_first, f(y) before the switch
  (step 7 here), then the previous step's l0_hat."""
  _, y = toy_data(8, jax.random.PRNGKey(7))
  base, seen = make_model(10), []

  def signal_net(params, x, t, cond, logits):
    jax.debug.callback(lambda v: seen.append(np.asarray(v)), logits, ordered=True)
    return base.signal_net(params, x, t, cond, logits)
  cfg = sampling_config(strategy="parallel", switch_t=0.3, parallel_order=order,
                        initial_logits="classifier", return_trajectory=True)
  out = run(dataclasses.replace(base, signal_net=signal_net), cfg, y, key=2)
  l0_traj = np.asarray(out.trajectory[1])
  expected = (list(l0_traj) if order == "logits_first"
              else [classifier(None, y)] * 7 + list(l0_traj[6:9]))
  assert len(seen) == 10
  for i, (got, want) in enumerate(zip(seen, expected)):
    np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"signal step {i}")


def test_parallel_branches_step_along_their_own_sdes_grids():
  """Equal step counts, different SDEs (a DDPM signal, an OUVE logit branch): step i evaluates
  each branch's net at its own grid time timesteps()[i] and steps to timesteps()[i + 1], so the
  last step lands each branch on its clean time (-1, 0), where x and l are its x0_hat, l0_hat."""
  _, y = toy_data(4, jax.random.PRNGKey(1))
  base, times = make_model(10), {"signal": [], "logits": []}

  def recorded(name, net):
    def wrapper(params, state, t, *cond):
      jax.debug.callback(lambda v: times[name].append(np.asarray(v)), t, ordered=True)
      return net(params, state, t, *cond)
    return wrapper
  model = dataclasses.replace(base, signal_net=recorded("signal", base.signal_net),
                              logits_net=recorded("logits", base.logits_net),
                              logits_sde=sde_lib.get_sde("ouve", N=10))
  out = run(model, sampling_config(strategy="parallel", switch_t=0.3, return_trajectory=True), y)
  assert np.all(np.isfinite(out.x0)) and np.all(np.isfinite(out.logits))
  np.testing.assert_allclose(out.x0, out.trajectory[0][-1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, out.trajectory[1][-1], rtol=1e-5, atol=1e-6)
  for name, sde in (("signal", model.signal_sde), ("logits", model.logits_sde)):
    np.testing.assert_allclose(np.stack(times[name]), np.repeat(sde.timesteps()[:-1, None], 4, 1),
                               rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("order", ["logits_first", "signal_first"])
def test_parallel_steps_from_a_python_loop_equal_the_scan(order):
  """`parallel_schedule` / `parallel_start` / `parallel_step` called step by step (the benchmark's
  per-step loop) give the scan's trajectory, on both sides of the switch."""
  _, y = toy_data(8, jax.random.PRNGKey(7))
  model = make_model(10)
  cfg = sampling_config(strategy="parallel", switch_t=0.3, parallel_order=order,
                        initial_logits="classifier")
  key = jax.random.PRNGKey(2)
  ref = run(model, cfg, y, key=2)
  b = coupled._Branches(model, cfg, {"signal": {}, "logits": {}}, {}, y)
  switch, steps = coupled.parallel_schedule(model, cfg)
  assert switch == 7 and len(steps[0]) == 10
  carry, k_steps, f_y = coupled.parallel_start(b, key)
  for i in range(10):
    carry, _ = coupled.parallel_step(b, k_steps, f_y, i < switch, carry, tuple(a[i] for a in steps))
  np.testing.assert_allclose(carry[4], ref.x0, atol=1e-5)
  np.testing.assert_allclose(carry[5], ref.logits, atol=1e-5)
  assert np.abs(np.asarray(carry[5] - f_y)).max() > 1e-3   # the logits did move away from f(y)


def test_run_method_resumes_an_interrupted_evaluation(tmp_path, monkeypatch):
  """With a cache dir, a rerun after batch 1 of 3 computes only batches 2 and 3 and returns what
  an uninterrupted run does; a finished run is read back without compiling."""
  _, y = toy_data(20, jax.random.PRNGKey(2))   # 3 batches of 8 (the last padded)
  model, cfg, mesh = make_model(5), sampling_config(strategy="parallel"), parallel.make_mesh(default.get_config())
  args = (model, cfg, {"signal": {}, "logits": {}}, {}, y, jax.random.PRNGKey(0), 8, mesh)
  reference = evaluate.run_method("parallel", *args)
  evaluate.run_method("parallel", *args, cache_dir=str(tmp_path))
  (path,) = tmp_path.glob("parallel-*.npz")
  saved = dict(np.load(path))
  saved.update(batches=1, preds=saved["preds"][:8], clf_preds=saved["clf_preds"][:8])
  np.savez(path, **saved)                                  # as if killed after batch 1
  calls, real_fold_in = [], jax.random.fold_in

  def fold_in(key, data):   # records the batch indices run_method folds in (not traced ones)
    if isinstance(data, int):
      calls.append(data)
    return real_fold_in(key, data)

  monkeypatch.setattr(evaluate.jax.random, "fold_in", fold_in)
  resumed = evaluate.run_method("parallel", *args, cache_dir=str(tmp_path))
  assert calls == [1, 2]
  monkeypatch.setattr(evaluate.coupled, "get_coupled_fn", None)   # a finished run never compiles
  for result in (resumed, evaluate.run_method("parallel", *args, cache_dir=str(tmp_path))):
    np.testing.assert_array_equal(result.predictions, reference.predictions)
    np.testing.assert_array_equal(result.classifier_predictions, reference.classifier_predictions)
    np.testing.assert_array_equal(result.x0, reference.x0)
    assert result.nfe == reference.nfe == 10 and len(result.predictions) == 20
  # Another sampling config, or another model config, is another file; an unreadable file is
  # recomputed.
  monkeypatch.undo()
  evaluate.run_method("card", model, sampling_config(strategy="card"), *args[2:], cache_dir=str(tmp_path))
  assert len(list(tmp_path.glob("*.npz"))) == 2
  for n in (5, 5, 6):   # the model's config, e.g. signal.sde_kwargs.N (same N: same file)
    evaluate.run_method("parallel", *args, cache_dir=str(tmp_path), model_config=ml_collections.ConfigDict(
        {"signal": {"sde_kwargs": {"N": n}}}))
  assert len(list(tmp_path.glob("parallel-*.npz"))) == 3
  path.write_bytes(b"not an npz")
  again = evaluate.run_method("parallel", *args, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(again.predictions, reference.predictions)
  assert int(np.load(path)["batches"]) == 3


def test_run_method_times_every_batch_and_keeps_the_first_batchs_x0(monkeypatch):
  """A clock that advances 1 s per reading: compiling takes 1 s and each of the 3 batches of 8
  (20 items) 1 s, so seconds_per_item is 3 / 20 (every batch counted, not the last one alone);
  x0 is the first batch's (the figure pairs it with the first labels): y[:8] for `noisy`."""
  _, y = toy_data(20, jax.random.PRNGKey(2))
  config = default.get_config()
  config.mesh.data = 1
  clock = iter(range(1000))
  monkeypatch.setattr(evaluate, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  result = evaluate.run_method("noisy", make_model(5), sampling_config(strategy="noisy"),
                               {"signal": {}, "logits": {}}, {}, y, jax.random.PRNGKey(0), 8,
                               parallel.make_mesh(config))
  assert (result.seconds_per_item, result.compile_seconds) == (3 / 20, 1.0)
  np.testing.assert_array_equal(result.x0, y[:8])
  np.testing.assert_array_equal(result.predictions, classifier(None, y).argmax(-1))


def test_run_method_sharded_over_8_devices_equals_one_device():
  """Batches sharded over the mesh (2 items per device, the last batch padded) give one device's
  samples and predictions; so do the sampler's own XLA options, which reach its program."""
  _, y = toy_data(20, jax.random.PRNGKey(4))
  model, cfg, config = make_model(30), sampling_config(strategy="parallel"), default.get_config()

  def run(devices, compiler_options=None):
    config.mesh.data = devices
    return evaluate.run_method("parallel", model, cfg, {"signal": {}, "logits": {}}, {}, y,
                               jax.random.PRNGKey(0), 16, parallel.make_mesh(config),
                               compiler_options=compiler_options)

  one, sharded = run(1), run(8)
  own = run(1, {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"})
  np.testing.assert_allclose(own.x0, one.x0, atol=1e-5)   # the sampler's own XLA options
  with pytest.raises(Exception, match="xla_no_such_option"):
    run(1, {"xla_no_such_option": "1"})                     # reach XLA
  assert len(sharded.predictions) == 20
  np.testing.assert_allclose(sharded.x0, one.x0, atol=1e-5)
  np.testing.assert_array_equal(sharded.predictions, one.predictions)
  np.testing.assert_array_equal(sharded.classifier_predictions, one.classifier_predictions)
  assert np.abs(one.x0 - y[:16]).max() > 0.1   # the trajectory moved the signal
