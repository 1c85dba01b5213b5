#!/usr/bin/env bash
# The cached arm64 base root file system of the SD card image (Debian bookworm, ~17 min under
# qemu-user on 2 cores). Wi-Fi at first boot needs rfkill (unblock), iw and wireless-regdb (the
# regulatory database: without it the radio stays in the world domain, channels 12-13 and 5 GHz
# DFS channels unusable). unattended-upgrades installs Debian's security suite on the device
# (configured in fleet/image.py; reboots by classroom-reboot.timer, outside class time). Only this script and initramfs-modules are the cache key: a code change
# of the appliance never rebuilds it (the appliance layer goes on top in fleet/image.py).
#   usage: image_build/rootfs.sh OUT_DIR   -> prints the path of OUT_DIR/rootfs-<key>.tar
set -euo pipefail
out_dir=${1:?usage: rootfs.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
key=$(cat "$0" "$here/initramfs-modules" | sha256sum | cut -c1-16)
tarball="$out_dir/rootfs-$key.tar"
if [ -s "$tarball" ]; then echo "$tarball"; exit 0; fi
mkdir -p "$out_dir"
# foreign binaries need binfmt_misc (not mounted when this machine kind starts)
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
fi
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64

# Everything but the kernel in one apt run; the kernel in a second run with INITRD=No so its
# postinst does not build an initramfs that the initramfs-tools trigger then builds again (the
# slowest step under emulation): it is built exactly once, in the last hook, with the modules
# listed in initramfs-modules only (MODULES=most takes over 40 minutes under qemu-user).
base_packages=(
  systemd-sysv udev kmod dbus systemd-timesyncd
  openssh-server sudo
  python3 python3-venv ca-certificates
  wpasupplicant iproute2 iputils-ping rfkill iw wireless-regdb
  cloud-guest-utils fdisk e2fsprogs dosfstools
  initramfs-tools firmware-brcm80211 raspi-firmware
  v4l-utils less
  unattended-upgrades
)
kernel_packages=(linux-image-arm64 systemd-resolved)
tmp="$out_dir/partial-rootfs-$key.tar"
mmdebstrap --arch=arm64 --variant=minbase --components=main,non-free-firmware \
  --include="$(IFS=,; echo "${base_packages[*]}")" \
  --customize-hook='chroot "$1" env DEBIAN_FRONTEND=noninteractive INITRD=No apt-get install -y --no-install-recommends '"${kernel_packages[*]}" \
  --customize-hook='sed -i "s/^MODULES=.*/MODULES=list/" "$1/etc/initramfs-tools/initramfs.conf"' \
  --customize-hook="cp '$here/initramfs-modules' \"\$1/etc/initramfs-tools/modules\"" \
  --customize-hook='chroot "$1" update-initramfs -c -k all' \
  --customize-hook='chroot "$1" apt-get clean' \
  bookworm "$tmp" http://deb.debian.org/debian
mv "$tmp" "$tarball"
echo "$tarball"
