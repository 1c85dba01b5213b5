#!/usr/bin/env bash
# Install the Debian packages a step needs, if they are missing and we may install them.
#   base: python3-venv (so `python3 -m venv` works on a fresh Debian/Raspberry Pi OS)
#   test: what the test suite drives for real: mosquitto, chromium
set -euo pipefail
what=${1:-base}

need=()
case "$what" in
  base)
    python3 -c "import ensurepip, venv" 2>/dev/null || need+=(python3-venv python3-pip)
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
