"""Local audio datasets (TFDS builders) synthesized offline: spoken digits (espeak-ng), noise (sox).

Audio is 16 kHz mono int16 (divide by 32768 for float32 in [-1, 1)).
- spoken_digits: {"audio": int16 [16000], "label": digit, "voice": voice id}; the voices of
  train / validation / test are disjoint.
- noise_local: {"audio": int16 [48000], "label": colour (white, pink, brown)}; train and test
  clips are disjoint segments of the noise streams, with independently drawn effects.
"""
import concurrent.futures
import io
import math
import os
import subprocess

import numpy as np
import scipy.signal
import soundfile
import tensorflow_datasets as tfds

from cdjax.data.sources import DATASETS

SAMPLE_RATE = 16000


def _run(cmd: list[str], package: str, stdin: bytes | None = None) -> bytes:
  """Runs `cmd` and returns its stdout; a missing program names the Debian package."""
  try:
    return subprocess.run(cmd, input=stdin, capture_output=True, check=True).stdout
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f"{cmd[0]} not found: install it with `sudo apt-get install {package}`.") from e
  except subprocess.CalledProcessError as e:
    raise RuntimeError(f"{' '.join(cmd)} failed: {e.stderr.decode().strip()}") from e


def fit_length(x: np.ndarray, length: int, start: int | None = None) -> np.ndarray:
  """x [N] in exactly `length` samples: centred with zero padding on both sides when shorter;
  when longer, the window from `start` (default: the middle one)."""
  if len(x) >= length:
    start = (len(x) - length) // 2 if start is None else start
    return x[start:start + length]
  before = (length - len(x)) // 2
  return np.pad(x, (before, length - len(x) - before))


def _to_int16(x: np.ndarray, peak: float) -> np.ndarray:
  """Scales x [N] to the given peak (a fraction of full scale, < 1) as int16."""
  return np.round(x * (peak * 32768 / max(np.abs(x).max(), 1e-9))).astype(np.int16)


def _features(audio_length: int, class_names: list[str], **extra) -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "audio": tfds.features.Tensor(shape=(audio_length,), dtype=np.int16,
                                    encoding=tfds.features.Encoding.BYTES),
      "label": tfds.features.ClassLabel(names=class_names),
      **extra,
  })


