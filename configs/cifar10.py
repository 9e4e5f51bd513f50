"""The paper's CIFAR-10 setup at 30% GN (configs/paper_images.py).

Paper (as reported): noisy 10.9%, enhance-then-classify 60.4%, Alternating 82.8%.
python experiments/image_table.py --config configs/cifar10.py --workdir runs/cifar10 --out experiments/results/cifar10
"""
from configs import paper_images


def get_config():
  return paper_images.make("cifar10", 10, 0.3, train_examples=50_000)
