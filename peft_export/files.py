"""Writing files without losing data: atomic files and folders, self-cleaning temporary names, inputs that are
never overwritten, one-line errors for a full disk (torch-free; the runtime uses it).

Every peft-export command writes through this module:

- :func:`atomic_write` writes a file under a temporary name in the target's folder and renames it into place
  only when it is complete; :func:`together` groups several such files (a label image and its summary) so they
  land one after the other only when all of them were written; :func:`atomic_dir` builds a folder (an export) next
  to its target and swaps it in, the previous folder intact until the new one is complete.
- Temporary names are recognisable: ``.<name>.peft-export-tmp-<host>-<pid>-<random>[.suffix]`` (and
  ``.<name>.peft-export-old-...`` for a folder being replaced). :func:`clean_stale` removes those whose process is
  gone (same host) or that are older than :data:`STALE_AFTER_S` (another host: shared file systems), and puts a
  replaced folder back when a crash left its target missing. Commands call it on their output folder at start,
  so ``kill -9`` leaves nothing behind after the next run.
- :func:`peft_export.paths.refuse_inputs` (beside this module) refuses an output that would destroy an input.
- Any ``OSError`` while writing becomes :class:`~peft_export.errors.WriteError`: one line naming the target and the
  free space on its disk; the temporary file is removed and the previous output stays as it was.

Files and folders are created with the user's umask (never the 0600/0700 of ``tempfile``).
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from peft_export.errors import WriteError

log = logging.getLogger(__name__)

TMP_TAG = "peft-export-tmp"
OLD_TAG = "peft-export-old"
STALE_AFTER_S = 24 * 3600  # temporary entries of another host (or a reused pid) older than this are removed
_NAME_MAX = 120  # characters of the target's name kept in a temporary name (file names are limited to 255 bytes)
_TEMP = re.compile(r"^\.(?P<name>.*)\.(?P<tag>peft-export-(?:tmp|old))-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-"
                   r"(?P<rand>[0-9a-f]{8})(?P<suffix>\.[A-Za-z0-9]{1,8})?$")
CRASH_ENV = "PEFT_EXPORT_TEST_CRASH_AT"  # tests: SIGKILL this process at the N-th crash point (see crash_point)
CRASH_LOG_ENV = "PEFT_EXPORT_TEST_CRASH_LOG"  # tests: append each crash point's name to this file


# ---- temporary names ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_name(name: str, *, tag: str = TMP_TAG, suffix: str = "") -> str:
    """A recognisable temporary name for ``name`` (see the module docstring)."""
    short = name if len(name) <= _NAME_MAX else name[:_NAME_MAX] + "~"
    suffix = suffix if re.fullmatch(r"\.[A-Za-z0-9]{1,8}", suffix or "") else ""
    return f".{short}.{tag}-{_host()}-{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def temp_path(target: str | os.PathLike, *, tag: str = TMP_TAG) -> Path:
    """A temporary path beside ``target`` (same folder, so that a rename moves it into place atomically); it keeps
    the target's suffix for writers that look at it."""
    target = Path(target)
    return target.parent / temp_name(target.name, tag=tag, suffix=target.suffix)


@dataclass(frozen=True)
class TempEntry:
    path: Path
    name: str  # the target's name ("~" at the end when it was cut)
    tag: str
    host: str
    pid: int

    @property
    def target(self) -> Path | None:
        return None if self.name.endswith("~") else self.path.parent / self.name


def parse_temp(path: str | os.PathLike) -> TempEntry | None:
    """The parts of a temporary name made by :func:`temp_name`, or None for any other name."""
    p = Path(path)
    m = _TEMP.match(p.name)
    if m is None:
        return None
    return TempEntry(p, m["name"], m["tag"], m["host"], int(m["pid"]))


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill would terminate the process: go by age there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process
    return True


