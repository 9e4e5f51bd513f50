"""The paper's ImageNet 32x32 (100 classes) setup at 15% GN (configs/paper_images.py).

Paper (as reported): noisy 1.8%, enhance-then-classify 52.9%, Parallel 69.8%.
imagenet_resized/32x32 restricted to its first 100 classes (`data.label_subset`, labels 0..99 of
TFDS's label order); evaluated on its validation split (it has no test split).
python experiments/image_table.py --config configs/imagenet32_100.py --workdir runs/imagenet32_100 --out experiments/results/imagenet32_100
"""
from configs import paper_images

NUM_CLASSES = 100
TRAIN_EXAMPLES = 128_000   # about: ImageNet has 732-1300 training images per class


def get_config():
  return paper_images.make("imagenet_resized/32x32", NUM_CLASSES, 0.15, train_examples=TRAIN_EXAMPLES,
                           eval_split="validation",
                           label_subset=tuple(range(NUM_CLASSES)))
