# Every command the README shows has a target here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

DEMO_DATA   ?= data/digits
DEMO_OUTPUT ?= output/demo

.PHONY: venv venv-test test test-fast lint demo demo-data bench clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-test: requirements.txt requirements-test.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

venv: $(VENV)/.installed
venv-test: $(VENV)/.installed-test

lint: venv-test
	$(PY) -m ruff check .

test: venv-test lint
	$(PY) -m pytest -q tests

demo-data: venv
	$(PY) scripts/prepare_demo_data.py --output $(DEMO_DATA)

demo: demo-data
	$(PY) train.py --config_path=configs/demo.yaml --data_path=$(DEMO_DATA) --output_path=$(DEMO_OUTPUT)
	$(PY) eval.py --config_path=configs/demo.yaml --data_path=$(DEMO_DATA) --output_path=$(DEMO_OUTPUT) \
		--checkpoint_path=$(DEMO_OUTPUT)/checkpoints/best.ckpt
	$(PY) scripts/plot_metrics.py $(DEMO_OUTPUT)/metrics.jsonl $(DEMO_OUTPUT)/curves.png
	@echo "checkpoint: $(DEMO_OUTPUT)/checkpoints/best.ckpt  curves: $(DEMO_OUTPUT)/curves.png"

clean:
	rm -rf $(VENV) output data .pytest_cache .ruff_cache
