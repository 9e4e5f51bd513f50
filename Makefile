# Two commands do all set-up on a fresh machine:
#   make demo   train + evaluate a small coupled model on embedded MNIST, print a table, write a figure
#   make test   run the test suite
# Each creates .venv from the pins in pyproject.toml and installs the system packages it needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SYSTEM_PACKAGES := espeak-ng sox dataset-fashion-mnist
SYSTEM_CHECK := command -v espeak-ng >/dev/null && command -v sox >/dev/null && test -d /usr/share/datasets/fashion-mnist

.PHONY: demo test venv system-deps clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

system-deps:
	@if $(SYSTEM_CHECK); then :; \
	elif [ "$$(id -u)" = 0 ]; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSTEM_PACKAGES) >/dev/null) \
	  || { echo "error: apt-get could not install $(SYSTEM_PACKAGES)" >&2; exit 1; }; \
	else \
	  echo "error: missing system packages; run: sudo apt-get install $(SYSTEM_PACKAGES)" >&2; exit 1; \
	fi

demo: venv system-deps
	$(PY) -m cdjax.demo

test: venv system-deps
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests

clean:
	rm -rf $(VENV)
