"""Files: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``train_info.json``), written as one unit,
read back as one unit and verified.

**An adapter folder is one unit.** :func:`write_adapter` writes every file of the adapter into a fresh sibling
temp folder (``.<name>.peftkit-tmp-<id>``), fsyncs them, then swaps that folder in with a single atomic
``renameat2(RENAME_EXCHANGE)`` (Linux; elsewhere: ``rename`` the old folder aside, ``rename`` the new one in — the
target is missing for an instant, which readers retry over). A reader in another process, or after a crash at any
instant, finds either the old complete folder or the new complete one. Other entries of the old folder (a run's
``checkpoints/``, a user's notes) are moved into the new one; the adapter's own files that the new save does not
write (a stale ``train_info.json``) are dropped with the old unit.

The weights file's safetensors metadata holds the sha256 of the tensors (header entries + data) and of every other
file of the unit: a pair from two different saves, a flipped bit or a truncated file is refused on read. A temp
folder left by a killed save is never read; the next save into the same place removes it (a save in progress holds
an ``flock`` on its temp folder, so only dead saves' leftovers are removed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from .errors import PeftkitError

# OS file locks: flock on POSIX, msvcrt's byte-range locks on Windows; where a system has neither, a lock is a file
# created with O_EXCL that holds its owner's pid (a stale one, whose owner is gone, is taken over). Importing this
# module never fails for want of one of them.
try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
try:
    import msvcrt
except ImportError:  # POSIX
    msvcrt = None  # type: ignore[assignment]
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
RUN_INFO_NAME = "train_info.json"
#: the files that make up an adapter unit: replaced together, never carried over from an older save
UNIT_FILES = (CONFIG_NAME, WEIGHTS_NAME, RUN_INFO_NAME, "adapter_model.bin", "README.md")
_TMP_TAG, _OLD_TAG = ".peftkit-tmp-", ".peftkit-old-"
_DIRLOCK_TAG = ".peftkit-dirlock"  # the lock file of a folder where folders cannot be locked (Windows)
_HASH_TENSORS = "peftkit_sha256_tensors"
_HASH_FILES = "peftkit_sha256_files"
ID_KEY = "peftkit_adapter_id"
READ_RETRIES = 40  # × 25 ms: how long a reader waits out a concurrent save's swap


# -- small file helpers -------------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    except OSError:  # Windows cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over ``path`` (never a half-written file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_atomic_write_bytes = atomic_write_bytes  # the older spelling, used inside the core


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, atomically."""
    _atomic_write_bytes(Path(path), dumps(data))


def dumps(data: dict[str, Any], *, sort: bool = True) -> bytes:
    """Indented JSON bytes, keys sorted unless ``sort=False`` (an adapter config: the order of ``overrides`` decides
    which one wins); a diverged run's NaN loss stays writable, configs refuse NaN on their own."""
    return (json.dumps(data, indent=2, sort_keys=sort) + "\n").encode()


def parse_json(raw: bytes | str, source: str) -> dict[str, Any]:
    """A JSON object; :class:`PeftkitError` when it is not valid JSON or not an object."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise PeftkitError(f"{source} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{source} must hold a JSON object")
    return data


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON object from ``path``; :class:`PeftkitError` when it is not valid JSON or not an object."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise PeftkitError(f"cannot read {p}: {e.strerror or e}") from None
    return parse_json(raw, str(p))


# -- tensors ------------------------------------------------------------------------------------------------------
def check_finite(tensors: dict[str, torch.Tensor], source: str, what: str = "load") -> None:
    """Refuse NaN/inf in any floating tensor, naming the first one (``allow_nonfinite=True`` skips this)."""
    for k, v in tensors.items():
        if (v.is_floating_point() or v.is_complex()) and v.numel() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise PeftkitError(f"{source}: tensor {k!r} holds {bad} NaN/inf value(s); refusing to {what} it "
                               "(allow_nonfinite=True to " + ("inspect it)" if what == "load" else "write it anyway)"))


def _header(blob: bytes) -> tuple[dict[str, Any], int]:
    """The safetensors header (JSON) and the offset where the data starts."""
    if len(blob) < 8:
        raise ValueError("file shorter than its 8-byte header length")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError("header length beyond the end of the file")
    header = json.loads(blob[8:8 + n])
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return header, 8 + n


def _tensor_hash(header: dict[str, Any], blob: bytes, start: int) -> str:
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    h = hashlib.sha256(json.dumps(entries, sort_keys=True).encode())
    h.update(memoryview(blob)[start:])
    return h.hexdigest()


def weights_metadata(blob: bytes) -> dict[str, str]:
    try:
        meta = _header(blob)[0].get("__metadata__") or {}
    except (ValueError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def serialise_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str],
                      files: dict[str, bytes]) -> bytes:
    """The safetensors bytes of ``tensors`` with ``metadata`` plus the sha256 of the tensors and of ``files``."""
    plain = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    first = save(plain, metadata=metadata)
    header, start = _header(first)
    meta = {**metadata, _HASH_TENSORS: _tensor_hash(header, first, start),
            _HASH_FILES: json.dumps({n: sha256(b) for n, b in sorted(files.items())})}
    return save(plain, metadata=meta)


# -- writing a unit -----------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2``); False where the system or filesystem cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError, TypeError):  # TypeError: Windows has no CDLL(None)
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists. Off POSIX there is no harmless probe (and pid <= 0 is a pid not yet written):
    the owner is taken to live — a stale lock file is then removed by hand."""
    if os.name != "posix" or pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists
        return True
    return True


