#!/usr/bin/env bash
# `make run`: the aggregator and an appliance that syncs with it, on embedded defaults.
#
# - The aggregator runs on this machine: SQLite under ./data/aggregator, on
#   127.0.0.1:${AGGREGATOR_PORT:-8000}.
# - On first run the appliance's room is created at the aggregator and a device key is made for
#   it; the key is written to data/local-sync.env (mode 600, gitignored) and never printed.
# - The appliance syncs with it over HTTP: no broker needed. With an MQTT URL configured
#   (appliance `sync.mqtt_url` and aggregator `mqtt_url`, in their TOML files or environment),
#   both use MQTT.
# - If the appliance config points at another aggregator (sync.aggregator_url), only the
#   appliance is started. Ctrl-C stops both.
#
# Config files: config/appliance.toml and config/aggregator.toml if present (or
# APPLIANCE_CONFIG / AGGREGATOR_CONFIG).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
DATA=data
SYNC_ENV=$DATA/local-sync.env

APP_CONFIG=${APPLIANCE_CONFIG:-}
if [ -z "$APP_CONFIG" ] && [ -f config/appliance.toml ]; then APP_CONFIG=config/appliance.toml; fi
AGG_CONFIG=${AGGREGATOR_CONFIG:-}
if [ -z "$AGG_CONFIG" ] && [ -f config/aggregator.toml ]; then AGG_CONFIG=config/aggregator.toml; fi
app_args=(${APP_CONFIG:+--config "$APP_CONFIG"})
agg_args=(${AGG_CONFIG:+--config "$AGG_CONFIG"})

# The appliance's identity and sync settings, as its own config loader sees them.
eval "$("$BIN/appliance" config show "${app_args[@]}" | "$BIN/python" -c '
import json, shlex, sys
cfg = json.load(sys.stdin)
for name, value in {
    "DEVICE_ID": cfg["device"]["device_id"], "ROOM_ID": cfg["device"]["room_id"],
    "SITE": cfg["device"]["site"], "TIMEZONE": cfg["device"]["timezone"],
    "CONFIGURED_URL": cfg["sync"]["aggregator_url"] or "",
}.items():
    print(f"{name}={shlex.quote(str(value))}")
')"

if [ -n "$CONFIGURED_URL" ]; then
    echo "run-local: sync.aggregator_url is set ($CONFIGURED_URL): starting the appliance only"
    exec "$BIN/appliance" run "${app_args[@]}"
fi

AGG_HOST=127.0.0.1
AGG_PORT=${AGGREGATOR_PORT:-8000}
AGG_URL="http://$AGG_HOST:$AGG_PORT"
mkdir -p "$DATA"

if [ ! -f "$SYNC_ENV" ]; then
    echo "run-local: first run: registering $DEVICE_ID in room $ROOM_ID at the local aggregator"
    "$BIN/aggregator" db upgrade "${agg_args[@]}"
    rooms_csv=$(mktemp)
    trap 'rm -f "$rooms_csv"' EXIT
    printf 'id,name,site,timezone\n%s,%s,%s,%s\n' "$ROOM_ID" "$ROOM_ID" "$SITE" "$TIMEZONE" \
        > "$rooms_csv"
    "$BIN/aggregator" import rooms "$rooms_csv" "${agg_args[@]}"
    rm -f "$rooms_csv"
    trap - EXIT
    if ! added=$("$BIN/aggregator" devices add --room "$ROOM_ID" --id "$DEVICE_ID" \
                 "${agg_args[@]}" 2>/dev/null); then
        echo "run-local: could not register $DEVICE_ID (already registered without" \
             "$SYNC_ENV?); delete it at the aggregator or restore the file" >&2
        exit 1
    fi
    key=$(printf '%s\n' "$added" | sed -n 's/^api_key: //p')
    if [ -z "$key" ]; then echo "run-local: no api_key in the aggregator's answer" >&2; exit 1; fi
    (
        umask 077
        printf '# Written by scripts/run-local.sh: the local device key (secret).\n' > "$SYNC_ENV"
        printf 'APPLIANCE_SYNC__AGGREGATOR_URL=%s\n' "$AGG_URL" >> "$SYNC_ENV"
        printf 'APPLIANCE_SYNC__API_KEY=%s\n' "$key" >> "$SYNC_ENV"
    )
    unset key added
    echo "run-local: device key stored in $SYNC_ENV"
fi

pids=()
stop_all() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

"$BIN/aggregator" serve "${agg_args[@]}" --host "$AGG_HOST" --port "$AGG_PORT" &
pids+=($!)
for _ in $(seq 1 100); do
    if "$BIN/python" -c "import httpx,sys; httpx.get(sys.argv[1], timeout=1)" "$AGG_URL/health" \
        2>/dev/null; then break; fi
    if ! kill -0 "${pids[0]}" 2>/dev/null; then echo "run-local: aggregator exited" >&2; exit 1; fi
    sleep 0.2
done
echo "run-local: aggregator on $AGG_URL (API docs at $AGG_URL/docs)"

(
    set -a
    # shellcheck disable=SC1090
    . "$SYNC_ENV"
    set +a
    exec "$BIN/appliance" run "${app_args[@]}"
) &
pids+=($!)

# Whichever stops first (or Ctrl-C) stops the other.
wait -n "${pids[@]}" || true
