"""Tests for cdjax.metrics against hand-computed values, fast_bss_eval, PESQ and ESTOI."""
import fast_bss_eval.numpy as fbe
import numpy as np
import pystoi
import pytest
import scipy.signal

from cdjax import metrics

SR = 16_000


@pytest.fixture(scope="module")
def voiced():
  """3 s of a harmonic, amplitude-modulated 'voice' (PESQ needs speech-like input)."""
  t = np.arange(3 * SR) / SR
  phase = 2 * np.pi * np.cumsum(120 + 30 * np.sin(2 * np.pi * 0.5 * t)) / SR
  envelope = (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))**2
  return 0.1 * envelope * sum(np.sin(k * phase) / k for k in range(1, 20))


def test_si_sdr_known_values():
  rng = np.random.default_rng(0)
  s = rng.standard_normal(8000)
  n = rng.standard_normal(8000)
  n -= (n @ s) / (s @ s) * s              # exactly orthogonal to s
  n *= np.sqrt(0.1 * (s @ s) / (n @ n))   # 10 dB below s
  np.testing.assert_allclose(metrics.si_sdr(s, s + n), 10.0, atol=1e-9)
  np.testing.assert_allclose(metrics.si_sdr(s, 3 * (s + n)), 10.0, atol=1e-9)  # scale-free
  assert metrics.si_sdr(s, -0.5 * s) > 100
  assert metrics.si_sdr(s, rng.standard_normal(8000)) < -20
  batch = rng.standard_normal((3, 2, 8000))
  est = batch + 0.3 * rng.standard_normal(batch.shape)
  np.testing.assert_allclose(metrics.si_sdr(batch, est),
                             fbe.si_sdr(batch.reshape(6, 1, -1), est.reshape(6, 1, -1))
                             .reshape(3, 2), rtol=1e-9)


def test_energy_ratios_known_values():
  rng = np.random.default_rng(1)
  s, n, a = rng.standard_normal((3, 8000))
  q, _ = np.linalg.qr(np.stack([s, n, a], axis=1))    # orthogonal directions
  s, n, a = q.T * np.sqrt(8000)
  e = s + 0.1 * n + 0.01 * a                         # target, interference, artifact energies
  sdr, sir, sar = metrics.energy_ratios(s, e, n)
  np.testing.assert_allclose([sdr, sir, sar],
                             [10 * np.log10(1 / (0.01 + 1e-4)), 20.0, 40.0], atol=1e-9)
  # An observation without interference (noise all zero): no e_noise, SI-SIR +inf, the rest as
  # if the estimate's interference were artifact.
  sdr, sir, sar = metrics.energy_ratios(s, e, np.zeros_like(n))
  residual = 10 * np.log10(1 / (0.01 + 1e-4))
  np.testing.assert_allclose([sdr, sir, sar], [residual, np.inf, residual], atol=1e-9)


def test_pesq_and_estoi(voiced):
  np.testing.assert_allclose(metrics.pesq_wb(voiced, voiced), 4.64, atol=0.01)
  np.testing.assert_allclose(metrics.estoi(voiced, voiced), 1.0, atol=1e-6)
  noisy = voiced + 0.03 * np.random.default_rng(0).standard_normal(voiced.shape)
  both = np.stack([voiced, voiced])
  scores = metrics.pesq_wb(both, np.stack([voiced, noisy]))
  assert scores.shape == (2,) and scores[1] < scores[0] - 1
  assert metrics.estoi(voiced, noisy) < 0.9
  # Extended STOI, not STOI: the two differ on the noisy signal.
  extended, plain = (pystoi.stoi(voiced, noisy, SR, extended=e) for e in (True, False))
  np.testing.assert_allclose(metrics.estoi(voiced, noisy), extended, rtol=1e-9)
  assert abs(extended - plain) > 0.01
  # Another rate is scored at 16 kHz (P.862.2's rate): 48 kHz gives the 16 kHz scores.
  up = lambda a: scipy.signal.resample_poly(a, 3, 1, axis=-1)
  np.testing.assert_allclose(metrics.pesq_wb(up(both), up(np.stack([voiced, noisy])), 48_000),
                             scores, atol=0.05)


def test_accuracy_intervals():
  acc = metrics.accuracy(np.r_[np.zeros(90), np.ones(10)], np.zeros(100))
  # Wilson 95% interval for 90/100 (textbook value: 0.8256 to 0.9448).
  np.testing.assert_allclose(acc, (0.9, 0.8256, 0.9448), atol=1e-4)
  err = metrics.error_rate(np.r_[np.zeros(90), np.ones(10)], np.zeros(100))
  np.testing.assert_allclose(err, (0.1, 1 - 0.9448, 1 - 0.8256), atol=1e-4)
  assert metrics.wilson_interval(0, 10).lo == 0.0


def test_paired_bootstrap():
  rng = np.random.default_rng(0)
  a = (rng.random(2000) < 0.8).astype(float)
  b = np.where(rng.random(2000) < 0.9, a, 1 - a)   # ~10% of items flip
  res = metrics.paired_bootstrap(a, b, num_resamples=2000)
  assert res.wins + res.losses + res.ties == 2000
  assert res.diff == pytest.approx((res.wins - res.losses) / 2000)
  assert res.lo < res.diff < res.hi and res.hi - res.lo < 0.05
  same = metrics.paired_bootstrap(a, a, num_resamples=100)
  assert (same.diff, same.lo, same.hi, same.ties) == (0.0, 0.0, 0.0, 2000)
  # Drawn in blocks of resamples (here 3: bounded memory at any N), the CI of one [R, N] draw.
  means = (a - b)[np.random.default_rng(0).integers(0, 2000, (5000, 2000))].mean(1)
  blocks = metrics.paired_bootstrap(a, b, num_resamples=5000)
  assert (blocks.lo, blocks.hi) == tuple(np.quantile(means, [0.025, 0.975]))


def test_real_time_factor():
  assert metrics.real_time_factor(0.5, 2 * SR, SR) == 0.25


def test_bad_inputs_raise_named_errors(voiced):
  """Shapes that would otherwise broadcast, truncate or pair the wrong items are refused: e.g. an
  estimate [1, 2, L] against references [2, L] holds the same 2 rows but is not item-aligned."""
  both = np.stack([voiced, voiced])
  with pytest.raises(ValueError, match=r"reference \[2, 48000\] and estimate \[1, 2, 48000\]"):
    metrics.estoi(both, both[None])
  with pytest.raises(ValueError, match="must be the same 1-D shape"):
    metrics.paired_bootstrap(np.zeros((4, 2)), np.zeros((4, 2)))
  with pytest.raises(ValueError, match="must be the same 1-D shape"):
    metrics.paired_bootstrap(np.zeros(4), np.zeros(3))
  with pytest.raises(ValueError, match="need n > 0 trials, got 0"):
    metrics.accuracy(np.zeros(0), np.zeros(0))