@DATASETS.register("spoken_digits")
class SpokenDigits(tfds.core.GeneratorBasedBuilder):
  """The digits zero..nine spoken by espeak-ng: 8 English accents x 12 voice variants = 96 voices.

  Each voice says each digit RENDITIONS times, each at its own random speed and pitch
  (deterministic in the voice, digit and rendition). Voices are split 72 / 12 / 12 into
  train / validation / test (2,160 / 360 / 360 clips). Each clip is resampled to 16 kHz,
  trimmed of silence, centred in 1 s and peak-normalised to PEAK.
  """

  VERSION = tfds.core.Version("1.0.0")
  DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
  ACCENTS = ["en-gb", "en-us", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-rp",
             "en-gb-x-gbcwmd", "en-029", "en-us-nyc"]
  VARIANTS = [f"m{i}" for i in range(1, 8)] + [f"f{i}" for i in range(1, 6)]
  HELD_OUT_VOICES = 12           # per split, for validation and for test
  RENDITIONS = 3                 # clips per voice and digit
  SPEED_WPM = (110, 210)         # espeak-ng speed range (-s)
  PITCH = (20, 80)               # espeak-ng pitch range (-p)
  WORD_GAP = 40                  # espeak-ng -g: pause between words, 10 ms units
  MIN_GAP_S = 0.2                # the pauses that separate words are longer than this
  LENGTH = SAMPLE_RATE           # 1 s
  TRIM_DB = -40.0                # silence threshold relative to the peak
  PEAK = 0.5
  SEED = 0

  @classmethod
  def voices(cls) -> list[str]:
    """espeak-ng voice names; a voice's id is its index here."""
    return [f"{a}+{v}" for a in cls.ACCENTS for v in cls.VARIANTS]

  @classmethod
  def split_voices(cls) -> dict[str, np.ndarray]:
    """Disjoint voice ids per split, from a fixed permutation."""
    perm = np.random.default_rng(cls.SEED).permutation(len(cls.voices()))
    n = cls.HELD_OUT_VOICES
    return {"test": np.sort(perm[:n]), "validation": np.sort(perm[n:2 * n]),
            "train": np.sort(perm[2 * n:])}

  @classmethod
  def clip_specs(cls, voice: int) -> list[tuple[int, int, int]]:
    """(digit, speed, pitch) of every clip of one voice."""
    specs = []
    for digit in range(len(cls.DIGITS)):
      for r in range(cls.RENDITIONS):
        rng = np.random.default_rng([cls.SEED, voice, digit, r])
        specs.append((digit, int(rng.integers(*cls.SPEED_WPM, endpoint=True)),
                      int(rng.integers(*cls.PITCH, endpoint=True))))
    return specs

  @classmethod
  def synthesize(cls, voice: int) -> np.ndarray:
    """All clips of one voice, in `clip_specs` order, as int16 [n_clips, LENGTH] at 16 kHz.

    One espeak-ng call speaks every clip as its own sentence (speed and pitch set by embedded
    commands) with long pauses between them; the stream is cut in the middle of the
    n_clips - 1 longest pauses.
    """
    specs = cls.clip_specs(voice)
    text = " ".join(f"\x01{speed}S\x01{pitch}P {cls.DIGITS[digit]}."
                    for digit, speed, pitch in specs)
    wav = _run(["espeak-ng", "-v", cls.voices()[voice], "-g", str(cls.WORD_GAP), "--stdout"],
               package="espeak-ng", stdin=text.encode())
    x, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
    loud = np.flatnonzero(np.abs(x) > np.abs(x).max() * 10 ** (cls.TRIM_DB / 20))
    gaps = np.diff(loud)
    cuts = np.sort(np.argsort(gaps)[len(gaps) - len(specs) + 1:])
    if gaps[cuts].min() < cls.MIN_GAP_S * rate:
      raise RuntimeError(f"Could not cut espeak-ng's speech of voice {cls.voices()[voice]} "
                         f"into {len(specs)} words; raise WORD_GAP.")
    g = math.gcd(SAMPLE_RATE, rate)
    clips = []
    for word in np.split(x, (loud[cuts] + loud[cuts + 1]) // 2):
      word = scipy.signal.resample_poly(word, SAMPLE_RATE // g, rate // g)
      loud_word = np.flatnonzero(np.abs(word) > np.abs(word).max() * 10 ** (cls.TRIM_DB / 20))
      clips.append(_to_int16(fit_length(word[loud_word[0]:loud_word[-1] + 1], cls.LENGTH), cls.PEAK))
    return np.stack(clips)

  def _info(self) -> tfds.core.DatasetInfo:
    features = _features(self.LENGTH, self.DIGITS,
                         voice=tfds.features.ClassLabel(names=self.voices()))
    return tfds.core.DatasetInfo(builder=self, features=features,
                                 supervised_keys=("audio", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

  def _generate_examples(self, split: str):
    voices = [int(v) for v in self.split_voices()[split]]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      for voice, clips in zip(voices, pool.map(self.synthesize, voices)):
        for i, ((digit, _, _), audio) in enumerate(zip(self.clip_specs(voice), clips)):
          yield f"{voice}-{i}", {"audio": audio, "label": digit, "voice": voice}


@DATASETS.register("noise_local")
class NoiseLocal(tfds.core.GeneratorBasedBuilder):
  """Coloured noise from sox: white, pink and brown, 3 s clips to crop from.

  Per colour, one repeatable sox noise stream is cut into CLIPS["train"] then CLIPS["test"]
  clips (so the splits never share samples); each clip then gets a random tremolo (amplitude
  modulation) and band-pass, drawn from a per-split seed, and is peak-normalised to PEAK.
  """

  VERSION = tfds.core.Version("1.0.0")
  COLOURS = ["white", "pink", "brown"]
  CLIPS = {"train": 32, "test": 8}        # per colour
  LENGTH = 3 * SAMPLE_RATE
  TREMOLO_HZ = (0.5, 8.0)
  TREMOLO_DEPTH = (0.0, 80.0)             # percent
  HIGHPASS_HZ = (20.0, 400.0)
  LOWPASS_HZ = (1500.0, 7800.0)
  HEADROOM_DB = -12.0                     # gain before the effects, so that none clips
  PEAK = 0.5
  SEEDS = {"train": 0, "test": 1}

  _RAW = ["-t", "raw", "-r", str(SAMPLE_RATE), "-e", "signed", "-b", "16", "-c", "1"]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=_features(self.LENGTH, self.COLOURS),
                                 supervised_keys=("audio", "label"))

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(split) for split in self.CLIPS}

  def _stream(self, colour: str) -> np.ndarray:
    """The repeatable sox noise stream of one colour, int16 [n_clips, LENGTH], train first."""
    n = sum(self.CLIPS.values())
    raw = _run(["sox", "-R", "-r", str(SAMPLE_RATE), "-n", *self._RAW, "-",
                "synth", f"{n * self.LENGTH}s", f"{colour}noise"], package="sox")
    return np.frombuffer(raw, np.int16).reshape(n, self.LENGTH)

  def _effect(self, clip: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """clip int16 [LENGTH] -> tremolo and band-pass with random parameters, int16 [LENGTH]."""
    params = [rng.uniform(*r) for r in (self.TREMOLO_HZ, self.TREMOLO_DEPTH,
                                        self.HIGHPASS_HZ, self.LOWPASS_HZ)]
    raw = _run(["sox", "-R", "-D", *self._RAW, "-", *self._RAW, "-",
                "gain", str(self.HEADROOM_DB), "tremolo", f"{params[0]:.3f}", f"{params[1]:.3f}",
                "highpass", f"{params[2]:.1f}", "lowpass", f"{params[3]:.1f}"],
               package="sox", stdin=clip.tobytes())
    return _to_int16(np.frombuffer(raw, np.int16).astype(np.float32), self.PEAK)

  def _generate_examples(self, split: str):
    first = 0 if split == "train" else self.CLIPS["train"]
    rng = np.random.default_rng(self.SEEDS[split])
    for label, colour in enumerate(self.COLOURS):
      for i, clip in enumerate(self._stream(colour)[first:first + self.CLIPS[split]]):
        yield f"{colour}-{i}", {"audio": self._effect(clip, rng), "label": label}
