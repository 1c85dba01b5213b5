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

app = typer.Typer(help="Signed releases the devices fetch themselves (docs/OPERATIONS.md 6.8).",
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
) -> None:
    """Check every file of BUNDLE against its manifest and write manifest.sig."""
    try:
        kid = rm.sign_bundle(bundle, rm.load_private_key(key.read_bytes()))
    except (rm.ReleaseError, OSError) as err:
        raise _fail(str(err)) from err
    typer.echo(f"signed {bundle} with key {kid}")


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
