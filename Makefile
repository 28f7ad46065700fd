# Every command the README shows has a target here.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
export PATH := $(abspath $(VENV))/bin:$(PATH)

DEMO_DATA   ?= data/digits
DEMO_OUTPUT ?= output/demo
# make predict: a checkpoint, .mindir or .onnx, and image files / folders / globs (comma-separated)
PREDICT_MODEL  ?= $(DEMO_OUTPUT)/checkpoints/best.ckpt
PREDICT_INPUT  ?= $(DEMO_DATA)/val
PREDICT_OUTPUT ?= $(DEMO_OUTPUT)/predictions.csv

.PHONY: venv venv-test test test-fast lint demo demo-data predict demo-export bench clean

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

# after `make demo`: top-5 classes of the digits val images (or PREDICT_INPUT with PREDICT_MODEL)
predict: venv
	$(PY) infer.py --checkpoint_path=$(PREDICT_MODEL) --input=$(PREDICT_INPUT) --output=$(PREDICT_OUTPUT)

# after `make demo`: the demo checkpoint as MINDIR and ONNX (onnxruntime is a test requirement), each
# classifying the val images and evaluated on them, to compare with the checkpoint's top-1/top-5 above
demo-export: venv-test
	$(PY) eval.py --checkpoint_path=$(DEMO_OUTPUT)/checkpoints/best.ckpt --data_path=$(DEMO_DATA) \
		--output_path=$(DEMO_OUTPUT)/eval_ckpt
	for format in MINDIR ONNX; do \
		$(PY) export.py --checkpoint_path=$(DEMO_OUTPUT)/checkpoints/best.ckpt --file_format=$$format \
			--file_name=$(DEMO_OUTPUT)/coatnet_tiny || exit 1; \
	done
	for ext in mindir onnx; do \
		$(PY) infer.py --checkpoint_path=$(DEMO_OUTPUT)/coatnet_tiny.$$ext --input=$(DEMO_DATA)/val \
			--output=$(DEMO_OUTPUT)/predictions_$$ext.csv > /dev/null || exit 1; \
		$(PY) eval.py --checkpoint_path=$(DEMO_OUTPUT)/coatnet_tiny.$$ext --data_path=$(DEMO_DATA) \
			--output_path=$(DEMO_OUTPUT)/eval_$$ext || exit 1; \
	done

clean:
	rm -rf $(VENV) output data .pytest_cache .ruff_cache
