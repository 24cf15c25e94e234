# Two commands for a newcomer: `make demo` and `make test`. Each sets up .venv itself.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test tiny-base venv clean-venv

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"  # test: pytest, and lion/prodigy, which the tests run (pyproject.toml)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) scripts/demo.py

# Retrain models/tiny/tiny-shapes.safetensors from scratch (a GPU: about 8 minutes; doc/TINY_BASE.md).
tiny-base: $(STAMP)
	$(PY) scripts/train_tiny_base.py --out logs/tiny-base
	@echo "to ship it: cp logs/tiny-base/tiny-shapes.safetensors models/tiny/ and set the printed scale_factor in configs/tiny/*.yaml"

clean-venv:
	rm -rf $(VENV)
