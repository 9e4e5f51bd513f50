"""The speech enhancement table (noisy / discriminative / sgmse / exdiff; SI-SDR, SI-SIR, SI-SAR,
PESQ, ESTOI, RTF): trains what the workdir lacks, evaluates, writes
experiments/results/speech_enhancement.{json,md,png}.

python experiments/speech_enhancement.py --config configs/speech_enhancement.py --workdir runs/speech_enhancement \
    --out experiments/results/speech_enhancement
"""
import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cdjax import speech  # noqa: E402
from cdjax import overrides  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment config (default configs/speech_enhancement.py).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Checkpoints of every stage (default: runs/<config name>).")
_OUT = flags.DEFINE_string("out", None,
                           "Results path prefix (default: experiments/results/<config name>).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  speech.run_enhancement(_CONFIG.value, *overrides.experiment_paths(_WORKDIR.value, _OUT.value))


if __name__ == "__main__":
  overrides.run(main, "configs/speech_enhancement.py")
