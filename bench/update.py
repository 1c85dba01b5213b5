"""Bytes a device downloads for a pulled update that changes only the project's own wheel.

Two bundles of this tree (``platform=native``, the build cache of ``make image``) that differ
only in their version (so in the project wheel and VERSION); an aggregator app (in process,
SQLite) holding the second, signed; a device prefix holding the first bundle as a flashed card
keeps it. The device's updater (``appliance.update.updater``, the code of ``appliance update
check``) downloads what it lacks; the figure is the bytes of the bodies it received (manifest,
signature and files; HTTP headers excluded), against the whole bundle (what a device without
the previous bundle, or ``make deploy`` before sha256 dedup, would get) measured in the same
run. Nothing is installed (the download is the figure).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from cloud_sync import release_manifest as rm


def run() -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from appliance import config as appliance_config
    from appliance.update.manager import ReleaseManager
    from appliance.update.updater import Updater
    from cloud_sync.aggregator import config as aggregator_config
    from cloud_sync.aggregator.app import create_app
    from cloud_sync.aggregator.db.models import Room
    from cloud_sync.aggregator.services import releases as svc
    from cloud_sync.aggregator.services.common import utcnow
    from cloud_sync.aggregator.services.devices import add_device
    from fleet.bundle import REPO, build_bundle

    with tempfile.TemporaryDirectory(prefix="bench-update-") as tmp_name:
        tmp = Path(tmp_name)
        private, public = rm.generate_keypair()
        key = rm.load_private_key(private)
        started = time.perf_counter()
        bundles = {}
        for version in ("0.1.0+gbench1", "0.1.0+gbench2"):
            bundles[version] = build_bundle(tmp / version, platform="native",
                                            cache=REPO / "build" / "cache", version=version)
            rm.sign_bundle(bundles[version], key)
        build_s = time.perf_counter() - started
        old, new = bundles["0.1.0+gbench1"], bundles["0.1.0+gbench2"]
        prefix = tmp / "opt"
        (prefix / "bundles").mkdir(parents=True)
        subprocess.run(["cp", "-al", str(old), str(prefix / "bundles" / old.name)], check=True)
        (tmp / "keys").mkdir()
        (tmp / "keys" / "office.pub").write_bytes(public)

        settings = aggregator_config.load(None, database_url=f"sqlite:///{tmp / 'agg.db'}",
                                          data_dir=tmp / "agg", rate_limit_per_min=100000)
        with TestClient(create_app(settings)) as client:
            sessions = client.app.state.ctx.sessions  # type: ignore[attr-defined]
            with sessions() as session:
                session.add(Room(id="LAB-301", name="LAB-301", site="north", timezone="UTC",
                                 created_at=utcnow()))
                session.commit()
                _, device_key = add_device(session, "LAB-301", "pi-bench")
                svc.trust_key(session, public, "bench")
                svc.add_release(session, settings, new, "bench")
                svc.start_rollout(session, new.name, "LAB-301", 0, "bench")
            device = appliance_config.load(None, device={"device_id": "pi-bench",
                                                         "room_id": "LAB-301"},
                                           sync={"aggregator_url": "http://testserver",
                                                 "api_key": device_key},
                                           update={"prefix": prefix, "keys_dir": tmp / "keys",
                                                   "min_free_mb": 0, "request_file": "",
                                                   "max_bytes_per_s": 1_000_000_000})
            http = TestClient(client.app, headers={"Authorization": f"Bearer {device_key}"})
            updater = Updater(device, manager=ReleaseManager(device), client=http)
            offer = updater.assigned()
            assert offer is not None
            started = time.perf_counter()
            downloaded = updater.download(offer)
            download_s = time.perf_counter() - started
        received = sorted(p.relative_to(downloaded).as_posix()
                          for p in downloaded.rglob("*") if p.is_file())
        update_bytes = sum((downloaded / p).stat().st_size for p in received)
        manifest = rm.parse_manifest((new / rm.MANIFEST).read_bytes())
        full = manifest.total_bytes() + sum((new / n).stat().st_size
                                            for n in (rm.MANIFEST, rm.SIGNATURE))
        shutil.rmtree(tmp / "agg", ignore_errors=True)
    return {
        "what": "bytes one device downloads for a release that changes only the project's "
                "wheel (bodies: manifest, signature, files), vs the whole bundle",
        "update_bytes_per_device": update_bytes,
        "full_bundle_bytes": full,
        "ratio_update_to_full": round(update_bytes / full, 5),
        "files_downloaded": [p for p in received if p not in (rm.MANIFEST, rm.SIGNATURE)],
        "bundle_files": len(manifest.files),
        "download_s_in_process": round(download_s, 3),
        "bundles_build_s": round(build_s, 1),
    }