def _os_lock(fd: int, block: bool) -> bool:
    """An exclusive OS lock on the open file ``fd`` (flock; on Windows msvcrt's lock of one byte far past the data,
    so the owner's pid stays readable): True when taken, False when another holder has it (``block``: wait)."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True
    os.lseek(fd, 1 << 30, os.SEEK_SET)
    while True:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            if not block:
                return False
            time.sleep(0.05)


@dataclass
class _Held:
    """A lock taken by :func:`_lock_file` / :func:`_lock_dir`; :meth:`release` gives it back."""

    fd: int
    path: Path | None = None  # a lock file to remove on release (lock-file backends)

    def release(self) -> None:
        if self.path is not None and fcntl is not None:
            with contextlib.suppress(OSError):  # POSIX: unlink while locked (a waiter re-checks the inode)
                os.unlink(self.path)
        os.close(self.fd)
        if self.path is not None and fcntl is None:  # Windows cannot unlink an open file
            with contextlib.suppress(OSError):
                os.unlink(self.path)


def _lock_file(path: Path, block: bool = False) -> _Held | None:
    """An exclusive lock on the lock file ``path`` (created if missing, its owner's pid written into it), or None
    when another live process holds it. Released by :meth:`_Held.release` (which removes the file) or by the OS
    when the process ends (for the O_EXCL backend: taken over once the recorded pid is gone)."""
    while True:
        if fcntl is None and msvcrt is None:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if not _pid_alive(_lock_owner(path)):
                    with contextlib.suppress(OSError):
                        os.unlink(path)
                    continue
                if not block:
                    return None
                time.sleep(0.05)
                continue
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            if not _os_lock(fd, block):
                os.close(fd)
                return None
            try:  # the file we locked must still be the one at the path (a finishing owner unlinks it)
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
        os.lseek(fd, 0, os.SEEK_SET)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return _Held(fd, path)


def _lock_owner(path: Path) -> int:
    """The pid written in the lock file ``path``; 0 when unreadable (then treated as alive: never taken over)."""
    try:
        with open(path, "rb") as f:
            return int(f.read(64).decode(errors="replace").strip())
    except (OSError, ValueError):
        return 0


def _lock_dir(path: Path, block: bool = True) -> _Held | None:
    """An exclusive lock that says "a save is using the folder ``path``"; None if another process holds it. With
    flock: on the folder itself; elsewhere (folders cannot be opened or locked): on the sibling file
    ``.<name>.peftkit-dirlock``."""
    if fcntl is None:
        return _lock_file(path.parent / f".{path.name}{_DIRLOCK_TAG}", block)
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY)
    if not _os_lock(fd, block):
        os.close(fd)
        return None
    return _Held(fd)


def _carry(src: Path, dst: Path, skip: set[str]) -> None:
    """Move every entry of ``src`` that is not part of an adapter unit into ``dst`` (unless ``dst`` has it)."""
    try:
        names = os.listdir(src)
    except OSError:
        return
    for n in names:
        if n in skip or n in UNIT_FILES or (dst / n).exists() or (dst / n).is_symlink():
            continue
        os.rename(src / n, dst / n)


def clean_leftovers(target: Path) -> None:
    """Remove the temp folders of dead saves into ``target`` (a live save holds a lock on its own). Entries a dead
    save was carrying over (a run's checkpoints) go back into ``target``; an old folder set aside by a save that
    died before its new folder was in place becomes ``target`` again."""
    parent = target.parent
    try:
        siblings = [p for p in parent.iterdir() if p.name.startswith(f".{target.name}{_TMP_TAG}")
                    or p.name.startswith(f".{target.name}{_OLD_TAG}")]
    except OSError:
        return
    for p in siblings:
        if not p.is_dir() or p.is_symlink():
            continue
        try:
            held = _lock_dir(p, block=False)
        except OSError:
            continue
        if held is None:  # a save in progress
            continue
        try:
            if not target.exists() and _OLD_TAG in p.name and (p / CONFIG_NAME).is_file():
                os.rename(p, target)
                continue
            if target.is_dir():
                _carry(p, target, set())
            shutil.rmtree(p, ignore_errors=True)
        finally:
            held.release()
    for p in siblings:  # lock files of dead saves' folders (where folders are locked through a file)
        lock = parent / f".{p.name}{_DIRLOCK_TAG}"
        if not p.exists() and lock.is_file() and (held := _lock_file(lock)) is not None:
            held.release()
    if target.is_dir():  # temp files of the older file-by-file save
        for p in target.glob(".adapter_*.tmp"):
            with contextlib.suppress(OSError):
                p.unlink()


def write_unit(directory: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Replace the adapter unit in ``directory`` by ``files`` (name → bytes), atomically as a whole (module
    docstring). Entries of an existing folder that are not unit files are kept."""
    d = Path(directory).absolute()
    if d.is_symlink():  # swap the folder the link points to, not the link
        d = d.resolve()
    if d.exists() and not d.is_dir():
        raise PeftkitError(f"cannot save adapter: {d} exists and is not a directory")
    d.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(d)
    inside = os.getcwd() == str(d)  # saving into the current directory: follow the new folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}{_TMP_TAG}", dir=d.parent))
    lock_new = _lock_dir(tmp)
    lock_old: _Held | None = None
    aside: Path | None = None
    try:
        for name, data in files.items():
            with os.fdopen(os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, 0o755 & ~_umask())
        _fsync_dir(tmp)
        try:
            os.rename(tmp, d)  # no folder there yet (an empty one is replaced too)
            _fsync_dir(d.parent)
            if inside:
                os.chdir(d)
            return
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        lock_old = _lock_dir(d)
        if _exchange(tmp, d):
            aside = tmp  # tmp now holds the old folder
        else:  # no atomic swap here: set the old folder aside, move the new one in (readers retry over the gap)
            aside = d.parent / f".{d.name}{_OLD_TAG}{tmp.name.rsplit('-', 1)[-1]}"
            os.rename(d, aside)
            try:
                os.rename(tmp, d)
            except BaseException:
                os.rename(aside, d)
                aside = None
                raise
        _fsync_dir(d.parent)
        if inside:
            os.chdir(d)
        _carry(aside, d, set(files))
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        if aside is None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if lock_new is not None:
            lock_new.release()
        if lock_old is not None:
            lock_old.release()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def existing_adapter_id(directory: str | os.PathLike) -> str | None:
    """The adapter id stored in the adapter in ``directory``; "" for an adapter without one (another writer), None
    when the folder holds no adapter."""
    d = Path(directory)
    if not (d / CONFIG_NAME).is_file() and not (d / WEIGHTS_NAME).is_file():
        return None
    try:
        with open(d / WEIGHTS_NAME, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            meta = json.loads(f.read(min(n, 1 << 24)) or b"{}").get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError, AttributeError):
        return ""
    return str(meta.get(ID_KEY, "")) if isinstance(meta, dict) else ""


def write_adapter(
    directory: str | os.PathLike, config: dict[str, Any], tensors: dict[str, torch.Tensor],
    metadata: dict[str, str] | None = None, *, extra: dict[str, bytes] | None = None, overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> None:
    """Serialise config, weights and ``extra`` files (e.g. ``train_info.json``) in memory, then write them as one
    unit (:func:`write_unit`). A folder holding an adapter with another id (``metadata[ID_KEY]``) is replaced only
    with ``overwrite=True``; non-finite tensors only with ``allow_nonfinite=True``."""
    d = Path(directory)
    if d.exists() and not d.is_dir():
        raise PeftkitError(f"cannot save adapter: {d} exists and is not a directory")
    metadata = dict(metadata or {})
    if not allow_nonfinite:
        check_finite(tensors, f"cannot save adapter to {d}", "save")
    if not overwrite:
        old = existing_adapter_id(d)
        if old is not None and old != metadata.get(ID_KEY):
            raise PeftkitError(f"{d} already holds another adapter; pass overwrite=True (CLI: --overwrite) to "
                               "replace it, or save elsewhere")
    try:
        files = {CONFIG_NAME: dumps(config, sort=False), **(extra or {})}
        files[WEIGHTS_NAME] = serialise_tensors(tensors, metadata, files)
    except (RuntimeError, TypeError, ValueError, OSError) as e:  # e.g. tensors sharing memory, unserialisable config
        raise PeftkitError(f"cannot serialise adapter for {d}: {e}") from None
    try:
        write_unit(d, files)
    except OSError as e:
        raise PeftkitError(f"cannot save adapter to {d}: {e.strerror or e}") from None


# -- reading a unit -----------------------------------------------------------------------------------------------
@dataclass
class AdapterFiles:
    """The files of one adapter unit, read together from one folder and checked against each other."""

    source: str
    config: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)

    @property
    def weights(self) -> bytes | None:
        return self.files.get(WEIGHTS_NAME)

    @property
    def metadata(self) -> dict[str, str]:
        return weights_metadata(self.weights) if self.weights is not None else {}

    def tensors(self) -> dict[str, torch.Tensor]:
        p = f"{self.source}/{WEIGHTS_NAME}"
        if self.weights is None:
            raise PeftkitError(f"adapter weights missing: {p} does not exist")
        try:
            return dict(sorted(load(self.weights).items()))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise PeftkitError(f"{p} is corrupted or truncated ({e})") from None


class _Torn(PeftkitError):
    """The folder changed while it was read (a concurrent save): read again."""


def _swapping(d: Path, ino: int | None) -> bool:
    """Whether ``d`` is being replaced by a save right now (its folder changed, or a save's temp folder is there)."""
    try:
        if ino is not None and os.stat(d).st_ino != ino:
            return True
        return any(p.name.startswith((f".{d.name}{_TMP_TAG}", f".{d.name}{_OLD_TAG}")) for p in d.parent.iterdir())
    except OSError:
        return False


def _read_files(d: Path) -> tuple[dict[str, bytes], int | None]:
    """The unit's files in the folder ``d`` and the folder's inode. Opened once and read relative to that handle
    (a swap in between cannot mix two folders); where folders cannot be opened (Windows) by path, the checksums
    still catching a mixed pair."""
    missing = f"no adapter found: {d / CONFIG_NAME} does not exist"
    files: dict[str, bytes] = {}
    if os.open not in os.supports_dir_fd or not _O_DIRECTORY:
        if not d.exists():
            raise (_Torn if _swapping(d, None) else PeftkitError)(missing)
        if not d.is_dir():
            raise PeftkitError(f"no adapter found: {d} is not a folder")
        for name in (CONFIG_NAME, WEIGHTS_NAME, RUN_INFO_NAME):
            with contextlib.suppress(FileNotFoundError):
                files[name] = (d / name).read_bytes()
        return files, None
    try:
        dfd = os.open(d, os.O_RDONLY | _O_DIRECTORY)
    except FileNotFoundError:
        raise (_Torn if _swapping(d, None) else PeftkitError)(missing) from None
    except NotADirectoryError:
        raise PeftkitError(f"no adapter found: {d} is not a folder") from None
    ino = os.fstat(dfd).st_ino
    try:
        for name in (CONFIG_NAME, WEIGHTS_NAME, RUN_INFO_NAME):
            try:
                fd = os.open(name, os.O_RDONLY, dir_fd=dfd)
            except FileNotFoundError:
                continue
            with os.fdopen(fd, "rb") as f:
                files[name] = f.read()
    finally:
        os.close(dfd)
    return files, ino


def _read_once(d: Path) -> AdapterFiles:
    missing = f"no adapter found: {d / CONFIG_NAME} does not exist"
    files, ino = _read_files(d)
    if CONFIG_NAME not in files:
        raise (_Torn if _swapping(d, ino) else PeftkitError)(missing)
    blob = files.get(WEIGHTS_NAME)
    if blob is None and _swapping(d, ino):
        raise _Torn(f"adapter weights missing: {d / WEIGHTS_NAME} does not exist")
    meta = weights_metadata(blob) if blob is not None else {}
    if _HASH_TENSORS in meta:
        try:
            header, start = _header(blob)  # type: ignore[arg-type]
            ok = _tensor_hash(header, blob, start) == meta[_HASH_TENSORS]  # type: ignore[arg-type]
        except (ValueError, UnicodeDecodeError):
            ok = False
        if not ok:
            raise PeftkitError(f"{d / WEIGHTS_NAME} is corrupted or truncated: its tensors do not match their "
                               "sha256 (a changed byte, dtype or shape, or a cut-off file)")
        try:
            hashes = json.loads(meta.get(_HASH_FILES, "{}"))
        except ValueError:
            hashes = None
        if not isinstance(hashes, dict) or CONFIG_NAME not in hashes:
            raise PeftkitError(f"{d / WEIGHTS_NAME} is damaged: its file checksums are missing or unreadable")
        for name, want in hashes.items():
            if name not in files and name != CONFIG_NAME:
                continue  # an optional file (run info) left out when the adapter was copied: nothing to mix up
            if name not in files or sha256(files[name]) != want:
                raise (_Torn if _swapping(d, ino) else PeftkitError)(
                    f"{d}: {name} does not belong with {WEIGHTS_NAME} (sha256 checksum mismatch: the file was changed, "
                    "or it comes from another save)")
        files = {n: b for n, b in files.items() if n == WEIGHTS_NAME or n in hashes}  # a stray run info is not ours
    return AdapterFiles(str(d), parse_json(files[CONFIG_NAME], str(d / CONFIG_NAME)), files)


def read_adapter_files(directory: str | os.PathLike) -> AdapterFiles:
    """Config, weights and run info of the adapter in ``directory``, read through one folder handle (so a
    concurrent swap cannot mix two saves) and verified against the checksums stored with the weights. A missing
    folder or a mismatch is retried briefly (a save swapping the folder in that instant), then reported."""
    d = Path(directory)
    for attempt in range(READ_RETRIES):
        try:
            return _read_once(d)
        except _Torn as e:
            if attempt == READ_RETRIES - 1:
                raise PeftkitError(str(e)) from None
            time.sleep(0.025)
    raise AssertionError("unreachable")  # pragma: no cover


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    return read_adapter_files(directory).config


def read_tensors(directory: str | os.PathLike) -> dict[str, torch.Tensor]:
    return read_adapter_files(directory).tensors()


def finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# -- one writer per run folder ------------------------------------------------------------------------------------
class RunLock:
    """An exclusive OS lock that says "a run is writing ``folder``": the lock file ``.<name>.peftkit-lock`` lives
    next to the folder (not inside it, so swapping the adapter unit in cannot drop it) and holds the owner's pid.
    ``flock`` on POSIX, ``msvcrt.locking`` on Windows (the OS releases either when the process exits or crashes);
    on a system with neither, a file created with ``O_EXCL`` (a stale one, whose owner is gone, is taken over).
    :meth:`release` also removes the file."""

    def __init__(self, folder: str | os.PathLike, what: str = "peftkit run") -> None:
        folder = Path(folder).absolute()
        folder.parent.mkdir(parents=True, exist_ok=True)
        self.path = folder.parent / f".{folder.name}.peftkit-lock"
        self._held = _lock_file(self.path)
        if self._held is None:
            owner = _lock_owner(self.path) or "?"
            raise PeftkitError(f"{folder} is in use by another {what} (pid {owner}); wait for it to finish or "
                               "choose another folder")

    @property
    def fd(self) -> int | None:
        return None if self._held is None else self._held.fd

    def release(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            held.release()