def is_stale(entry: TempEntry, *, now: float | None = None, max_age_s: float = STALE_AFTER_S) -> bool:
    """Whether a temporary entry belongs to no running writer: its process is gone (this host), or it was not
    touched for ``max_age_s`` (another host, or a pid reused since)."""
    try:
        age = (now or time.time()) - entry.path.lstat().st_mtime
    except FileNotFoundError:
        return False
    if entry.host == _host() and not _alive(entry.pid):
        return True
    return age > max_age_s


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def clean_stale(folder: str | os.PathLike, *, recursive: bool = False, max_age_s: float = STALE_AFTER_S
                ) -> list[Path]:
    """Remove what crashed writers left in ``folder`` (sub-folders too with ``recursive``): temporary files and
    folders of processes that are gone. A folder that was being replaced when its writer died is put back when its
    target is missing (the crash fell between the two renames), else removed. Returns the paths handled. Races with
    another process cleaning the same folder are harmless."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    handled: list[Path] = []
    now = time.time()
    for root, dirs, names in os.walk(folder):
        for name in [*dirs, *names]:
            entry = parse_temp(Path(root) / name)
            if entry is None or not is_stale(entry, now=now, max_age_s=max_age_s):
                continue
            try:
                target = entry.target
                if entry.tag == OLD_TAG and target is not None and not target.exists() and not target.is_symlink():
                    os.rename(entry.path, target)
                    log.warning("restored %s (a replacement of it was interrupted)", target)
                elif entry.tag == OLD_TAG and target is None:
                    continue  # cannot tell where it belongs: keep it
                else:
                    _remove(entry.path)
                    log.debug("removed %s (left by an interrupted run)", entry.path)
                handled.append(entry.path)
            except OSError:
                continue
        dirs[:] = [d for d in dirs if recursive and parse_temp(d) is None and not os.path.islink(Path(root) / d)]
    return handled


def stray_files(folder: str | os.PathLike) -> list[Path]:
    """Every temporary entry below ``folder``, stale or not (tests: nothing must remain after a run)."""
    return sorted(p for p in Path(folder).rglob("*") if parse_temp(p) is not None)


# ---- errors ------------------------------------------------------------------------------------------------

def _existing(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _mount(path: Path) -> Path:
    p = _existing(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_space(path: str | os.PathLike) -> str:
    """'12.3 GiB free on /data': the free space of the disk that holds ``path`` (or its nearest existing parent)."""
    try:
        free = shutil.disk_usage(_existing(Path(path))).free
        return f"{human_bytes(free)} free on {_mount(Path(path))}"
    except OSError:
        return "free space unknown"


def write_error(target: str | os.PathLike, exc: OSError) -> WriteError:
    """One line for an OSError while writing ``target``: what, why, and the free space there."""
    why = exc.strerror or type(exc).__name__
    return WriteError(f"cannot write {target}: {why} ({free_space(target)}); nothing was changed there")


def describe_os_error(exc: OSError) -> str:
    """One line for any OSError that reached the top: the path, the reason, the free space there."""
    path = exc.filename
    why = exc.strerror or str(exc) or type(exc).__name__
    if path is None:
        return f"{why} ({free_space(Path.cwd())})"
    return f"{path}: {why} ({free_space(path)})"


# ---- crash points (tests) -----------------------------------------------------------------------------------

_crash_count = 0


def crash_point(name: str) -> None:
    """Fault injection for tests: with ``PEFT_EXPORT_TEST_CRASH_AT=N`` the process kills itself (SIGKILL, like
    ``kill -9``) at the N-th point where the files on disk change; ``PEFT_EXPORT_TEST_CRASH_LOG`` lists them."""
    global _crash_count
    at, log_path = os.environ.get(CRASH_ENV), os.environ.get(CRASH_LOG_ENV)
    if not at and not log_path:
        return
    _crash_count += 1
    if log_path:
        with open(log_path, "a") as fh:
            fh.write(f"{_crash_count} {name}\n")
    if at and _crash_count == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


# ---- atomic files -------------------------------------------------------------------------------------------

@dataclass
class _Group:
    items: list[tuple[Path, Path]] = field(default_factory=list)  # (temporary, target), in the order written

    def staged(self, target: str | os.PathLike) -> Path:
        target = Path(target)
        for tmp, t in self.items:
            if t == target:
                return tmp
        raise KeyError(f"{target} was not written in this group")

    def discard(self) -> None:
        for tmp, _ in self.items:
            tmp.unlink(missing_ok=True)
        self.items.clear()

    def commit(self) -> None:
        """Rename the files into place, the last written first: the record that describes the others lands before
        them, and the files it describes are removed before it lands, so a crash in between leaves a record whose
        data is missing (not done, redone by the next run), never a new record beside old data."""
        pending = list(reversed(self.items))
        try:
            for _, target in pending[1:]:
                if target.is_file() or target.is_symlink():
                    try:
                        target.unlink()
                    except OSError as exc:
                        raise write_error(target, exc) from None
                    crash_point(f"group-clear {target.name}")
            while pending:
                tmp, target = pending[0]
                try:
                    os.replace(tmp, target)
                except OSError as exc:
                    raise write_error(target, exc) from None
                pending.pop(0)
                crash_point(f"group-commit {target.name}")
        finally:
            for tmp, _ in pending:
                tmp.unlink(missing_ok=True)
            self.items.clear()


_GROUP: contextvars.ContextVar[_Group | None] = contextvars.ContextVar("peft_export_files_group", default=None)


@contextmanager
def together() -> Iterator[_Group]:
    """Files written with :func:`atomic_write` inside this block are moved into place together at its end, only
    when the block succeeded (the last written first); otherwise none of them. ``group.staged(target)`` is the
    temporary file of a target written in the block (to hash it before the record that names it is written)."""
    group = _Group()
    token = _GROUP.set(group)
    try:
        yield group
    except BaseException:
        group.discard()
        raise
    finally:
        _GROUP.reset(token)
    group.commit()


def _mkdir(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise write_error(folder, exc) from None


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write ``path`` through ``write_fn(tmp)`` (``tmp``: a recognisable temporary name beside it, created empty
    with the user's umask) and rename it into place only when that succeeded; inside :func:`together`, at the end
    of the block. An OSError becomes one :class:`WriteError` line; the temporary file is always removed."""
    path = Path(path)
    _mkdir(path.parent)
    tmp = temp_path(path)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as exc:
        raise write_error(path, exc) from None
    try:
        crash_point(f"created {path.name}")
        write_fn(tmp)
        with open(tmp, "rb+") as fh:  # on disk before it replaces anything (a power cut keeps the old file)
            os.fsync(fh.fileno())
        crash_point(f"written {path.name}")
        group = _GROUP.get()
        if group is not None:
            group.items.append((tmp, path))
            return path
        os.replace(tmp, path)
        crash_point(f"replaced {path.name}")
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ---- atomic folders -----------------------------------------------------------------------------------------

