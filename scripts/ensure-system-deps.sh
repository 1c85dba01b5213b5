#!/usr/bin/env bash
# Install the Debian packages a step needs, if they are missing and we may install them.
#   base: python3-venv (so `python3 -m venv` works on a fresh Debian/Raspberry Pi OS); on a
#         Raspberry Pi also python3-picamera2 (picamera2 needs libcamera's Python bindings,
#         which only Raspberry Pi OS packages; the Makefile then makes the venv with
#         --system-site-packages so it sees them)
#   test: what the test suite drives for real: mosquitto, chromium
set -euo pipefail
what=${1:-base}

need=()
case "$what" in
  base)
    python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv python3-pip)
    if grep -qs "Raspberry Pi" /proc/device-tree/model \
        && [ ! -d /usr/lib/python3/dist-packages/picamera2 ]; then
      need+=(python3-picamera2)
    fi
    ;;
  test)
    command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
    command -v chromium >/dev/null 2>&1 || need+=(chromium)
    ;;
esac
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "missing system packages: ${need[*]} (install them with apt-get; tests that need them will say so)" >&2
  exit 0
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq || true
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
