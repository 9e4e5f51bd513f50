"""Data: local TFDS builders, corruptions, and the grain input pipeline."""
from cdjax.data import audio, images  # noqa: F401  (registers the local builders)
from cdjax.data.corruptions import (CORRUPTIONS, clean_gain_from_config, corruption_from_config,
                                    get_corruption)
from cdjax.data.pipeline import (audio_length, fit_audio, host_batch_size, load_split, make_loader,
                                 standardize)
from cdjax.data.sources import DATASETS, LabelSubset, get_builder, get_source, resolve_data_dir
