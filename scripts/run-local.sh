#!/usr/bin/env bash
# `make run`: the appliance on embedded defaults (SQLite under ./data, no broker).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${APPLIANCE_CONFIG:-}
if [ -z "$CONFIG" ] && [ -f config/appliance.toml ]; then CONFIG=config/appliance.toml; fi
exec .venv/bin/appliance run ${CONFIG:+--config "$CONFIG"}
