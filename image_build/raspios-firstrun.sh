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
grep -q '^tmpfs /tmp ' /etc/fstab || echo 'tmpfs /tmp tmpfs defaults,nosuid,nodev,size=128M,mode=1777 0 0' >> /etc/fstab
sed -i -E '/^[^#].*[[:space:]]\/[[:space:]]+ext4/ s/defaults([^,[:space:]]*)/defaults,noatime\1/; s/noatime,noatime/noatime/' /etc/fstab
systemctl enable classroom-firstboot.service classroom-appliance.service \
  classroom-release-confirm.service classroom-console.service ssh.service
# pulled updates (docs/OPERATIONS.md 6.10): the timer and the heartbeat's request
for unit in classroom-update.timer classroom-update.path classroom-reboot.timer; do
  if [ -f "/etc/systemd/system/$unit" ]; then systemctl enable "$unit"; fi
done
rm -rf "$here/bundle"   # frees the FAT partition
sync
exit 0
