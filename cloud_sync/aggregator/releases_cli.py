"""`aggregator releases ...`: signing keys, signed bundles, releases and their rollouts.

``keygen`` and ``sign`` run in the office, on the machine that keeps the private key; they
touch no database. The aggregator itself only ever holds public keys (``release_keys``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from cloud_sync import release_manifest as rm

app = typer.Typer(help="Signed releases the devices fetch themselves (docs/OPERATIONS.md 6.10).",
                  no_args_is_help=True)
PRIVATE_NAME = "release-signing.key"
PUBLIC_NAME = "release-signing.pub"


def _fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


@app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option(help="Directory for release-signing.key and .pub "
                                           "(on the office machine, never the aggregator).")],
) -> None:
    """A new ed25519 signing key: the private key (0600) stays in the office; the public key
    goes into the image (make image RELEASE_PUBKEY=...) and the aggregator's release_keys."""
    private, public = out / PRIVATE_NAME, out / PUBLIC_NAME
    for path in (private, public):
        if path.exists():
            raise _fail(f"{path} exists: refusing to replace a signing key (devices trust the "
                        "old one); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    private_pem, public_pem = rm.generate_keypair()
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(private_pem)
    public.write_bytes(public_pem)
    kid = rm.key_id(rm.load_public_key(public_pem))
    typer.echo(f"key id {kid}\nprivate: {private} (keep it offline; back it up)\n"
               f"public:  {public}")


@app.command("sign")
def sign(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (make image / fleet bundle).")],
    key: Annotated[Path, typer.Option(help="The private key file from `releases keygen`.")],
    archive: Annotated[Path | None, typer.Option(
        help="Also write the signed bundle as one archive file (OUT.tar, or OUT.tar.gz "
             "compressed) to upload in the console's Devices page.")] = None,
) -> None:
    """Check every file of BUNDLE against its manifest and write manifest.sig."""
    from cloud_sync import release_archive

    try:
        kid = rm.sign_bundle(bundle, rm.load_private_key(key.read_bytes()))
    except (rm.ReleaseError, OSError) as err:
        raise _fail(str(err)) from err
    typer.echo(f"signed {bundle} with key {kid}")
    if archive is not None:
        try:
            files = release_archive.write_archive(bundle, archive)
        except (rm.ReleaseError, OSError) as err:
            raise _fail(str(err)) from err
        typer.echo(f"archive {archive}: {files} files, {archive.stat().st_size / 1e6:.1f} MB "
                   "(upload it in the console: Devices, Add a release)")


@app.command("verify")
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    key: Annotated[list[Path], typer.Option(help="Trusted public key(s) (.pub or a directory).")],
) -> None:
    """Verify BUNDLE as a device would: the signature, then every file's size and sha256."""
    try:
        manifest, signer = rm.verify_bundle(bundle, rm.load_public_keys(key))
    except (rm.ReleaseError, OSError) as err:
        raise _fail(str(err)) from err
    typer.echo(f"{manifest.version}: {len(manifest.files)} files, "
               f"{manifest.total_bytes() / 1e6:.1f} MB, signed by {signer}")


# --- on the aggregator: public keys, bundles, rollouts (the database of --config) -----------

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML config file (default: env AGGREGATOR_CONFIG)."),
]


def _run(config: Path | None, work):  # type: ignore[no-untyped-def]
    """``work(session, settings)`` on the migrated database; a refusal is one 'error:' line
    and exit 1."""
    from cloud_sync.aggregator.cli import _sessions, load_or_exit
    from cloud_sync.aggregator.services.common import ServiceError

    settings = load_or_exit(config)
    engine, sessions = _sessions(settings)
    try:
        with sessions() as session:
            return work(session, settings)
    except ServiceError as err:
        raise _fail(err.message) from err
    finally:
        engine.dispose()


def _actor() -> str:
    from cloud_sync.aggregator.services.audit import cli_actor

    return cli_actor()


