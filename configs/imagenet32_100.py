"""The paper's ImageNet 32x32 (100 classes) setup at 15% GN (configs/paper_images.py).

Paper (as reported): noisy 1.8%, enhance-then-classify 52.9%, Parallel 69.8%.
Not yet done: restricting imagenet_resized/32x32 to its first 100 classes (the input pipeline has
no label filter yet), so this config cannot be trained as it stands.
python experiments/image_table.py --config configs/imagenet32_100.py --workdir runs/imagenet32_100 --out experiments/results/imagenet32_100
"""
from configs import paper_images


def get_config():
  return paper_images.make("imagenet_resized/32x32", 100, 0.15)
