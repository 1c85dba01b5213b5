"""A signed release bundle as one archive file (.tar or .tar.gz), for a browser upload.

``write_archive`` runs in the office (``aggregator releases sign --archive OUT.tar``): the
bundle's manifest, signature and every file the manifest lists, nothing else, with neutral
owners. ``unpack`` runs at the aggregator on an uploaded archive, which is untrusted: every
member is checked before one byte of it is written (``tarfile``'s ``filter=`` argument is
not relied on: Debian bookworm's Python 3.11.2 predates it):

- only regular files and directories (no symlink, hard link, device, FIFO);
- a relative path inside the destination: no absolute path, no ``..``, no backslash, no
  name given twice;
- at most ``max_members`` members and ``max_bytes`` bytes unpacked in total (a small .tar.gz
  may inflate to anything), counted on the bytes actually read.

The unpacked bundle is then verified by ``release_manifest.verify_bundle`` as any other.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path, PurePosixPath

from cloud_sync import release_manifest as rm

MAX_MEMBERS = rm.MAX_FILES + 1000  # the files, their directories, manifest and signature
COMPRESSED_SUFFIXES = (".tar.gz", ".tgz")


class ArchiveError(ValueError):
    """The archive is unreadable or holds something a bundle never does; says what."""


def write_archive(bundle: Path, out: Path) -> int:
    """Write ``bundle`` (already signed) as a tar archive at ``out`` (gzip-compressed when
    its name ends in .tar.gz or .tgz); returns the number of files. Members are relative
    paths (``manifest.json``, ``wheels/...``), owned by 0:0."""
    manifest = rm.parse_manifest((bundle / rm.MANIFEST).read_bytes())
    if not (bundle / rm.SIGNATURE).is_file():
        raise rm.ReleaseError(f"{bundle}: unsigned ({rm.SIGNATURE} missing): sign it first")
    names = [rm.MANIFEST, rm.SIGNATURE, *(f.path for f in manifest.files)]
    mode = "w:gz" if out.name.endswith(COMPRESSED_SUFFIXES) else "w"

    def neutral(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tarfile.open(tmp, mode, format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name in names:
                path = bundle / name
                if path.is_symlink() or not path.is_file():
                    raise rm.ReleaseError(f"{name}: not a regular file in {bundle}")
                tar.add(path, arcname=name, recursive=False, filter=neutral)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return len(manifest.files)


def member_path(name: str) -> PurePosixPath | None:
    """The member's path relative to the archive's root (None: the root itself, ``./``);
    raises :class:`ArchiveError` for a path that could leave the destination."""
    if "\\" in name or "\x00" in name:
        raise ArchiveError(f"{name!r}: a path with a backslash or NUL")
    if name.startswith("/"):
        raise ArchiveError(f"{name!r}: an absolute path")
    parts = [p for p in PurePosixPath(name).parts if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveError(f"{name!r}: a path with '..'")
    return PurePosixPath(*parts) if parts else None


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link (to {member.linkname!r})"
    if member.islnk():
        return f"a hard link (to {member.linkname!r})"
    if member.ischr() or member.isblk():
        return "a device"
    if member.isfifo():
        return "a FIFO"
    return "not a regular file"


def unpack(archive: Path, dest: Path, *, max_bytes: int,
           max_members: int = MAX_MEMBERS) -> Path:
    """Unpack ``archive`` into the empty directory ``dest`` after checking every member (see
    the module docstring); returns the bundle's directory: ``dest`` itself, or the one
    top-level directory holding ``manifest.json`` when the archive wraps the bundle in one
    (``tar -cf b.tar bundle-1.0/``). Raises :class:`ArchiveError` on the first refusal
    (what was written stays in ``dest``: the caller removes it)."""
    dest.mkdir(parents=True, exist_ok=True)
    if any(dest.iterdir()):
        raise ArchiveError(f"{dest} is not empty")
    root = dest.resolve()
    total = members = 0
    try:
        with tarfile.open(archive, "r:*") as tar:  # .tar, .tar.gz (.bz2, .xz) by content
            for member in tar:  # one header at a time: no listing read ahead
                members += 1
                if members > max_members:
                    raise ArchiveError(f"more than {max_members} entries: not a release bundle")
                rel = member_path(member.name)
                if member.isdir():
                    if rel is not None:
                        _inside(root, rel).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise ArchiveError(f"{member.name!r}: {_kind(member)}; a bundle holds "
                                       "regular files and directories only")
                if rel is None:
                    raise ArchiveError(f"{member.name!r}: a file without a name")
                if total + member.size > max_bytes:
                    raise ArchiveError(_too_large(max_bytes))
                total += _write_member(tar, member, _inside(root, rel), max_bytes - total,
                                       max_bytes)
    except ArchiveError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        raise ArchiveError(f"not a readable .tar or .tar.gz archive, or cut short ({err})") \
            from err
    return bundle_root(dest)


def _too_large(max_bytes: int) -> str:
    return f"more than {max_bytes / 1e6:.0f} MB unpacked (release_upload_max_bytes)"


def _write_member(tar: tarfile.TarFile, member: tarfile.TarInfo, target: Path,
                  budget: int, max_bytes: int) -> int:
    """The member's bytes into a new file ``target`` (never through a link, never over a
    file already there), at most ``budget`` bytes; returns the bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    if source is None:
        raise ArchiveError(f"{member.name!r}: unreadable")
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError as err:
        raise ArchiveError(f"{member.name!r}: in the archive twice") from err
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := source.read(rm.CHUNK):
            written += len(chunk)
            if written > budget:
                raise ArchiveError(_too_large(max_bytes))
            out.write(chunk)
    return written


def _inside(root: Path, rel: PurePosixPath) -> Path:
    """``root/rel``, refused if it resolves outside ``root`` (only directories and regular
    files are ever created, so no component can be a link; checked anyway)."""
    target = root.joinpath(*rel.parts)
    if not target.resolve().is_relative_to(root):
        raise ArchiveError(f"{rel}: outside the bundle")
    return target


def bundle_root(dest: Path) -> Path:
    if (dest / rm.MANIFEST).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / rm.MANIFEST).is_file():
        return entries[0]
    raise ArchiveError(f"no {rm.MANIFEST} at the top of the archive (or in its one folder): "
                       "not a release bundle; make it with `aggregator releases sign BUNDLE "
                       "--key ... --archive OUT.tar`")


def remove(path: Path) -> None:
    """Remove a file or a directory tree, quietly when already gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
