#!/usr/bin/env bash
# Install the Debian packages a step needs, if they are missing and we may install them.
#   base: python3-venv (so `python3 -m venv` works on a fresh Debian/Raspberry Pi OS); on a
#         Raspberry Pi also python3-picamera2 (picamera2 needs libcamera's Python bindings,
#         which only Raspberry Pi OS packages; the Makefile then makes the venv with
#         --system-site-packages so it sees them)
#   test: what the test suite drives for real: mosquitto, chromium, ffmpeg (recorded
#         sessions: upload check, browser copy); for the fleet tests the disk
#         tools (sfdisk, mkfs.vfat/fsck.vfat, mtools, mkfs.ext4/e2fsck/debugfs, xz), sshd and
#         ssh-keygen (two test hosts), systemd-analyze; depmod (kmod: the initramfs check indexes
#         the image's kernel package); libfaketime (faketime: the device restarted "tomorrow"
#         without its aggregator, test_offline_restart_e2e)
#   image: make image (Debian arm64 from this machine): mmdebstrap, qemu-user-static and
#         binfmt-support (foreign binaries), arch-test, and the disk tools
#   image-base: make image BASE=... (no foreign code runs): the disk tools
#   image-test: qemu-system-aarch64 with its option ROMs (ipxe-qemu: efi-virtio.rom for the
#         virtio NIC, a Recommends that --no-install-recommends would skip), ssh, and mmdebstrap
#         (the trixie tool root with QEMU >= 9 for the raspi4b boot)
#   bench: wrk (make bench's load generator: costs the server nothing it would not pay anyway)
set -euo pipefail
what=${1:-base}

need=()
disk_tools() {
  for pair in sfdisk:fdisk mkfs.vfat:dosfstools fsck.vfat:dosfstools mcopy:mtools \
      mkfs.ext4:e2fsprogs debugfs:e2fsprogs xz:xz-utils lsblk:util-linux; do
    tool=${pair%%:*}
    command -v "$tool" >/dev/null 2>&1 || [ -x "/sbin/$tool" ] || [ -x "/usr/sbin/$tool" ] \
      || need+=("${pair#*:}")
  done
}
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
    command -v ffmpeg >/dev/null 2>&1 || need+=(ffmpeg)
    disk_tools
    [ -x /usr/sbin/sshd ] || need+=(openssh-server)
    command -v ssh-keygen >/dev/null 2>&1 || need+=(openssh-client)
    command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
    command -v depmod >/dev/null 2>&1 || [ -x /sbin/depmod ] || need+=(kmod)
    ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || need+=(faketime)
    ;;
  image)
    disk_tools
    command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
    command -v arch-test >/dev/null 2>&1 || need+=(arch-test)
    [ -x /usr/bin/qemu-aarch64-static ] || need+=(qemu-user-static binfmt-support)
    command -v useradd >/dev/null 2>&1 || need+=(passwd)
    ;;
  image-base)
    disk_tools
    ;;
  bench)
    command -v wrk >/dev/null 2>&1 || need+=(wrk)
    ;;
  image-test)
    disk_tools
    command -v qemu-system-aarch64 >/dev/null 2>&1 || need+=(qemu-system-arm)
    [ -e /usr/lib/ipxe/qemu/efi-virtio.rom ] || need+=(ipxe-qemu)
    # the raspi4b boot needs QEMU >= 9: a trixie tool root made by mmdebstrap (toolroot.sh)
    command -v mmdebstrap >/dev/null 2>&1 || need+=(mmdebstrap)
    command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
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
# Wait for another apt (unattended-upgrades on a fresh Raspberry Pi OS, a second checkout's
# `make test`) instead of failing at once on the dpkg lock.
APT=(apt-get -o DPkg::Lock::Timeout=600)
$SUDO "${APT[@]}" update -qq || true
$SUDO "${APT[@]}" install -y -qq --no-install-recommends "${need[@]}" >/dev/null
