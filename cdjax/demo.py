"""The README's main job: train + evaluate a small coupled model on embedded MNIST (30% GN)."""
import sys


def main():
  sys.exit("cdjax demo: the coupled image pipeline (issue #6) is not wired up yet; "
           "run `make test` for what exists today.")


if __name__ == "__main__":
  main()
