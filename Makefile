# Everything a newcomer needs: `make run` and `make test`. Both set themselves up.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODELS_STAMP := models/files/.fetched
# The suite runs on two pytest-xdist workers, a test file per worker at a time, the longest
# files first (tests/conftest.py orders them): most tests wait on real processes, so two
# workers on two cores take about half the time of one. PYTEST_XDIST= runs it in one process.
PYTEST_XDIST ?= -n 2 --dist loadfile --no-loadscope-reorder
FACE_RECOGNITION := face-recognition==1.3.0
# On a Raspberry Pi, picamera2 and libcamera's bindings come from Raspberry Pi OS's packages
# (python3-picamera2, installed by ensure-system-deps.sh); the venv must see them.
SYSTEM_PICAMERA2 := /usr/lib/python3/dist-packages/picamera2

.PHONY: setup venv models run test lint bench clean help image image-test flash deploy lock

help:
	@echo "make run    - start a local aggregator and the appliance (SQLite, HTTP, no broker)"
	@echo "make test   - set everything up and run the test suite"
	@echo "make lint   - ruff"
	@echo "make bench  - pipeline, recognition, aggregator, cost, scaleout, sync and recordings benchmarks (JSON)"
	@echo "make setup  - venv + packages + models only"
	@echo "make image  - SD card image build/classroom-appliance-<version>-arm64.img.xz (root;"
	@echo "              BASE=raspios-lite.img.xz customises Raspberry Pi OS Lite (trixie; TARGET=bookworm"
	@echo "              for an older one) instead)"
	@echo "make lock   - re-resolve the devices' dependency locks (fleet/locks/, UPGRADE=1: newest)"
	@echo "make flash  - DEVICE=/dev/sdX (or IMAGE_ONLY=out.img) ROOM=LAB-301 AGGREGATOR=https://..."
	@echo "              [WIFI_SSID= WIFI_PSK= WIFI_COUNTRY= NTP= SSH_KEY= HOSTNAME= DEVICE_ID= CAMERA=]"
	@echo "              or DEVICES_CSV=rooms.csv"
	@echo "make deploy - HOSTS=\"pi-lab301 pi-lab302\" [VERSION=... INVENTORY=... LIMIT=4]"
	@echo "make image-test - boot the image under qemu-system-aarch64 and identify a photo in it"

$(STAMP): pyproject.toml scripts/ensure-system-deps.sh
	bash scripts/ensure-system-deps.sh base
	test -x $(BIN)/python || $(PYTHON) -m venv \
		$$(test -d $(SYSTEM_PICAMERA2) && echo --system-site-packages) $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,fleet]'
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
	$(BIN)/python -m pytest $(PYTEST_XDIST) $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check .

bench: setup
	bash scripts/ensure-system-deps.sh bench
	$(BIN)/python -m bench $(BENCH_ARGS)

# --- fleet: image, flash, deploy (docs/OPERATIONS.md) ---------------------------------------------
# HOSTNAME is set by many shells: only a HOSTNAME given on make's command line counts.
FLASH_ARGS = --aggregator "$(AGGREGATOR)" \
	$(if $(ROOM),--room "$(ROOM)") $(if $(DEVICE),--device "$(DEVICE)") \
	$(if $(IMAGE_ONLY),--image-only "$(IMAGE_ONLY)") $(if $(IMAGE),--image "$(IMAGE)") \
	$(if $(DEVICE_ID),--device-id "$(DEVICE_ID)") \
	$(if $(filter command line,$(origin HOSTNAME)),--hostname "$(HOSTNAME)") \
	$(if $(WIFI_SSID),--wifi-ssid "$(WIFI_SSID)") $(if $(SSH_KEY),--ssh-key "$(SSH_KEY)") \
	$(if $(WIFI_COUNTRY),--wifi-country "$(WIFI_COUNTRY)") $(if $(NTP),--ntp "$(NTP)") \
	$(if $(CAMERA),--camera-source "$(CAMERA)") $(if $(DEVICES_CSV),--devices-csv "$(DEVICES_CSV)") \
	$(if $(ADMIN_TOKEN_FILE),--admin-token-file "$(ADMIN_TOKEN_FILE)") \
	$(if $(ADMIN_URL),--admin-url "$(ADMIN_URL)") \
	$(if $(RELEASE_PUBKEY),--release-key "$(RELEASE_PUBKEY)")

lock: venv
	$(BIN)/python -m fleet lock $(if $(UPGRADE),--upgrade)

image: setup
	bash scripts/ensure-system-deps.sh $(if $(BASE),image-base,image)
	$(BIN)/python -m fleet image $(if $(BASE),--base "$(BASE)") $(if $(TARGET),--target "$(TARGET)") \
		$(if $(RELEASE_PUBKEY),--release-key "$(RELEASE_PUBKEY)") $(IMAGE_ARGS)

# WIFI_PSK goes through the environment, not the command line (ps would show it)
flash: setup
	@test -n "$(AGGREGATOR)" || { echo "AGGREGATOR=https://... is required"; exit 2; }
	WIFI_PSK="$(WIFI_PSK)" $(BIN)/python -m fleet flash $(FLASH_ARGS)

deploy: setup
	$(BIN)/python -m fleet deploy --hosts "$(HOSTS)" $(if $(VERSION),--version "$(VERSION)") \
		$(if $(INVENTORY),--inventory "$(INVENTORY)") $(if $(LIMIT),--limit $(LIMIT)) \
		$(if $(SSH_IDENTITY),--identity "$(SSH_IDENTITY)")

image-test: setup
	bash scripts/ensure-system-deps.sh image
	bash scripts/ensure-system-deps.sh image-test
	$(BIN)/python -m fleet image --reuse
	$(BIN)/python -m fleet.imagetest

clean:
	rm -rf $(VENV) models/files data test-output bench-output
