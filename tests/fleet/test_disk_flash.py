"""Partition layout, image assembly, flash customisation (IMAGE_ONLY) and first boot, checked
with the real tools: sfdisk, fsck.vfat, e2fsck, debugfs, mtools."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest
from pydantic import ValidationError

from cloud_sync import release_manifest as rm
from fleet import disk, firstboot
from fleet.flash import CardRequest, FlashError, check_device, flash, image_size, read_csv
from fleet.settings import SETTINGS_FILE, DeviceSettings, dump, load
from tests.fleet.conftest import Aggregator, fabricated_root

SSH_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBd2pF1Yq3k0mY4s6n5x0Zc4ZfS0oJ0Qk6b6m3t2v8wQ "
           "tech@laptop")


def sh(*cmd: str, ok: tuple[int, ...] = (0,)) -> str:
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert result.returncode in ok, f"{cmd}: {result.returncode} {result.stderr}{result.stdout}"
    return result.stdout


def partition_file(image: Path, part: disk.Partition, dest: Path) -> Path:
    disk.extract_partition(image, part, dest)
    return dest


def test_layout_follows_raspberry_pi_os() -> None:
    layout = disk.plan_layout(256 * disk.MIB, 1000 * disk.MIB + 1)
    assert layout.boot.start == 8192  # 4 MiB, like Raspberry Pi OS
    assert layout.boot.size == 256 * disk.MIB // 512
    assert layout.root.start == 8192 + layout.boot.size
    assert layout.root.start % 8192 == 0 and layout.root.size % 8192 == 0
    assert layout.root.size * 512 >= 1000 * disk.MIB + 1  # rounded up, never down
    odd = disk.plan_layout(3 * disk.MIB, disk.MIB)
    assert odd.boot.size == 8192 and odd.root.start == 16384


def test_assembled_image_checks_clean(tmp_path: Path) -> None:
    root = fabricated_root(tmp_path / "root")
    (root / "etc/classroom-attendance").mkdir()
    (root / "etc/classroom-attendance/secret").write_text("s")
    (root / "etc/classroom-attendance/secret").chmod(0o600)
    boot = tmp_path / "boot"
    (boot / "overlays").mkdir(parents=True)
    (boot / "config.txt").write_text("arm_64bit=1\n")
    (boot / "overlays/README").write_text("x")
    image = tmp_path / "out.img"
    layout = disk.assemble(image, boot, root, boot_bytes=40 * disk.MIB,
                           root_bytes=20 * disk.MIB, workdir=tmp_path)
    table = json.loads(sh("sfdisk", "--json", str(image)))["partitiontable"]
    assert table["label"] == "dos"
    parts = table["partitions"]
    assert [(p["start"], p["size"], p["type"]) for p in parts] == [
        (layout.boot.start, layout.boot.size, "c"), (layout.root.start, layout.root.size, "83")]
    assert parts[0].get("bootable") is True
    assert image.stat().st_size == layout.total_bytes
    fat = partition_file(image, layout.boot, tmp_path / "p1")
    sh("fsck.vfat", "-n", str(fat))
    assert disk.fat_label(image, layout.boot) == "bootfs"
    assert sorted(disk.fat_list(image, layout.boot)) == ["config.txt", "overlays"]
    assert disk.fat_read(image, layout.boot, "overlays/README") == b"x"
    ext4 = partition_file(image, layout.root, tmp_path / "p2")
    sh("e2fsck", "-f", "-n", str(ext4))
    assert sh("e2label", str(ext4)).strip() == "rootfs"
    assert sh("debugfs", "-R", "cat /etc/hostname", str(ext4)) == "debian\n"
    mode = sh("debugfs", "-R", "stat /etc/classroom-attendance/secret", str(ext4))
    assert "Mode:  0600" in mode and "User:     0" in mode
    assert "Fast link dest: \"python3\"" in sh("debugfs", "-R", "stat /usr/bin/python", str(ext4))


RELEASE_PUB = rm.generate_keypair()[1].decode()


def test_flash_image_only_writes_settings_and_first_boot_applies_them(
        tmp_path: Path, small_image: tuple[Path, disk.Layout], aggregator: Aggregator) -> None:
    xz, layout = small_image
    out = tmp_path / "card.img"
    settings = flash(xz, CardRequest(room_id="LAB-301", wifi_ssid="school", wifi_psk="s3cret-psk",
                                     wifi_country="GB", ntp=["ntp.school.lan", "10.0.0.1"],
                                     ssh_key=SSH_KEY + "\n", release_keys=[RELEASE_PUB]),
                     aggregator=aggregator.url, admin_token=aggregator.admin_token,
                     image_only=out, client=aggregator.client)
    assert settings.device_id == "pi-lab-301" and settings.hostname == "pi-lab-301"
    # the card: same table, both file systems clean, the settings file in the FAT partition
    assert disk.read_layout(out) == layout
    assert out.stat().st_size == image_size(xz)
    sh("fsck.vfat", "-n", str(partition_file(out, layout.boot, tmp_path / "p1")))
    sh("e2fsck", "-f", "-n", str(partition_file(out, layout.root, tmp_path / "p2")))
    text = disk.fat_read(out, layout.boot, SETTINGS_FILE).decode()
    on_card = load(text)
    key = on_card.device_key.get_secret_value()
    assert key.startswith("dev_") or len(key) >= 16
    # the key works at the aggregator (it was issued by it, not typed)
    ok = aggregator.client.get("/api/v1/schedule", params={"room_id": "LAB-301"},
                               headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200, ok.text
    assert on_card.ssh_authorized_keys == [SSH_KEY]

    # first boot, on a root tree holding that FAT content
    root = fabricated_root(tmp_path / "device")
    (root / "boot/firmware" / SETTINGS_FILE).write_text(text)
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert report.provisioned, report.missing
    assert not (root / "boot/firmware" / SETTINGS_FILE).exists()  # secrets off the FAT
    conf = root / "etc/classroom-attendance/appliance.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    from appliance.config import load as load_appliance_settings

    applied = load_appliance_settings(conf)  # the appliance's own settings model reads it
    assert applied.sync.api_key is not None and applied.sync.api_key.get_secret_value() == key
    assert (applied.device.device_id, applied.device.room_id) == ("pi-lab-301", "LAB-301")
    assert str(applied.sync.aggregator_url).rstrip("/") == "http://testserver"
    assert applied.web.host == "0.0.0.0"
    wpa = root / "etc/wpa_supplicant/wpa_supplicant-wlan0.conf"
    assert stat.S_IMODE(wpa.stat().st_mode) == 0o600 and 'psk="s3cret-psk"' in wpa.read_text()
    assert "country=GB" in wpa.read_text()  # the flashed country, not a hard-coded one
    regdom = (root / "etc/modprobe.d/classroom-wifi.conf").read_text()
    assert "ieee80211_regdom=GB" in regdom
    timesyncd = (root / "etc/systemd/timesyncd.conf.d/50-classroom.conf").read_text()
    assert "NTP=ntp.school.lan 10.0.0.1" in timesyncd
    assert (root / "etc/hostname").read_text() == "pi-lab-301\n"
    assert "127.0.1.1\tpi-lab-301" in (root / "etc/hosts").read_text()
    assert (root / "root/.ssh/authorized_keys").read_text() == SSH_KEY + "\n"
    # the flashed release key, where the device's updater reads its trusted keys
    trusted = rm.load_public_keys([root / "etc/classroom-attendance/release-keys"])
    assert list(trusted) == [rm.key_id(rm.load_public_key(RELEASE_PUB.encode()))]
    status = json.loads((root / "var/lib/classroom-attendance/provisioning.json").read_text())
    assert status["provisioned"] is True and status["device_id"] == "pi-lab-301"
    assert "schedule pulled" in status["steps"]["aggregator"]

    # flashing a second card for the same device issues a new key; the first one stops working
    flash(xz, CardRequest(room_id="LAB-301"), aggregator=aggregator.url,
          admin_token=aggregator.admin_token, image_only=tmp_path / "card2.img",
          client=aggregator.client)
    refused = aggregator.client.get("/api/v1/schedule", params={"room_id": "LAB-301"},
                                    headers={"Authorization": f"Bearer {key}"})
    assert refused.status_code == 401


def test_first_boot_reports_what_is_missing(tmp_path: Path, aggregator: Aggregator) -> None:
    root = fabricated_root(tmp_path / "device")
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert not report.provisioned and "no classroom-device.toml" in report.missing[0]
    (root / "boot/firmware" / SETTINGS_FILE).write_text(
        'device_id = "pi-x"\nroom_id = "LAB-301"\naggregator_url = "http://testserver"\n'
        'device_key = "dev_wrong_wrong_wrong_key"\nhostname = "pi-x"\n')
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert not report.provisioned
    assert report.missing == ["aggregator: answered 401"]
    status = json.loads((root / "var/lib/classroom-attendance/provisioning.json").read_text())
    assert status["missing"] == ["aggregator: answered 401"]
    # the next boot checks the aggregator again with the settings now in /etc
    again = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert again.missing == ["aggregator: answered 401"] and not again.provisioned
    key = aggregator.client.post("/api/v1/devices", json={"id": "pi-x", "room_id": "LAB-301"},
                                 headers=aggregator.admin()).json()["api_key"]
    conf = root / "etc/classroom-attendance/appliance.toml"
    conf.write_text(conf.read_text().replace("dev_wrong_wrong_wrong_key", key))
    assert firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client).provisioned
    (root / "boot/firmware" / SETTINGS_FILE).write_text('device_id = "bad id!"\n')
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert report.steps["settings"].startswith("failed: classroom-device.toml is invalid")


def test_wifi_needs_a_country_and_a_failed_step_keeps_the_settings(
        tmp_path: Path, small_image: tuple[Path, disk.Layout], aggregator: Aggregator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """WIFI_COUNTRY is asked for with an SSID (no hard-coded country); and a first boot whose
    Wi-Fi step dies keeps classroom-device.toml on the FAT partition, so the next boot applies
    the settings (SSH key included) again, instead of booting unprovisioned for good."""
    xz, _ = small_image
    with pytest.raises(ValidationError, match="wifi_country"):
        flash(xz, CardRequest(room_id="LAB-301", wifi_ssid="school"), aggregator=aggregator.url,
              admin_token=aggregator.admin_token, image_only=tmp_path / "c.img",
              client=aggregator.client)
    settings = dump(load_settings_dict(wifi_ssid="school", wifi_country="DE"))
    root = fabricated_root(tmp_path / "device")
    card = root / "boot/firmware" / SETTINGS_FILE
    card.write_text(settings)

    def broken(*_args: object) -> None:
        raise FileNotFoundError(2, "No such file or directory", "rfkill")

    monkeypatch.setattr(firstboot, "_wifi", broken)
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert not report.provisioned
    assert report.missing[0].startswith("wifi: FileNotFoundError")
    assert card.exists()  # kept: the next boot tries again
    assert (root / "root/.ssh/authorized_keys").exists()  # the other steps still ran
    monkeypatch.undo()
    report = firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    assert "wifi" not in " ".join(report.missing)
    assert not card.exists()


def load_settings_dict(**extra: object) -> DeviceSettings:
    return DeviceSettings.model_validate({
        "device_id": "pi-w", "room_id": "LAB-301", "aggregator_url": "http://testserver",
        "device_key": "dev_" + "k" * 20, "hostname": "pi-w",
        "ssh_authorized_keys": [SSH_KEY], **extra})


def test_flash_refuses_bad_targets_and_input(tmp_path: Path,
                                             small_image: tuple[Path, disk.Layout],
                                             aggregator: Aggregator) -> None:
    xz, _ = small_image
    with pytest.raises(FlashError, match="not a block device"):
        check_device(tmp_path, 1)
    with pytest.raises(FlashError, match="does not exist"):
        check_device(tmp_path / "sdz", 1)
    system = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "/"], capture_output=True,
                            text=True, check=False).stdout.strip()
    if system.startswith("/dev/") and Path(system).is_block_device():
        parent = subprocess.run(["lsblk", "-n", "-o", "PKNAME", system], capture_output=True,
                                text=True, check=False).stdout.strip()
        whole = Path(f"/dev/{parent}") if parent else Path(system)
        with pytest.raises(FlashError, match=r"mounted|running system|not a whole disk"):
            check_device(whole, 1)
    with pytest.raises(FlashError, match="refused the admin token"):
        flash(xz, CardRequest(room_id="LAB-301"), aggregator=aggregator.url,
              admin_token="adm_not_a_token", image_only=tmp_path / "x.img",
              client=aggregator.client)
    with pytest.raises(FlashError, match="refused device"):
        flash(xz, CardRequest(room_id="NO-SUCH-ROOM"), aggregator=aggregator.url,
              admin_token=aggregator.admin_token, image_only=tmp_path / "x.img",
              client=aggregator.client)
    assert not (tmp_path / "x.img").exists()  # nothing written before the key was issued
    rooms = tmp_path / "rooms.csv"
    rooms.write_text("room_id,device_id,wifi_ssid\nLAB-301,pi-a,net\nLAB-302,,\n")
    cards = read_csv(rooms)
    assert [(c.room_id, c.resolved_id(), c.wifi_ssid) for c in cards] == [
        ("LAB-301", "pi-a", "net"), ("LAB-302", "pi-lab-302", None)]


def test_health_says_whether_provisioned(tmp_path: Path, aggregator: Aggregator) -> None:
    from appliance.health import DEGRADED, HEALTHY, NOT_CONFIGURED, check_provisioning

    data = tmp_path / "device/var/lib/classroom-attendance"
    assert check_provisioning(data).status == NOT_CONFIGURED  # installed by hand
    root = fabricated_root(tmp_path / "device")
    firstboot.provision(root, wait_s=0, grow=False, client=aggregator.client)
    state = check_provisioning(data)
    assert state.status == DEGRADED
    assert state.message.startswith("not provisioned: settings: no classroom-device.toml")
    (data / "provisioning.json").write_text(json.dumps({"provisioned": True, "missing": []}))
    assert check_provisioning(data).status == HEALTHY


def test_batch_prompts_for_each_card(tmp_path: Path, small_image: tuple[Path, disk.Layout],
                                     aggregator: Aggregator) -> None:
    from fleet.flash import flash_batch

    xz, layout = small_image
    rooms = tmp_path / "rooms.csv"
    rooms.write_text("room_id,device_id\nLAB-301,pi-a\nLAB-302,pi-b\nLAB-301,pi-c\n")
    answers = iter(["", "s", "q"])
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return next(answers)

    out = tmp_path / "cards"
    done = flash_batch(xz, read_csv(rooms), aggregator=aggregator.url,
                       admin_token=aggregator.admin_token, image_only_dir=out, prompt=prompt,
                       defaults=CardRequest(room_id="", wifi_ssid="school", wifi_country="IE"),
                       client=aggregator.client)
    assert done == ["pi-a"]
    assert asked[0].startswith("[1/3] insert the card for LAB-301 (pi-a)")
    assert len(asked) == 3  # skipped pi-b, quit before pi-c
    assert sorted(p.name for p in out.iterdir()) == ["pi-a.img"]
    settings = load(disk.fat_read(out / "pi-a.img", layout.boot, SETTINGS_FILE).decode())
    assert settings.wifi_ssid == "school"  # the command line's value fills empty columns
    assert settings.wifi_country == "IE"