@app.command("trust")
def trust(
    key: Annotated[Path, typer.Argument(help="A public key (release-signing.pub) releases may "
                                             "be signed with. Never the private key.")],
    config: ConfigOption = None,
) -> None:
    """Trust a public release key at the aggregator (`releases add` checks bundles with it)."""
    from cloud_sync.aggregator.services import releases as svc

    try:
        pem = key.read_bytes()
    except OSError as err:
        raise _fail(str(err)) from err
    if b"PRIVATE KEY" in pem:
        raise _fail(f"{key} is a private key: the aggregator takes the public key only "
                    "(release-signing.pub); keep the private key in the office")
    kid = _run(config, lambda s, _: svc.trust_key(s, pem, _actor()))
    typer.echo(f"trusted release key {kid}")


@app.command("add")
def add(
    bundle: Annotated[Path, typer.Argument(help="A signed bundle directory (make image, "
                                                "then `releases sign` in the office).")],
    config: ConfigOption = None,
) -> None:
    """Verify BUNDLE (signature by a trusted key, every file's size and sha256) and keep it
    for the devices to fetch. A tampered or unsigned bundle is refused."""
    from cloud_sync.aggregator.services import releases as svc

    if not bundle.is_dir():
        raise _fail(f"{bundle}: not a bundle directory")
    row = _run(config, lambda s, settings: svc.add_release(s, settings, bundle, _actor()))
    typer.echo(f"release {row.version}: {row.files} files, {row.total_bytes / 1e6:.1f} MB, "
               f"signed by {row.key_id}")


@app.command("list")
def list_(config: ConfigOption = None) -> None:
    """Releases held and the recent rollouts."""
    from cloud_sync.aggregator.services import releases as svc

    def work(session, _settings):  # type: ignore[no-untyped-def]
        for r in svc.list_releases(session):
            typer.echo(f"release {r.version}  {r.files} files  {r.total_bytes / 1e6:.1f} MB  "
                       f"key {r.key_id}  added {r.added_at:%Y-%m-%d %H:%M} by {r.added_by}")
        for o in svc.list_rollouts(session):
            state = ("halted: " + (o.halted_reason or "")) if o.halted_at else o.stage
            typer.echo(f"rollout {o.id} {o.version}  canary {o.canary_room}, {o.share_pct}%  "
                       f"{'active' if o.active else 'superseded'}  {state}")

    _run(config, work)


@app.command("rollout")
def rollout(
    version: Annotated[str, typer.Argument(help="A release added with `releases add`.")],
    canary_room: Annotated[str, typer.Option(help="The room whose devices get it first.")],
    share: Annotated[int, typer.Option(min=0, max=100, help="Percent of the fleet in the "
                                                            "second stage.")] = 25,
    during_class: Annotated[bool, typer.Option(help="Install during class time too.")] = False,
    max_bytes_per_s: Annotated[int | None, typer.Option(
        min=10_000, max=1_000_000_000, help="Download bandwidth bound per device.")] = None,
    config: ConfigOption = None,
) -> None:
    """Start rolling VERSION out: canary room, then SHARE percent, then all."""
    from cloud_sync.aggregator.services import releases as svc

    row = _run(config, lambda s, _: svc.start_rollout(
        s, version, canary_room, share, _actor(), during_class=during_class,
        max_bytes_per_s=max_bytes_per_s))
    typer.echo(f"rollout {row.id} of {row.version}: stage {row.stage}")


@app.command("halt")
def halt(reason: Annotated[str, typer.Option(help="Why (kept with the rollout).")],
         config: ConfigOption = None) -> None:
    """Halt the active rollout: no device is offered the release any more."""
    from cloud_sync.aggregator.services import releases as svc

    row = _run(config, lambda s, _: svc.halt_rollout(s, _actor(), reason))
    typer.echo(f"rollout {row.id} of {row.version} halted")


@app.command("resume")
def resume(config: ConfigOption = None) -> None:
    """Clear the active rollout's halt."""
    from cloud_sync.aggregator.services import releases as svc

    row = _run(config, lambda s, _: svc.resume_rollout(s, _actor()))
    typer.echo(f"rollout {row.id} of {row.version}: stage {row.stage}")


@app.command("promote")
def promote(config: ConfigOption = None) -> None:
    """Move the active rollout to its next stage without waiting for confirmations."""
    from cloud_sync.aggregator.services import releases as svc

    row = _run(config, lambda s, _: svc.promote_rollout(s, _actor()))
    typer.echo(f"rollout {row.id} of {row.version}: stage {row.stage}")
