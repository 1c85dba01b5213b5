#!/usr/bin/env bash
# `make run`: the aggregator, its recording worker and an appliance that syncs with it, on
# embedded defaults.
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
    "APP_DATA_DIR": cfg["paths"]["data_dir"], "CAMERA_SOURCE": cfg["camera"]["source"],
    "WEB_ENABLED": "1" if cfg["web"]["enabled"] else "", "WEB_PORT": cfg["web"]["port"],
    "WEB_HOST": cfg["web"]["host"], "ROSTER_REFRESH_S": int(cfg["sync"]["roster_refresh_s"]),
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

# One `make run` per checkout, refused before anything starts. The lock (fd 9) is inherited by
# the aggregator and the appliance, so it is held as long as any of them runs.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DATA/run-local.lock"
    if ! flock -n 9; then
        echo "run-local: \`make run\` is already running here (pid" \
             "$(cat "$DATA/run-local.pid" 2>/dev/null || echo '?')): stop it first (Ctrl-C in" \
             "its terminal), or use the pages it serves ($AGG_URL, the status page)" >&2
        exit 1
    fi
    echo $$ > "$DATA/run-local.pid"
    # an appliance started by hand on the same data directory (`appliance run` locks it too)
    if [ -f "$APP_DATA_DIR/appliance.lock" ] && ! flock -n "$APP_DATA_DIR/appliance.lock" true
    then
        echo "run-local: an appliance is already running on $APP_DATA_DIR (pid" \
             "$(cat "$APP_DATA_DIR/appliance.lock")): stop it first" >&2
        exit 1
    fi
fi
port_free() {  # port_free HOST PORT: nothing listens there
    "$BIN/python" -c 'import socket, sys
s = socket.socket(); s.settimeout(1)
sys.exit(1 if s.connect_ex((sys.argv[1], int(sys.argv[2]))) == 0 else 0)' "$1" "$2"
}
if ! port_free "$AGG_HOST" "$AGG_PORT"; then
    echo "run-local: port $AGG_PORT is already in use (another aggregator?): stop it, or pick" \
         "another one: AGGREGATOR_PORT=8001 make run" >&2
    exit 1
fi

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
STOP_WAIT_S=${RUN_LOCAL_STOP_WAIT_S:-60}
stop_all() {
    trap - INT TERM EXIT
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    # Each component stops within its own bound; whatever still runs after STOP_WAIT_S is
    # stuck: its threads' stacks go to the output (SIGUSR1: faulthandler), then it is killed.
    # The outbox loses nothing (every record is committed before it counts).
    local deadline=$((SECONDS + STOP_WAIT_S)) alive pid
    while :; do
        alive=()
        for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
        if [ "${#alive[@]}" -eq 0 ] || [ "$SECONDS" -ge "$deadline" ]; then break; fi
        sleep 0.2
    done
    for pid in "${alive[@]}"; do
        echo "run-local: process $pid did not stop within $STOP_WAIT_S s: its stacks, then" \
             "killing it" >&2
        kill -USR1 "$pid" 2>/dev/null || true
        sleep 1
        kill -KILL "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

"$BIN/aggregator" serve "${agg_args[@]}" --host "$AGG_HOST" --port "$AGG_PORT" &
pids+=($!)
answers() {  # answers URL: an HTTP server answers there (any status)
    "$BIN/python" -c "import httpx,sys; httpx.get(sys.argv[1], timeout=1)" "$1" 2>/dev/null
}
up=
for _ in $(seq 1 150); do
    if answers "$AGG_URL/health"; then up=1; break; fi
    if ! kill -0 "${pids[0]}" 2>/dev/null; then echo "run-local: aggregator exited" >&2; exit 1; fi
    sleep 0.2
done
if [ -z "$up" ]; then echo "run-local: the aggregator did not answer on $AGG_URL" >&2; exit 1; fi
echo "run-local: aggregator on $AGG_URL (web console at $AGG_URL/, API docs at $AGG_URL/docs)"
echo "run-local: console login: $BIN/aggregator users add NAME --role admin (no default account)"

# A first try should not wait 5 minutes for a class just scheduled: pull every 30 s here.
if [ -z "${APPLIANCE_SYNC__ROSTER_REFRESH_S:-}" ] && [ "$ROSTER_REFRESH_S" -gt 30 ]; then
    export APPLIANCE_SYNC__ROSTER_REFRESH_S=30
    ROSTER_REFRESH_S=30
fi
(
    set -a
    # shellcheck disable=SC1090
    . "$SYNC_ENV"
    set +a
    exec "$BIN/appliance" run "${app_args[@]}"
) &
pids+=($!)
# A worker for recorded sessions (uploaded in the console): without one they stay "queued".
"$BIN/aggregator" worker "${agg_args[@]}" --name "run-local-worker" &
pids+=($!)

# The next steps, once the status page answers (or at once without one).
case "$WEB_HOST" in 0.0.0.0|""|::) SHOWN_HOST=127.0.0.1 ;; *) SHOWN_HOST=$WEB_HOST ;; esac
WEB_URL="http://$SHOWN_HOST:$WEB_PORT"
if [ -n "$WEB_ENABLED" ]; then
    for _ in $(seq 1 300); do
        if answers "$WEB_URL/health" || ! kill -0 "${pids[1]}" 2>/dev/null; then break; fi
        sleep 0.2
    done
    page="$WEB_URL
                log in with this device's key (APPLIANCE_SYNC__API_KEY in $SYNC_ENV),
                or set a password: $BIN/appliance web set-password --data-dir $APP_DATA_DIR"
else
    page="disabled (web.enabled = false)"
fi
if kill -0 "${pids[1]}" 2>/dev/null; then
    agg="$BIN/aggregator"
    conf=${AGG_CONFIG:+ --config $AGG_CONFIG}
    cat <<EOF

run-local: running (and a recording worker). Next steps (Ctrl-C stops them all):
  Status page   $page
  Aggregator    $AGG_URL/docs (the API)
                an admin token for it: $agg admin create-token --name me$conf
  Camera        now: $CAMERA_SOURCE. To use a video instead:
                APPLIANCE_CAMERA__SOURCE=path/to/clip.mp4 APPLIANCE_CAMERA__LOOP_FILE=true make run
                (or camera.source in config/appliance.toml: 0 = first USB camera, rtsp://...)
  First class   $agg schedules add --room $ROOM_ID --course TRY --now$conf
                $agg students add S001 --name "Ada Lovelace" --course TRY$conf
                $agg students consent S001 grant$conf   (recorded before any face data)
                $agg faces encode --batch photos/$conf   (photos/S001.jpg: one face)
                the device pulls the new class and its roster within $ROSTER_REFRESH_S s
  More          README.md, docs/OPERATIONS.md

EOF
fi

# Whichever stops first (or Ctrl-C) stops the other; its exit status is ours.
status=0
wait -n "${pids[@]}" || status=$?
exit "$status"
