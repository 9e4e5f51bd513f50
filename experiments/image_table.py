"""The image results table: trains what the workdir lacks, evaluates every method, writes
<out>.{json,md,png} (default workdir and out: runs/<config name>, experiments/results/<config
name>, e.g. cifar10 or fashion_mnist_cpu for configs/fashion_mnist.py:cpu).

python experiments/image_table.py --config configs/fashion_mnist.py --workdir runs/fashion_mnist
"""
import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cdjax import experiment  # noqa: E402
from cdjax import overrides  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment config (default configs/fashion_mnist.py).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                                "Checkpoints of every stage (default: runs/<config name>).")
_OUT = flags.DEFINE_string("out", None,
                           "Results path prefix (default: experiments/results/<config name>).")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  experiment.run(_CONFIG.value, *overrides.experiment_paths(_WORKDIR.value, _OUT.value))


if __name__ == "__main__":
  overrides.run(main, "configs/fashion_mnist.py")
