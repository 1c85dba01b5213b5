"""``make deploy``: update a fleet over SSH with asyncssh, several hosts at a time.

Per host: push the release bundle (wheels already on the host from an earlier release are not
sent again), install it into a new versioned venv with the bundle's own installer, switch the
``current`` symlink atomically, restart the service, and wait until the device's /health (read
on the device itself, over the same SSH connection) says the new version's pipeline runs: the
camera delivers frames and the detector processes them. If it does not within the timeout,
``current`` goes back to the previous release and the service is restarted on it (automatic
rollback). Only the last two releases are kept. Nothing under /var/lib is touched: the outbox,
the roster cache and the status page password stay as they are.

Why asyncssh: one Python process drives many SSH connections concurrently (a semaphore is the
parallelism limit), SFTP comes with it, and the health/rollback logic stays plain Python that
the tests exercise against real sshd servers, instead of templated shell in a playbook.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh
from rich.console import Console
from rich.table import Table

from fleet.bundle import bundle_version

_LOGGER = logging.getLogger(__name__)

DEFAULT_PREFIX = "/opt/classroom-attendance"
DEFAULT_RESTART = "systemctl restart classroom-appliance.service"
DEFAULT_HEALTH = "http://127.0.0.1:8080/health"
KEEP_RELEASES = 2

# Runs on the device with the release's own Python: prints /health's JSON (also on HTTP 503).
HEALTH_PROBE = """
import sys, urllib.request, urllib.error
try:
    body = urllib.request.urlopen(sys.argv[1], timeout=5).read()
except urllib.error.HTTPError as err:
    body = err.read()
except Exception as err:
    print('{"error": "%s"}' % type(err).__name__); sys.exit(0)
sys.stdout.write(body.decode())
"""


class DeployError(RuntimeError):
    """A step on one host failed; the message names the step."""


@dataclass
class Host:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    prefix: str = DEFAULT_PREFIX
    restart: str = DEFAULT_RESTART
    health_url: str = DEFAULT_HEALTH


@dataclass
class Result:
    host: str
    old: str = "-"
    new: str = "-"
    result: str = "pending"
    seconds: float = 0.0
    detail: str = ""
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result in ("updated", "unchanged")


def parse_hosts(spec: str, inventory: Path | None = None) -> list[Host]:
    """HOSTS="pi-lab301 root@10.0.0.7:2222"; names found in the inventory take its settings.

    Inventory (TOML): ``[defaults]`` and ``[hosts.NAME]`` tables with address, port, user,
    prefix, restart and health_url."""
    data: dict[str, dict[str, object]] = {}
    defaults: dict[str, object] = {}
    if inventory is not None:
        with inventory.open("rb") as fh:
            loaded = tomllib.load(fh)
        data = loaded.get("hosts", {})
        defaults = loaded.get("defaults", {})
    names = spec.split() if spec.strip() else list(data)
    hosts = []
    for item in names:
        if item in data:
            merged = {**defaults, **data[item]}
            hosts.append(Host(name=item, address=str(merged.pop("address", item)),
                              **merged))  # type: ignore[arg-type]
            continue
        user, _, rest = item.rpartition("@")
        address, _, port = rest.partition(":")
        hosts.append(Host(name=item, address=address, port=int(port or 22),
                          user=user or str(defaults.get("user", "root")),
                          **{k: v for k, v in defaults.items() if k != "user"}))  # type: ignore[arg-type]
    if not hosts:
        raise DeployError("no hosts: give HOSTS=\"pi-lab301 pi-lab302\" or an inventory")
    return hosts


def pipeline_runs(doc: dict[str, object], version: str) -> str | None:
    """None when /health says this version's pipeline runs, else the reason it does not."""
    if "error" in doc:
        return f"/health not answering ({doc['error']})"
    if doc.get("version") != version:
        return f"/health reports version {doc.get('version')}, not {version}"
    components = doc.get("components")
    if not isinstance(components, dict):
        return "/health has no components"
    camera = components.get("camera", {})
    detector = components.get("detector", {})
    if camera.get("status") != "healthy":
        return f"camera {camera.get('status')}: {camera.get('message')}"
    frames = detector.get("frames", 0)  # /health flattens a component's details
    if not frames:
        return f"detector: {detector.get('message')}"
    return None


