# Everything a newcomer needs: `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS_STAMP := models/files/.fetched
FACE_RECOGNITION := face-recognition==1.3.0
# On a Raspberry Pi, picamera2 and libcamera's bindings come from Raspberry Pi OS's packages
# (python3-picamera2, installed by ensure-system-deps.sh); the venv must see them.
SYSTEM_PICAMERA2 := /usr/lib/python3/dist-packages/picamera2

.PHONY: setup venv models run test lint bench clean help

help:
	@echo "make run    - start a local aggregator and the appliance (SQLite, HTTP, no broker)"
	@echo "make test   - set everything up and run the test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - pipeline, recognition, aggregator and sync benchmarks (JSON)"
	@echo "make setup  - venv + packages + models only"

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	bash scripts/ensure-system-deps.sh base
	test -x $(BIN)/python || $(PYTHON) -m venv \
		$$(test -d $(SYSTEM_PICAMERA2) && echo --system-site-packages) $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	# face_recognition's metadata asks for the dlib sdist (a long source build); dlib-bin,
	# installed above, already provides the dlib module, so install it without its deps.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(FACE_RECOGNITION)
	$(BIN)/python -c "import dlib, cv2, face_recognition; print('dlib', dlib.__version__, 'opencv', cv2.__version__)"
	touch $@

venv: $(STAMP)

$(MODELS_STAMP): $(STAMP) models/manifest.toml
	$(BIN)/appliance models fetch --model-dir models/files
	touch $@

models: $(MODELS_STAMP)

setup: venv models

run: setup
	bash scripts/run-local.sh

test: setup
	bash scripts/ensure-system-deps.sh test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) models/files data test-output bench-output
