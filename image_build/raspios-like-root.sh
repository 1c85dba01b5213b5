#!/usr/bin/env bash
# A Debian trixie arm64 root file system shaped like Raspberry Pi OS Lite (trixie): Python 3.13
# with the OS's numpy, NetworkManager, user `pi`, /boot/firmware with cmdline.txt. The Raspberry
# Pi OS path (make image BASE=...: raspios-firstrun.sh) is proven in it under qemu-user
# (python -m fleet.raspios_chroot). Raspberry Pi OS's own images cannot be fetched here (not a
# package registry); its packages are Debian's for everything the appliance touches, except
# python3-picamera2/libcamera (Raspberry Pi's archive: on a real Pi only).
# Cached like the base root file system, keyed on this script.
#   usage: image_build/raspios-like-root.sh OUT_DIR   -> prints the tarball's path
set -euo pipefail
out_dir=${1:?usage: raspios-like-root.sh OUT_DIR}
key=$(sha256sum "$0" | cut -c1-16)
tarball="$out_dir/raspios-like-trixie-$key.tar"
if [ -f "$tarball" ] && [ -s "$tarball" ]; then echo "$tarball"; exit 0; fi
mkdir -p "$out_dir"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
packages=(systemd-sysv udev kmod dbus sudo ca-certificates python3 python3-venv python3-numpy
  network-manager systemd-timesyncd openssh-server iw rfkill wireless-regdb)
# --format=tar: mmdebstrap picks the format from the name, and "X.tar.partial" made a directory
mmdebstrap --arch=arm64 --variant=minbase --format=tar --include="$(IFS=,; echo "${packages[*]}")" \
  --customize-hook='chroot "$1" useradd --create-home --groups sudo,video --shell /bin/bash pi' \
  --customize-hook='mkdir -p "$1/boot/firmware"' \
  --customize-hook='echo "console=serial0,115200 console=tty1 root=PARTUUID=00000000-02 rootfstype=ext4 fsck.repair=yes rootwait" > "$1/boot/firmware/cmdline.txt"' \
  --customize-hook='chroot "$1" apt-get clean' \
  trixie "$out_dir/partial-raspios-like-$key.tar" http://deb.debian.org/debian >&2
mv "$out_dir/partial-raspios-like-$key.tar" "$tarball"
echo "$tarball"