class Deployer:
    def __init__(self, bundle: Path, *, limit: int = 4, health_timeout: float = 120.0,
                 client_keys: list[str] | None = None, known_hosts: str | None = None,
                 connect_timeout: float = 20.0) -> None:
        self.bundle = bundle
        self.version = bundle_version(bundle)
        self.limit = max(1, limit)
        self.health_timeout = health_timeout
        self.client_keys = client_keys
        # None = ~/.ssh/known_hosts (asyncssh's default)
        self.known_hosts: object = () if known_hosts is None else known_hosts
        self.connect_timeout = connect_timeout

    async def run(self, hosts: list[Host]) -> list[Result]:
        semaphore = asyncio.Semaphore(self.limit)

        async def one(host: Host) -> Result:
            async with semaphore:
                return await self.deploy(host)

        return list(await asyncio.gather(*(one(h) for h in hosts)))

    def run_sync(self, hosts: list[Host]) -> list[Result]:
        return asyncio.run(self.run(hosts))

    async def deploy(self, host: Host) -> Result:
        result = Result(host.name, new=self.version)
        start = time.monotonic()
        try:
            options = {} if self.known_hosts == () else {"known_hosts": self.known_hosts}
            async with asyncssh.connect(
                host.address, port=host.port, username=host.user,
                client_keys=self.client_keys, connect_timeout=self.connect_timeout,
                **options,  # type: ignore[arg-type]
            ) as conn:
                await self._deploy(conn, host, result)
        except (OSError, asyncssh.Error) as err:
            result.result, result.detail = "failed", f"ssh: {err}"
        except DeployError as err:
            result.result, result.detail = "failed", str(err)
        result.seconds = round(time.monotonic() - start, 1)
        _LOGGER.info("%s: %s %s", host.name, result.result, result.detail)
        return result

    async def _sh(self, conn: asyncssh.SSHClientConnection, command: str, what: str,
                  *, check: bool = True) -> str:
        done = await conn.run(command, check=False)
        if check and done.exit_status != 0:
            tail = str(done.stderr or done.stdout).strip().splitlines()[-3:]
            raise DeployError(f"{what} failed: {' | '.join(tail)}")
        return str(done.stdout or "")

    async def _deploy(self, conn: asyncssh.SSHClientConnection, host: Host,
                      result: Result) -> None:
        prefix = shlex.quote(host.prefix)
        current = (await self._sh(conn, f"readlink {prefix}/current || true", "read current"))
        result.old = current.strip().removeprefix("releases/") or "-"
        if result.old == self.version:
            result.result, result.detail = "unchanged", "already running this version"
            return
        t = time.monotonic()
        incoming = await self._push(conn, host)
        result.steps["push"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        await self._sh(conn, f"sh {incoming}/install-release.sh {incoming} {prefix}", "install")
        result.steps["install"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        await self._switch(conn, host, self.version)
        reason = await self._wait_healthy(conn, host, self.version)
        result.steps["health"] = round(time.monotonic() - t, 1)
        if reason is None:
            result.result = "updated"
            await self._prune(conn, host)
            return
        result.detail = f"health: {reason}"
        if result.old == "-":
            result.result = "failed (no previous release)"
            return
        await self._switch(conn, host, result.old)
        back = await self._wait_healthy(conn, host, result.old)
        result.result = "rolled back" if back is None else "FAILED: rollback unhealthy"
        if back is not None:
            result.detail += f"; after rollback: {back}"

    async def _push(self, conn: asyncssh.SSHClientConnection, host: Host) -> str:
        """Send the bundle to PREFIX/incoming; wheels the host already has stay (by name+size).
        """
        incoming = f"{host.prefix}/incoming"
        q = shlex.quote(incoming)
        await self._sh(conn, f"mkdir -p {q}/wheels && rm -rf {q}/models {q}/systemd", "mkdir")
        async with conn.start_sftp_client() as sftp:
            present = {}
            for entry in await sftp.readdir(f"{incoming}/wheels"):
                present[entry.filename] = entry.attrs.size
            wanted = {p.name: p for p in (self.bundle / "wheels").glob("*.whl")}
            for name in set(present) - set(wanted) - {".", ".."}:
                await sftp.remove(f"{incoming}/wheels/{name}")
            for name, path in sorted(wanted.items()):
                if present.get(name) != path.stat().st_size:
                    await sftp.put(str(path), f"{incoming}/wheels/{name}")
            for item in ("models", "systemd"):
                await sftp.put(str(self.bundle / item), f"{incoming}/", recurse=True)
            for item in ("install-release.sh", "VERSION"):
                await sftp.put(str(self.bundle / item), f"{incoming}/{item}")
        return shlex.quote(incoming)

    async def _switch(self, conn: asyncssh.SSHClientConnection, host: Host, version: str) -> None:
        prefix = shlex.quote(host.prefix)
        target = shlex.quote(f"releases/{version}")
        # atomic: a new symlink renamed over the old one
        await self._sh(conn, f"ln -sfn {target} {prefix}/current.new && "
                             f"mv -T {prefix}/current.new {prefix}/current", "switch current")
        await self._sh(conn, host.restart, "restart", check=False)

    async def _wait_healthy(self, conn: asyncssh.SSHClientConnection, host: Host,
                            version: str) -> str | None:
        deadline = time.monotonic() + self.health_timeout
        python = shlex.quote(f"{host.prefix}/current/bin/python")
        command = f"{python} -c {shlex.quote(HEALTH_PROBE)} {shlex.quote(host.health_url)}"
        reason = "no answer"
        while True:
            out = await self._sh(conn, command, "health probe", check=False)
            try:
                doc = json.loads(out) if out.strip() else {"error": "empty answer"}
            except json.JSONDecodeError:
                doc = {"error": "not JSON"}
            found = pipeline_runs(doc, version)
            if found is None:
                return None
            reason = found
            if time.monotonic() >= deadline:
                return reason
            await asyncio.sleep(2)

    async def _prune(self, conn: asyncssh.SSHClientConnection, host: Host) -> None:
        """Keep the current release and the newest other one (the rollback target)."""
        prefix = shlex.quote(host.prefix)
        listing = await self._sh(
            conn, f"cd {prefix}/releases && ls -1t -- */.installed 2>/dev/null || true",
            "list releases")
        current = (await self._sh(conn, f"readlink {prefix}/current", "read current")).strip()
        keep = {current.removeprefix("releases/")}
        names = [line.strip().removesuffix("/.installed") for line in listing.splitlines()
                 if line.strip()]
        for name in names:
            if len(keep) >= KEEP_RELEASES:
                break
            keep.add(name)
        for name in names:
            if name not in keep:
                await self._sh(conn, f"rm -rf {prefix}/releases/{shlex.quote(name)}",
                               "remove old release")


def summary_table(results: list[Result]) -> Table:
    table = Table(title="make deploy")
    for column in ("host", "old -> new", "result", "time", "detail"):
        table.add_column(column)
    for r in results:
        style = "green" if r.result == "updated" else "yellow" if r.ok else "red"
        steps = " ".join(f"{k} {v:.0f}s" for k, v in r.steps.items())
        table.add_row(r.host, f"{r.old} -> {r.new}", f"[{style}]{r.result}[/{style}]",
                      f"{r.seconds:.0f} s", " ".join(x for x in (r.detail, steps) if x))
    return table


def deploy(bundle: Path, hosts: list[Host], **kwargs: object) -> list[Result]:
    results = Deployer(bundle, **kwargs).run_sync(hosts)  # type: ignore[arg-type]
    Console(width=160).print(summary_table(results))
    return results
