"""``make deploy``: update a fleet over SSH with asyncssh, several hosts at a time.

Per host: send the release's manifest (and signature), ask the device which files it lacks
(``appliance update need``: by sha256, against the bundles it keeps and its installed
dependency layer), send only those into ``PREFIX/incoming/<version>``, and run the device's own
``appliance update apply --detach``: the same code as a pulled update checks every file's
sha256 (and the signature of a signed bundle), installs beside the current release, installs
the release's units, switches ``current`` and hands the trial to
``classroom-release-confirm.service`` on the device. The device confirms the release when its
/health is healthy within the trial time, or goes back to the previous release by itself, even
if this laptop disconnects. This command then reads the outcome (``appliance update status``).
A device whose release predates ``appliance update`` gets the whole bundle and the new
release's installer first. Nothing under /var/lib is touched.

Why asyncssh: one Python process drives many SSH connections concurrently (a semaphore is the
parallelism limit), SFTP comes with it, and the logic stays plain Python that the tests
exercise against real sshd servers, instead of templated shell in a playbook.
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

from cloud_sync import release_manifest as rm
from fleet.bundle import bundle_version

_LOGGER = logging.getLogger(__name__)

DEFAULT_PREFIX = "/opt/classroom-attendance"
DEFAULT_CONFIG = "/etc/classroom-attendance/appliance.toml"
POLL_S = 2.0
OUTCOMES = {"confirmed": "updated", "reverted": "rolled back", "refused": "refused",
            "failed": "failed"}


class DeployError(RuntimeError):
    """A step on one host failed; the message names the step."""


@dataclass
class Host:
    name: str
    address: str
    port: int = 22
    user: str = "root"
    prefix: str = DEFAULT_PREFIX
    config: str = DEFAULT_CONFIG  # the device's appliance.toml (its [update] section)


@dataclass
class Result:
    host: str
    old: str = "-"
    new: str = "-"
    result: str = "pending"
    seconds: float = 0.0
    detail: str = ""
    sent_bytes: int = 0
    steps: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.result in ("updated", "unchanged")


def parse_hosts(spec: str, inventory: Path | None = None) -> list[Host]:
    """HOSTS="pi-lab301 root@10.0.0.7:2222"; names found in the inventory take its settings.

    Inventory (TOML): ``[defaults]`` and ``[hosts.NAME]`` tables with address, port, user,
    prefix and config."""
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


class Deployer:
    def __init__(self, bundle: Path, *, limit: int = 4, health_timeout: float = 120.0,
                 client_keys: list[str] | None = None, known_hosts: str | None = None,
                 connect_timeout: float = 20.0) -> None:
        self.bundle = bundle
        self.version = bundle_version(bundle)
        self.manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
        self.signed = (bundle / rm.SIGNATURE).exists()
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

    async def _guard(self, conn: asyncssh.SSHClientConnection, host: Host,
                     release: str) -> str | None:
        """``appliance`` of ``release`` if it has the update commands (a release from before
        them has not), by its real path (``current`` moves during the switch)."""
        appliance = shlex.quote(f"{host.prefix}/releases/{release}/bin/appliance")
        done = await conn.run(f"{appliance} update --help", check=False)
        return appliance if done.exit_status == 0 else None

    async def _deploy(self, conn: asyncssh.SSHClientConnection, host: Host,
                      result: Result) -> None:
        prefix = shlex.quote(host.prefix)
        config = shlex.quote(host.config)
        current = (await self._sh(conn, f"readlink {prefix}/current || true", "read current"))
        result.old = current.strip().removeprefix("releases/") or "-"
        if result.old == self.version:
            result.result, result.detail = "unchanged", "already running this version"
            return
        t = time.monotonic()
        incoming = f"{host.prefix}/incoming/{self.version}"
        await self._sh(conn, f"mkdir -p {shlex.quote(incoming)}", "mkdir")
        async with conn.start_sftp_client() as sftp:
            for name in (rm.MANIFEST, rm.SIGNATURE):
                if (self.bundle / name).exists():
                    await sftp.put(str(self.bundle / name), f"{incoming}/{name}")
            guard = None if result.old == "-" else await self._guard(conn, host, result.old)
            if guard is not None:
                need = json.loads(await self._sh(
                    conn, f"{guard} update need {shlex.quote(incoming)} --config {config}",
                    "ask which files the device lacks"))
            else:  # a first install, or a release from before `appliance update`
                need = [e.path for e in self.manifest.files]
            for rel in need:
                rel = rm.safe_path(rel)
                target = f"{incoming}/{rel}"
                await sftp.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
                await sftp.put(str(self.bundle / rel), target)
                result.sent_bytes += (self.bundle / rel).stat().st_size
        result.steps["push"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        if guard is None:
            q = shlex.quote(incoming)
            await self._sh(conn, f"sh {q}/install-release.sh {q} {prefix}", "install")
            guard = await self._guard(conn, host, self.version)
            if guard is None:
                raise DeployError(f"release {self.version} has no `appliance update`")
        flags = "" if self.signed else " --unsigned"
        out = await self._sh(
            conn, f"{guard} update apply {shlex.quote(incoming)} --detach --config {config} "
                  f"--trial-s {self.health_timeout:.0f}{flags}", "apply", check=False)
        applied = _last_json(out)
        result.steps["apply"] = round(time.monotonic() - t, 1)
        state = applied.get("state")
        if state == "unchanged":
            result.result, result.detail = "unchanged", "already running this version"
            return
        if state != "trial":
            result.result = OUTCOMES.get(str(state), "failed")
            result.detail = str(applied.get("reason") or out.strip()[-300:])
            return
        t = time.monotonic()
        report = await self._wait_outcome(conn, guard, config)
        result.steps["trial"] = round(time.monotonic() - t, 1)
        if report is None:
            result.result = "unknown"
            result.detail = "the device did not finish its trial in time (it decides alone)"
            return
        result.result = OUTCOMES.get(str(report.get("state")), str(report.get("state")))
        if report.get("reason"):
            result.detail = f"health: {report['reason']}"

    async def _wait_outcome(self, conn: asyncssh.SSHClientConnection, guard: str,
                            config: str) -> dict[str, object] | None:
        """The device's final report on this version (it confirms or reverts by itself)."""
        # the trial, then a revert that waits as long again for the old release
        deadline = time.monotonic() + 2 * self.health_timeout + 60
        while time.monotonic() < deadline:
            out = await self._sh(conn, f"{guard} update status --config {config}", "status",
                                 check=False)
            try:
                status = json.loads(out)
            except json.JSONDecodeError:
                status = {}
            report = status.get("report") or {}
            if (status.get("pending") is None and report.get("version") == self.version
                    and report.get("state") in OUTCOMES):
                return report  # type: ignore[no-any-return]
            await asyncio.sleep(POLL_S)
        return None


def _last_json(out: str) -> dict[str, object]:
    for line in reversed(out.strip().splitlines()):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            return doc
    return {}


def summary_table(results: list[Result]) -> Table:
    table = Table(title="make deploy")
    for column in ("host", "old -> new", "result", "time", "detail"):
        table.add_column(column)
    for r in results:
        style = "green" if r.result == "updated" else "yellow" if r.ok else "red"
        steps = " ".join(f"{k} {v:.0f}s" for k, v in r.steps.items())
        if r.sent_bytes:
            steps += f" sent {r.sent_bytes / 1e6:.1f} MB"
        table.add_row(r.host, f"{r.old} -> {r.new}", f"[{style}]{r.result}[/{style}]",
                      f"{r.seconds:.0f} s", " ".join(x for x in (r.detail, steps) if x))
    return table


def deploy(bundle: Path, hosts: list[Host], **kwargs: object) -> list[Result]:
    results = Deployer(bundle, **kwargs).run_sync(hosts)  # type: ignore[arg-type]
    Console(width=160).print(summary_table(results))
    return results
