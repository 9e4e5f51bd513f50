"""The coupled spoken-keyword table (noisy / enhance_then_classify / coupled strategies; error
rate with 95% CI): trains what the workdir lacks, evaluates, writes
experiments/results/speech_keywords.{json,md}.

python experiments/speech_keywords.py --config configs/speech_keywords.py --workdir runs/speech_keywords \
    --out experiments/results/speech_keywords
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
                                          "Experiment config (default configs/speech_keywords.py).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Checkpoints of every stage (default: runs/<config name>).")
_OUT = flags.DEFINE_string("out", None,
                           "Results path prefix (default: experiments/results/<config name>).")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  speech.run_keywords(_CONFIG.value, *overrides.experiment_paths(_WORKDIR.value, _OUT.value))


if __name__ == "__main__":
  overrides.run(main, "configs/speech_keywords.py")
