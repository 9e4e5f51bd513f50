#!/usr/bin/env bash
# The issue-8 benchmarks on a lent GPU machine (the `device` tool's nvidia-h200 image: python3
# with jax[cuda], flax, optax, orbax-checkpoint and torch+CUDA, and no network). Two steps:
#
#   here, once (network, the project's .venv):  experiments/device_bench.sh wheels
#       downloads into .whl/ (git-ignored, ~17 MiB) the pinned packages cdjax imports that the
#       image lacks: Python 3.12 manylinux wheels, pure-Python wheels built here, pesq's source
#       (built there: it has no wheel) and what its setup needs.
#   there, as one device call (carry [".whl"], timeout_s 600):  experiments/device_bench.sh run
#       installs .whl/ into /tmp/site (our flax / optax / orbax pins win over the image's; jax,
#       jaxlib, numpy and torch are the image's), then runs bench_sampler.py (images: b1 / 16 /
#       64, scan vs step loop vs PyTorch eager on CUDA, strategy costs; it writes after each
#       stage) and bench_train.py, each under its own time limit (about 9 minutes in all); results
#       go to the sections sampler_gpu / train_gpu of experiments/results/bench.json, copied to
#       $OUT with bench.md, the raw files and the logs. Back here: copy $OUT's bench.json over
#       experiments/results/bench.json and re-render with `python experiments/bench_common.py`.
#   there, as a second device call (same carry and limit):  experiments/device_bench.sh speech
#       the speech sampler (b1 / 16 / 64, scan vs step loop vs PyTorch eager; section
#       sampler_speech_gpu), under its own limit (SPEECH_S, 500 s). Copy the first call's
#       bench.json here before it: the working tree travels, so its bench.json then holds both.
#
# Locally (PYTHON=.venv/bin/python SKIP_INSTALL=1 OUT=/tmp/out experiments/device_bench.sh run)
# the same run checks the script on the CPU (sections sampler / train: it rewrites the CPU tables).
# With PYTHON a Python 3.12 venv holding the image's versions instead (jax 0.11.2, numpy 2.5.2,
# torch 2.11.0, cython, wheel, and what else the image lists; bench_notes.md, session 57) and no
# SKIP_INSTALL, it rehearses the install from .whl/ too; run it in a clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# cdjax's imports that the nvidia-h200 image lacks (device/KINDS.md), at the .venv's versions.
MISSING="array_record audioread cffi decorator dm-tree docstring_parser fast_bss_eval
googleapis-common-protos grain immutabledict importlib_resources librosa ml_collections mlxtend
platformdirs pooch portpicker promise pycparser pystoi simple-parsing soundfile soxr
tensorflow-datasets tensorflow-metadata termcolor toml tzdata flax optax orbax-checkpoint"
SOURCE_ONLY="pesq"            # no wheel on PyPI: built on the device
BUILD_NEEDS="pytest-runner"   # pesq's setup_requires (setuptools, cython, numpy, wheel: in the image)

wheels() {
  local pip=".venv/bin/pip" platform=(--python-version 3.12 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  [[ -x $pip ]] || { echo "no .venv: run 'make venv' first (its pins are the versions carried)"; exit 1; }
  rm -rf .whl && mkdir .whl
  local name pin
  for name in $MISSING $SOURCE_ONLY; do
    pin=$($pip freeze | grep -i "^${name//[-_]/[-_]}==") || { echo "$name is not in .venv"; exit 1; }
    if [[ " $SOURCE_ONLY " == *" $name "* ]]; then
      $pip download -q --no-deps --no-binary=:all: --no-build-isolation -d .whl "$pin"
    elif ! $pip download -q --no-deps --only-binary=:all: "${platform[@]}" -d .whl "$pin" 2>/dev/null; then
      $pip wheel -q --no-deps -w .whl "$pin"   # pure Python, source only on PyPI
    fi
  done
  $pip download -q --no-deps --only-binary=:all: -d .whl $BUILD_NEEDS
  du -sh .whl
}

setup() {   # installs .whl/ (unless SKIP_INSTALL) and sets the environment of both runs
  if [[ -z ${SKIP_INSTALL:-} ]]; then
    [[ -d .whl ]] || { echo "no .whl/: run 'experiments/device_bench.sh wheels' here first"; exit 1; }
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/.whl" $PYTHON -m pip install -q --no-index --no-deps \
      --no-build-isolation --target /tmp/site .whl/pesq-*.tar.gz
    export PYTHONPATH=/tmp/site
  fi
  # JAX takes half the GPU's memory, not 75%: torch allocates beside it in the same process.
  export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
  $PYTHON -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), '| flax',
flax.__version__, '| torch', torch.__version__, torch.cuda.is_available())"
}

collect() {   # copies the results into $OUT
  cp experiments/results/bench.json experiments/results/bench.md "$OUT"/
  cp experiments/results/bench_*_gpu_raw.json "$OUT"/ 2>/dev/null || true   # 8 files at most come back
}

run() {
  : "${OUT:?set OUT to the folder for the results}"
  setup
  local status=0
  timeout "${SAMPLER_S:-330}" $PYTHON experiments/bench_sampler.py --config configs/mnist_demo.py \
    --batches=1,16,64 --paths=scan,loop,torch --repeats=5 --budget_s=10 --strategy_repeats=3 \
    2>&1 | tee "$OUT/sampler.log" || status=1
  timeout "${TRAIN_S:-200}" $PYTHON experiments/bench_train.py --config configs/mnist_demo.py \
    --rounds=3 --variants=net_remat,accum2 2>&1 | tee "$OUT/train.log" || status=1
  collect
  return $status
}

speech() {
  : "${OUT:?set OUT to the folder for the results}"
  setup
  local status=0
  timeout "${SPEECH_S:-500}" $PYTHON experiments/bench_sampler.py --config configs/speech_keywords.py \
    --batches=${SPEECH_BATCHES:-1,16,64} --paths=scan,loop,torch --repeats=3 --budget_s=10 \
    2>&1 | tee "$OUT/speech.log" || status=1
  collect
  return $status
}

case "${1:-}" in
  wheels) wheels ;;
  run) run ;;
  speech) speech ;;
  *) echo "usage: $0 wheels|run|speech"; exit 2 ;;
esac
