"""Evaluation metrics (NumPy, host side): speech quality, accuracy with CIs, paired comparisons.

Speech metrics take waveforms `[..., L]` (leading axes are items) and return one value per
item. SI-SDR / SI-SIR / SI-SAR follow SGMSE+'s `energy_ratios` (Le Roux et al. 2019 scale
invariance): with reference s, noise n = y - g s (what the corruption added to the clean signal;
g is the clean signal's gain in the mixture y, 1 for additive noise, see
`data.clean_gain_from_config`) and estimate e,
  s_target = (<e, s> / |s|^2) s,   e_noise = (<e, n> / |n|^2) n,   e_art = e - s_target - e_noise,
  SI-SDR = 10 log10 |s_target|^2 / |e - s_target|^2,
  SI-SIR = 10 log10 |s_target|^2 / |e_noise|^2,
  SI-SAR = 10 log10 |s_target|^2 / |e_art|^2.
(The projections onto s and n are separate, not a joint least-squares fit, as in SGMSE+.)
"""
import math
from typing import Callable, NamedTuple

import numpy as np
import pesq as pesq_lib
import pystoi
import scipy.signal
import scipy.stats


class Interval(NamedTuple):
  """A point estimate with a two-sided confidence interval [lo, hi]."""
  value: float
  lo: float
  hi: float


def _dot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.sum(a * b, axis=-1)


def _db(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore"):
    return 10 * np.log10(num / den)


def _project(e: np.ndarray, s: np.ndarray) -> np.ndarray:
  """Orthogonal projection of e [..., L] onto s [..., L], per item; zero where s is all zero."""
  energy = _dot(s, s)
  coef = np.divide(_dot(e, s), energy, out=np.zeros_like(energy), where=energy > 0)
  return coef[..., None] * s


def si_sdr(reference: np.ndarray, estimate: np.ndarray) -> np.ndarray:
  """Scale-invariant SDR in dB of estimate vs reference, [..., L] -> [...]."""
  s, e = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
  target = _project(e, s)
  return _db(_dot(target, target), _dot(e - target, e - target))


def energy_ratios(reference: np.ndarray, estimate: np.ndarray,
                  noise: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(SI-SDR, SI-SIR, SI-SAR) in dB, each [...], from reference, estimate, noise [..., L].

  `noise` is what the corruption added to the observation (y - g * reference); see the module
  docstring.
  """
  s, e, n = (np.asarray(a, np.float64) for a in (reference, estimate, noise))
  s_target, e_noise = _project(e, s), _project(e, n)
  e_art = e - s_target - e_noise
  energy = _dot(s_target, s_target)
  return (_db(energy, _dot(e - s_target, e - s_target)), _db(energy, _dot(e_noise, e_noise)),
          _db(energy, _dot(e_art, e_art)))


def _per_item(fn: Callable[[np.ndarray, np.ndarray], float], reference: np.ndarray,
              estimate: np.ndarray) -> np.ndarray:
  s, e = np.asarray(reference, np.float64), np.asarray(estimate, np.float64)
  if s.shape != e.shape:
    raise ValueError(f"reference {list(s.shape)} and estimate {list(e.shape)} differ in shape.")
  flat = [fn(a, b) for a, b in zip(s.reshape(-1, s.shape[-1]), e.reshape(-1, e.shape[-1]))]
  return np.asarray(flat, np.float64).reshape(s.shape[:-1])


def pesq_wb(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16_000) -> np.ndarray:
  """Wide-band PESQ (ITU-T P.862.2, `pesq` package), [..., L] -> [...]. P.862.2 is defined at
  16 kHz: audio at another rate (e.g. 48 kHz) is resampled to 16 kHz first (polyphase)."""
  if sample_rate != 16_000:
    g = math.gcd(16_000, sample_rate)
    reference, estimate = (scipy.signal.resample_poly(np.asarray(a, np.float64), 16_000 // g,
                                                      sample_rate // g, axis=-1)
                           for a in (reference, estimate))
  return _per_item(lambda s, e: pesq_lib.pesq(16_000, s, e, "wb"), reference, estimate)


def estoi(reference: np.ndarray, estimate: np.ndarray, sample_rate: int = 16_000) -> np.ndarray:
  """Extended STOI (pystoi, extended=True), [..., L] -> [...], at most 1 (can dip below 0)."""
  return _per_item(lambda s, e: pystoi.stoi(s, e, sample_rate, extended=True), reference,
                   estimate)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> Interval:
  """Proportion successes / n with its Wilson score interval."""
  if n <= 0:
    raise ValueError(f"wilson_interval: need n > 0 trials, got {n}.")
  z = scipy.stats.norm.ppf(0.5 + confidence / 2)
  p = successes / n
  centre = (p + z**2 / (2 * n)) / (1 + z**2 / n)
  half = z / (1 + z**2 / n) * np.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
  return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def accuracy(predictions: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> Interval:
  """Fraction of predictions [N] equal to labels [N], with a Wilson interval."""
  correct = np.asarray(predictions) == np.asarray(labels)
  return wilson_interval(int(correct.sum()), correct.size, confidence)


def error_rate(predictions: np.ndarray, labels: np.ndarray, confidence: float = 0.95) -> Interval:
  """1 - accuracy, with the matching Wilson interval."""
  acc = accuracy(predictions, labels, confidence)
  return Interval(1 - acc.value, 1 - acc.hi, 1 - acc.lo)


class PairedDifference(NamedTuple):
  """mean(a - b) over items with a paired-bootstrap CI, and per-item wins (a > b) / losses."""
  diff: float
  lo: float
  hi: float
  wins: int
  losses: int
  ties: int


def paired_bootstrap(a: np.ndarray, b: np.ndarray, num_resamples: int = 10_000,
                     confidence: float = 0.95, seed: int = 0) -> PairedDifference:
  """Paired bootstrap of mean(a - b) for per-item scores a, b [N] of two methods on the same
  items (e.g. 0/1 correctness or SI-SDR): percentile CI over `num_resamples` resamples."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  if a.shape != b.shape or a.ndim != 1:
    raise ValueError(f"paired_bootstrap: a {list(a.shape)} and b {list(b.shape)} must be the "
                     "same 1-D shape.")
  d = a - b
  rng = np.random.default_rng(seed)
  block = max(1, 2**22 // max(d.size, 1))   # resamples per draw: indices of ~32 MB at any N
  means = np.concatenate([d[rng.integers(0, d.size, (min(block, num_resamples - s), d.size))].mean(1)
                          for s in range(0, num_resamples, block)])
  lo, hi = np.quantile(means, [0.5 - confidence / 2, 0.5 + confidence / 2])
  return PairedDifference(float(d.mean()), float(lo), float(hi), int((d > 0).sum()),
                          int((d < 0).sum()), int((d == 0).sum()))


def real_time_factor(seconds: float, num_samples: int, sample_rate: int = 16_000) -> float:
  """Processing time over audio duration (< 1: faster than real time)."""
  return seconds / (num_samples / sample_rate)
