"""The paper's CIFAR-100 setup at 30% GN (configs/paper_images.py).

Paper (as reported): noisy 2.0%, enhance-then-classify 60.4%, Nested 71.9%.
python experiments/image_table.py --config configs/cifar100.py --workdir runs/cifar100 --out experiments/results/cifar100
"""
from configs import paper_images


def get_config():
  return paper_images.make("cifar100", 100, 0.3, train_examples=50_000)
