"""Image files and archives on disk: a tarball unpacked once into the cache (atomically, so
a killed unpack never leaves a partial tree), the visible entries of a folder, image files."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import zlib

from mixmask.data.progress import image_progress
from mixmask.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


ARCHIVE_EXTENSIONS = (".tar", ".tar.gz", ".tgz")


def cache_root(cache_dir: str | None) -> str:
    path = cache_dir or os.environ.get("MIXMASK_CACHE") or os.path.join("~", ".cache", "mixmask")
    return os.path.abspath(os.path.expanduser(path))


def resolve_tree(root: str, cache: str, progress: bool = False) -> str:
    """The folder tree behind `root`, unpacking an archive into the cache if needed."""
    if os.path.isdir(root):
        return root
    if not os.path.exists(root):
        raise DatasetError(
            f"data.root {root!r} does not exist. Point it at an image folder or tarball."
        )
    if not root.lower().endswith(ARCHIVE_EXTENSIONS):
        raise DatasetError(
            f"data.root {root!r} is a file but not a {'/'.join(ARCHIVE_EXTENSIONS)} archive. "
            "Point it at an image folder or a tarball of one."
        )
    return _unpack_once(root, cache, progress)


def _unpack_once(archive: str, cache: str, progress: bool = False) -> str:
    """Unpack `archive` into the cache unless done before; returns the unpacked folder.

    The entry is keyed by the archive's absolute path, size and mtime, so a changed archive
    is unpacked again. Extraction goes to a temporary folder renamed into place at the end,
    so an interrupted extraction is never mistaken for a finished one.
    """
    archive = os.path.abspath(archive)
    stat = os.stat(archive)
    key = digest(f"{archive}\n{stat.st_size}\n{stat.st_mtime_ns}")
    stem = os.path.basename(archive)
    for ext in ARCHIVE_EXTENSIONS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    final = os.path.join(cache, f"{stem}-{key}")
    if os.path.isdir(final):
        return final
    os.makedirs(cache, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-unpack-", dir=cache)
    try:
        _extract_archive(archive, staging, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    publish(staging, final)
    return final


def _extract_archive(archive: str, destination: str, progress: bool = False) -> None:
    # Member by member from one sequential read, so the bar can follow the compressed bytes
    # read (a member count would need a first pass over a .tar.gz).
    try:
        with open(archive, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar, \
                image_progress(f"unpacking {os.path.basename(archive)}",
                               os.fstat(raw.fileno()).st_size, enabled=progress,
                               unit="MB") as advance:
            done = 0
            if not hasattr(tarfile, "data_filter"):  # Python < 3.10.12 / 3.11.4
                raise DatasetError(
                    f"Cannot unpack {archive!r} safely: this Python's tarfile has no 'data' "
                    "filter (added in 3.10.12 and 3.11.4). Upgrade Python, or unpack the "
                    "archive yourself and point data.root at the folder.")
            for member in tar:
                # The 'data' filter refuses absolute paths, '..', links that leave the
                # tree and device files: an archive cannot write outside its folder.
                tar.extract(member, destination, filter="data")
                advance(raw.tell() - done)
                done = raw.tell()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DatasetError(
            f"Could not unpack {archive!r}: it is corrupt or not a tar archive ({exc}). "
            "Re-download or re-create it."
        ) from exc


def publish(staging: str, final: str) -> None:
    """Atomically move a finished cache entry into place; if another process won the race,
    keep theirs."""
    os.chmod(staging, 0o755)  # mkdtemp makes 0700; let others sharing the cache read it
    try:
        os.rename(staging, final)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not os.path.isdir(final):
            raise


def visible_entries(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(
            (e for e in entries if not e.name.startswith(".") and e.name != "__MACOSX"),
            key=lambda e: e.name,
        )


def is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def describe_folder(folder: str, limit: int = 8) -> str:
    """What a folder holds, for error messages: "it holds a/, b.txt, ... (12 entries)"."""
    if not os.path.isdir(folder):
        return f"{folder!r} does not exist"
    entries = visible_entries(folder)
    if not entries:
        return f"{folder!r} is empty"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return f"{folder!r} holds {', '.join(names)}{more}"


def unwrap_single_folder(tree: str) -> str:
    # Archives often hold one top-level folder (`tar czf mydata.tar.gz mydata`); descend
    # into it when it is the only entry. (A lone class folder would carry no label
    # information anyway, so reading it as unlabeled loses nothing.)
    entries = visible_entries(tree)
    if len(entries) == 1 and entries[0].is_dir() and entries[0].name not in ("train", "test"):
        return unwrap_single_folder(entries[0].path)
    return tree


def files_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        found.extend(
            os.path.join(dirpath, f) for f in filenames if is_image(f) and not f.startswith(".")
        )
    return sorted(found)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
