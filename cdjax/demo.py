"""The README's main job: train + evaluate a small coupled model on embedded MNIST (30% GN).

python -m cdjax.demo [--config configs/mnist_demo.py] [--workdir runs/demo] [--config.<field>=...]
Prints the results table and writes <workdir>/results.{json,md,png}.
"""
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from cdjax import experiment
from cdjax import overrides

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Experiment config (default configs/mnist_demo.py).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Where checkpoints and results go.")


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)
  experiment.run(_CONFIG.value, _WORKDIR.value, os.path.join(_WORKDIR.value, "results"))


if __name__ == "__main__":
  overrides.run(main, "configs/mnist_demo.py")
