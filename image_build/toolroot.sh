#!/usr/bin/env bash
# A Debian trixie tool root for this machine's architecture with QEMU >= 9 (trixie: 10.0), whose
# raspi4b machine boots the image the way a Raspberry Pi 4 does (make image-test's Pi 4 boot).
# This machine's own qemu (bookworm: 7.2) has no raspi4b. Nothing is installed on this machine:
# the tools run from the directory through its own dynamic loader (fleet/raspi4b.py), no chroot,
# no root needed to run them. Cached like the base root file system, keyed on this script.
#   usage: image_build/toolroot.sh OUT_DIR   -> prints the tool root's directory
set -euo pipefail
out_dir=${1:?usage: toolroot.sh OUT_DIR}
key=$(sha256sum "$0" | cut -c1-16)
root="$out_dir/toolroot-trixie-$key"
if [ -e "$root/.complete" ]; then echo "$root"; exit 0; fi
mkdir -p "$out_dir"
rm -rf "$root" "$root.partial"
# --variant=essential: no apt inside, only what qemu-system-arm needs (about 1 minute, native)
mmdebstrap --variant=essential --include=qemu-system-arm,qemu-system-data \
  --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
  trixie "$root.partial" http://deb.debian.org/debian >&2

mv "$root.partial" "$root"
touch "$root/.complete"
echo "$root"