def _is_write_failure(exc: OSError, tmp: Path) -> bool:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        return True
    name = exc.filename
    return name is not None and str(Path(os.path.abspath(name))).startswith(str(tmp))


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Build a folder: yields an empty temporary folder beside ``target`` (user's umask); when the block succeeds
    it replaces ``target`` (a previous folder or file there is moved aside, the new one renamed in, the old one
    removed); when it fails nothing at ``target`` changes and the temporary folder is removed. A crash leaves only
    recognisable names that :func:`clean_stale` removes, or puts back, on the next run. The caller decides whether
    an existing ``target`` may be replaced (``--force``)."""
    target = Path(target)
    _mkdir(target.parent)
    clean_stale(target.parent)
    tmp = _temp_dir(target)
    try:
        crash_point(f"created {target.name}/")
        yield tmp
        crash_point(f"written {target.name}/")
        _swap(tmp, target)
    except OSError as exc:
        _remove(tmp)
        if _is_write_failure(exc, tmp):
            raise write_error(target, exc) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _temp_dir(target: Path) -> Path:
    """A new, recognisably named folder beside ``target`` (a failure: the write error naming ``target``)."""
    tmp = temp_path(target)
    try:
        os.mkdir(tmp, 0o777)
    except OSError as exc:
        raise write_error(target, exc) from None
    return tmp


def _swap(new: Path, target: Path) -> None:
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / temp_name(target.name, tag=OLD_TAG)
        os.rename(target, old)
        crash_point(f"moved aside {target.name}")
    try:
        os.rename(new, target)
    except BaseException:
        if old is not None:
            os.rename(old, target)
        raise
    crash_point(f"renamed into place {target.name}")
    if old is not None:
        _remove(old)


@contextmanager
def scratch_dir(beside: str | os.PathLike) -> Iterator[Path]:
    """A temporary working folder next to ``beside`` (same disk, so results can be renamed from it), removed at the
    end of the block; recognisable, so a crash leaves nothing that the next run does not remove."""
    beside = Path(beside)
    _mkdir(beside.parent)
    tmp = _temp_dir(beside)
    try:
        crash_point(f"created scratch for {beside.name}")
        yield tmp
    except OSError as exc:
        if _is_write_failure(exc, tmp):
            raise write_error(beside, exc) from None
        raise
    finally:
        _remove(tmp)


def move_into_place(src: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Rename a finished file (e.g. from :func:`scratch_dir`) onto ``target`` atomically; OSError -> WriteError."""
    try:
        os.replace(src, target)
    except OSError as exc:
        raise write_error(target, exc) from None
    crash_point(f"replaced {Path(target).name}")
    return Path(target)
