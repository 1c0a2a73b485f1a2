"""Replace a whole folder at once: write a complete sibling, then swap it into place.

A save into an existing folder that renamed its files over the old ones one by one could fail
between two renames (out of disk, a signal, a full quota) and leave new weights beside the
old config, a folder that neither version can load. Here the new folder is written complete
beside the target, files that slimkit does not manage (a tokenizer, notes, checkpoints) are
carried over as hard links (copies where links are impossible), and the two folders are
exchanged in one ``renameat2(RENAME_EXCHANGE)`` on Linux: at every instant the target path
holds either the whole old folder or the whole new one. Where the exchange is unavailable the
old folder is renamed aside, the new one renamed in, and the old one renamed back if that
fails; it is deleted only once the new one is in place.

Written files get ordinary permissions (``0o666`` / ``0o777`` under the umask):
``safetensors`` and ``tempfile.mkdtemp`` create ``0600`` files and ``0700`` folders, which a
serving user other than the writer cannot read.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
OLD_MARK = ".old-"  # the previous contents while a fallback swap is under way


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def ordinary_permissions(path: Path, directory: bool = False) -> None:
    """rw-r--r-- (rwxr-xr-x for folders) under the umask, as ``open`` / ``mkdir`` give."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths atomically (Linux ``renameat2``); OSError where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        raise OSError(errno.ENOSYS, "renameat2 is not available") from None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _carry(src: Path, dst: Path) -> None:
    """Hard-link (or copy) ``src`` - a file, a link or a folder tree - to ``dst``."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        dst.mkdir()
        shutil.copystat(src, dst)
        for child in src.iterdir():
            _carry(child, dst / child.name)
    else:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def _swap_into_place(new: Path, target: Path) -> None:
    """Put the complete folder ``new`` at ``target`` and delete what was there."""
    try:
        _exchange(new, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
    else:
        shutil.rmtree(new, ignore_errors=True)  # now the old contents
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}{OLD_MARK}", dir=target.parent))
    old = aside / target.name
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def replace_folder(target: Path, fill: Callable[[Path], None], managed: Collection[str]) -> Path:
    """Write a folder at ``target`` with ``fill(staging_folder)``, all at once.

    Entries of an existing ``target`` whose names are not in ``managed`` (and that ``fill``
    did not write) are carried into the new folder. A failure anywhere leaves ``target`` as
    it was and removes the staging folder."""
    target = Path(os.path.realpath(target)) if Path(target).is_symlink() else Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
    try:
        fill(staging)
        for file in staging.iterdir():
            if file.is_file() and not file.is_symlink():
                ordinary_permissions(file)
        if target.exists():
            for entry in target.iterdir():
                if entry.name not in managed and not (staging / entry.name).exists():
                    _carry(entry, staging / entry.name)
            os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
            _swap_into_place(staging, target)
        else:
            ordinary_permissions(staging, directory=True)
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def interrupted_swap(target: Path) -> Path | None:
    """The previous contents of ``target`` left aside by a fallback swap that was killed
    between its two renames (None when there are none)."""
    parent = Path(target).parent
    if not parent.is_dir():
        return None
    for aside in sorted(parent.glob(f".{Path(target).name}{OLD_MARK}*")):
        if (aside / Path(target).name).is_dir():
            return aside / Path(target).name
    return None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks (weights files can be large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
