#!/bin/bash
# Installed by `make image BASE=...` on a Raspberry Pi OS Lite card: runs once, the way Raspberry
# Pi Imager's first-run customisation does (systemd.run= on the kernel command line), installs the
# appliance from the offline bundle beside this script, then reboots into the normal system, where
# classroom-firstboot.service applies the card's settings (make flash).
set -eu
here=$(dirname "$(readlink -f "$0")")
boot=$(dirname "$here")
# never run twice: drop our arguments from the kernel command line first
sed -i 's| systemd\.run=[^ ]*||; s| systemd\.run_success_action=[^ ]*||; s| systemd\.unit=kernel-command-line\.target||' "$boot/cmdline.txt"
id attendance >/dev/null 2>&1 || useradd --system --user-group --groups video \
  --home-dir /var/lib/classroom-attendance --no-create-home --shell /usr/sbin/nologin attendance
mkdir -p /etc/classroom-attendance
# --system-site-packages: the venv sees the OS's python3-picamera2 (the Pi camera)
sh "$here/bundle/install-release.sh" "$here/bundle" /opt/classroom-attendance --system-site-packages
version=$(cat "$here/bundle/VERSION")
ln -sfn "releases/$version" /opt/classroom-attendance/current
# the installed release's bundle, kept as `appliance update` keeps it (the next update reuses its
# files by sha256, a revert its units); the dependency wheels are installed already (deps layer)
mkdir -p /opt/classroom-attendance/bundles
cp -R "$here/bundle" "/opt/classroom-attendance/bundles/$version"
find "/opt/classroom-attendance/bundles/$version/wheels" -name '*.whl' ! -name 'classroom_attendance-*' -delete
for unit in "$here"/bundle/systemd/classroom-*.service "$here"/bundle/systemd/classroom-*.timer \
    "$here"/bundle/systemd/classroom-*.path; do
  if [ -f "$unit" ]; then install -m 0644 "$unit" /etc/systemd/system/; fi
done
rm -f /etc/systemd/system/classroom-aggregator*.service
mkdir -p /etc/systemd/journald.conf.d
install -m 0644 "$here/journald.conf" /etc/systemd/journald.conf.d/50-classroom-sdcard.conf
mkdir -p /etc/systemd/system.conf.d
install -m 0644 "$here/watchdog.conf" /etc/systemd/system.conf.d/50-classroom-watchdog.conf
# security updates (docs/OPERATIONS.md, Raspberry Pi OS): unattended-upgrades from the OS's own
# archives with the Debian image's policy, written beside this script from fleet/image.py's
# UNATTENDED (Debian's security suite and Raspberry Pi's kernel/firmware, never rebooting by
# itself: classroom-reboot.timer reboots outside class time)
install -m 0644 "$here/unattended-upgrades.conf" /etc/apt/apt.conf.d/52classroom-unattended-upgrades
install -m 0644 "$here/auto-upgrades.conf" /etc/apt/apt.conf.d/20auto-upgrades
if ! grep -rqs 'debian-security' /etc/apt/sources.list /etc/apt/sources.list.d/; then
  codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
  keyring=/usr/share/keyrings/debian-archive-keyring.gpg
  signed=""; if [ -f "$keyring" ]; then signed="[signed-by=$keyring] "; fi
  echo "deb ${signed}http://security.debian.org/debian-security $codename-security main" \
    > /etc/apt/sources.list.d/debian-security.list
fi
# the first run usually has a network (Ethernet, or Imager's Wi-Fi); when it has none (Wi-Fi from
# make flash comes at the next boot), classroom-unattended-install.service installs it once
# online, at a later boot (a no-op once /usr/bin/unattended-upgrade exists)
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends \
    unattended-upgrades >/dev/null 2>&1; then
  echo "unattended-upgrades installed"
else
  echo "unattended-upgrades: no archive reachable, installed later by classroom-unattended-install.service"
fi
grep -q '^tmpfs /tmp ' /etc/fstab || echo 'tmpfs /tmp tmpfs defaults,nosuid,nodev,size=128M,mode=1777 0 0' >> /etc/fstab
sed -i -E '/^[^#].*[[:space:]]\/[[:space:]]+ext4/ s/defaults([^,[:space:]]*)/defaults,noatime\1/; s/noatime,noatime/noatime/' /etc/fstab
systemctl enable classroom-firstboot.service classroom-appliance.service \
  classroom-release-confirm.service classroom-console.service ssh.service
# pulled updates (docs/OPERATIONS.md 6.10): the timer and the heartbeat's request; security
# updates' reboots outside class time; unattended-upgrades' deferred install
for unit in classroom-update.timer classroom-update.path classroom-reboot.timer \
    classroom-unattended-install.service; do
  if [ -f "/etc/systemd/system/$unit" ]; then systemctl enable "$unit"; fi
done
rm -rf "$here/bundle"   # frees the FAT partition
sync
exit 0
