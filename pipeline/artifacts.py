"""The data dir's layout, and the one way every artifact in it is written.

Layout. Every path under `paths.data` is built by `Layout` (PathsConfig and the stages ask it):
  stores/<role>.zarr           models/<role>.json          aligners/<name>/
  fusers/<variant>/
  metrics/<name>.json          plots/<name>.png            evaluate/<task>/
  details/<name>.json          report/                     .locks/<what>.lock
  inputs/<name>.json
A stage's record is two files of one name: details/<name>.json holds all of it (the report reads
it), metrics/<name>.json its few headline numbers (DVC shows it; pipeline/headlines.py picks them).
A `module:Class` aligner name is stored as `module.Class` (no colon in file names).

Writing. `Outputs` collects everything one stage writes (JSON, text, JSONL, bytes, matplotlib
figures, whole directories), each to a temporary name beside its target, and renames them into
place only when all of them were written: a failure (disk full, an error in the stage) leaves every
previous file as it was and removes the temporaries. A directory is built in a sibling temporary
folder and swapped in by two renames; the old one stays loadable until then, and a kill between the
two renames is repaired by the next write (the old folder is renamed back). A folder is only ever
replaced after `store.owned.check_replaceable` recognised it as one xmodel wrote.

Every write passes `faults.fault_point("writes")`, so the tests can fail any of them like a full disk.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pipeline.errors import UserError
from pipeline.faults import fault_point

TMP = ".tmp-"  # infix of every temporary name: `.<target name>.tmp-<random>`
OLD = ".old-"  # a replaced directory between the two renames of a swap


def file_name(name: str) -> str:
    """A name as part of a file name: `module:Class` → `module.Class`."""
    return name.replace(":", ".")


@dataclass(frozen=True)
class Layout:
    """Where every artifact of one data dir lives."""

    data: Path

    def store(self, role: str) -> Path:
        return self.data / "stores" / f"{role}.zarr"

    def manifest(self, role: str) -> Path:
        return self.data / "models" / f"{role}.json"

    def inputs(self, name: str) -> Path:
        # content hashes of a local input file (stage `inputs`; pipeline/inputs.py names them)
        return self.data / "inputs" / f"{name}.json"

    @property
    def aligners(self) -> Path:
        return self.data / "aligners"

    def aligner(self, name: str) -> Path:
        return self.aligners / file_name(name)

    def fuser(self, name: str) -> Path:
        # a trained fuser (pipeline/fuser.py), one per variant; its checkpoint is <fuser>/ckpt
        return self.data / "fusers" / file_name(name)

    @property
    def metrics_dir(self) -> Path:
        return self.data / "metrics"

    def metrics(self, name: str) -> Path:
        return self.metrics_dir / f"{file_name(name)}.json"

    @property
    def details_dir(self) -> Path:
        return self.data / "details"

    def details(self, name: str) -> Path:
        return self.details_dir / f"{file_name(name)}.json"

    def plot(self, name: str) -> Path:
        return self.data / "plots" / f"{file_name(name)}.png"

    def evaluate_dir(self, task: str) -> Path:
        return self.data / "evaluate" / task

    @property
    def report_dir(self) -> Path:
        return self.data / "report"

    def lock(self, what: str) -> Path:
        # outside every DVC output and dependency folder, so a lock file never changes a stage's hash
        return self.data / ".locks" / f"{file_name(what).replace('/', '.')}.lock"


def layout(params: Any) -> Layout:
    return Layout(Path(params.paths.data))


# ---------------------------------------------------------------------------------------------
# Values as strict JSON


def to_json(value: Any) -> Any:
    """`value` as strict JSON data: NaN and ±inf become null (JSON has no such numbers, and a score
    that is not a number must never read as one), numpy scalars and arrays become Python values."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if value is None or isinstance(value, (str, int, bool)):
        return value
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return to_json(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return str(value)


def dumps(value: Any, indent: int | None = 2, sort_keys: bool = False) -> str:
    return json.dumps(to_json(value), indent=indent, sort_keys=sort_keys, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Atomic outputs


def _failed(target: Path, e: OSError) -> UserError:
    why = e.strerror or str(e)
    fix = "free disk space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else f"check that {target.parent} is writable"
    return UserError(f"writing {target} failed ({why}): {fix} and rerun; nothing of this stage was replaced")


def raw_write(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` (a temporary or a file inside a temporary folder), through the fault point."""
    fault_point("writes")
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)


class Outputs:
    """A stage's outputs, written to temporaries and renamed into place together by `commit`.

        with Outputs() as out:          # commits on a clean exit, discards on an exception
            out.json(path, metrics)
            out.figure(fig, plot_path)
            out.directory(aligner_dir, build, is_ours=is_aligner_dir, what="aligner directory")
    """

    def __init__(self) -> None:
        self._files: list[tuple[Path, Path]] = []  # (temporary, target)
        self._dirs: list[tuple[Path, Path, Callable[[Path], bool], str]] = []
        self._token: Any = None

    def __enter__(self) -> Outputs:
        # the one-file shorthands below (write_json, save_figure, ...) called inside this block, by
        # any module, join these outputs instead of committing on their own
        self._token = _ACTIVE.set(self)
        return self

    def __exit__(self, kind, value, tb) -> None:
        _ACTIVE.reset(self._token)
        if kind is None:
            self.commit()
        else:
            self.discard()

    # -- files --------------------------------------------------------------------------------
    def file(self, path: Path | str, write: Callable[[Path], None]) -> Path:
        """write(tmp) writes the content of `path` to the temporary `tmp` beside it."""
        path = Path(path)
        with self._failing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            recover(path)
            fd, name = tempfile.mkstemp(prefix=_prefix(path, TMP), dir=path.parent)
            os.close(fd)
            tmp = Path(name)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; an artifact is an ordinary file
            self._files.append((tmp, path))
            write(tmp)
        return path

    @contextmanager
    def _failing(self, target: Path) -> Iterator[None]:
        """On any error: every temporary goes; an OSError (a full disk) becomes one line naming `target`."""
        try:
            yield
        except OSError as e:
            self.discard()
            raise _failed(target, e) from None
        except BaseException:
            self.discard()
            raise

    def blob(self, path: Path | str, data: bytes | str) -> Path:
        return self.file(path, lambda tmp: raw_write(tmp, data))

    def text(self, path: Path | str, text: str) -> Path:
        return self.blob(path, text)

    def json(self, path: Path | str, value: Any, sort_keys: bool = False) -> Path:
        return self.blob(path, dumps(value, sort_keys=sort_keys) + "\n")

    def jsonl(self, path: Path | str, rows: Iterable[Any]) -> Path:
        return self.blob(path, "".join(dumps(r, indent=None) + "\n" for r in rows))

    def figure(self, fig: Any, path: Path | str, **savefig: Any) -> Path:
        """A matplotlib figure, saved as `path`'s format (given explicitly: the temporary has no suffix)."""
        path = Path(path)
        savefig.setdefault("format", path.suffix.lstrip(".") or "png")
        def write(tmp: Path) -> None:
            fault_point("writes")
            fig.savefig(tmp, **savefig)

        return self.file(path, write)

    # -- directories --------------------------------------------------------------------------
    def directory(self, target: Path | str, build: Callable[[Path], None], is_ours: Callable[[Path], bool],
                  what: str = "folder") -> Path:
        """build(tmp) fills a fresh folder that replaces `target` at commit; `target` must be absent or
        recognised by is_ours (checked now and again at commit)."""
        target = Path(target)
        check_ours(target, is_ours, what)
        with self._failing(target):
            target.parent.mkdir(parents=True, exist_ok=True)
            recover(target)
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(target, TMP), dir=target.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; an artifact is an ordinary folder
            self._dirs.append((tmp, target, is_ours, what))
            build(tmp)
        return target

    # -- commit -------------------------------------------------------------------------------
    def commit(self) -> None:
        """Rename every temporary into place (folders first: a metrics file never describes a folder
        that is not there yet)."""
        try:
            for tmp, target, is_ours, what in self._dirs:
                check_ours(target, is_ours, what)
                _swap(tmp, target)
            for tmp, target in self._files:
                os.replace(tmp, target)
        except OSError as e:
            self.discard()
            raise _failed(target, e) from None
        self._files, self._dirs = [], []

    def discard(self) -> None:
        for tmp, _ in self._files:
            tmp.unlink(missing_ok=True)
        for tmp, *_ in self._dirs:
            shutil.rmtree(tmp, ignore_errors=True)
        self._files, self._dirs = [], []


def check_ours(target: Path, is_ours: Callable[[Path], bool], what: str) -> None:
    from store.owned import NotOurs, check_replaceable

    try:
        check_replaceable(target, is_ours, what)
    except NotOurs as e:
        raise UserError(str(e)) from None


def _swap(tmp: Path, target: Path) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=_prefix(target, OLD), dir=target.parent))
    os.rename(target, old / "dir")  # a kill here leaves it at old/dir: `recover` renames it back
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _prefix(target: Path, kind: str) -> str:
    # the writer's pid is in the name, so cleanup can tell a dead writer's leftovers from a live one's
    return f".{target.name}{kind}{os.getpid()}-"


def recover(target: Path) -> None:
    """Repair what a killed writer left beside `target`: a folder caught between the two renames of
    a swap is renamed back; its temporaries (only names we make, of dead processes) are removed."""
    parent = target.parent
    if not parent.is_dir():
        return
    for old in sorted(_leftovers(parent, f".{target.name}{OLD}")):
        if (old / "dir").is_dir() and not target.exists():
            os.rename(old / "dir", target)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in _leftovers(parent, f".{target.name}{TMP}"):
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _leftovers(parent: Path, prefix: str) -> list[Path]:
    out = []
    for p in parent.iterdir():
        pid = p.name[len(prefix):].partition("-")[0]
        if p.name.startswith(prefix) and not p.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- one-file shorthands: inside a `with Outputs()` block they join it, else they commit at once --

_ACTIVE: ContextVar[Outputs | None] = ContextVar("xmodel_outputs", default=None)


@contextmanager
def _outputs() -> Iterator[Outputs]:
    active = _ACTIVE.get()
    if active is not None:
        yield active
        return
    out = Outputs()
    try:
        yield out
    except BaseException:
        out.discard()
        raise
    out.commit()


def write_json(path: Path | str, value: Any, sort_keys: bool = False) -> Path:
    with _outputs() as out:
        return out.json(path, value, sort_keys=sort_keys)


def write_record(paths: Layout, name: str, details: Any, headline: Callable[[Any], dict[str, Any]]) -> Path:
    """A stage's record `name`: every detail in details/<name>.json, and headline(details) (a few
    numbers: pipeline/headlines.py) in metrics/<name>.json, together or neither; returns the details' path."""
    details = to_json(details)
    with _outputs() as out:
        out.json(paths.metrics(name), headline(details))
        return out.json(paths.details(name), details)


def write_text(path: Path | str, text: str) -> Path:
    with _outputs() as out:
        return out.text(path, text)


def write_jsonl(path: Path | str, rows: Iterable[Any]) -> Path:
    with _outputs() as out:
        return out.jsonl(path, rows)


def write_file(path: Path | str, write: Callable[[Path], None]) -> Path:
    with _outputs() as out:
        return out.file(path, write)


def save_figure(fig: Any, path: Path | str, **savefig: Any) -> Path:
    with _outputs() as out:
        return out.figure(fig, path, **savefig)


def replace_dir(target: Path | str, build: Callable[[Path], None], is_ours: Callable[[Path], bool],
                what: str = "folder") -> Path:
    with _outputs() as out:
        return out.directory(target, build, is_ours, what)


def write_folder(target: Path | str, files: dict[str, bytes | str], what: str = "folder",
                 allowed: Iterable[str] = ()) -> Path:
    """Replace the folder `target` by one holding exactly `files` (name → content). An existing
    folder is replaced only if it holds nothing but such names (`files` and `allowed`)."""

    def build(tmp: Path) -> None:
        for name, body in files.items():
            raw_write(tmp / name, body)

    return replace_dir(target, build, holds_only({*files, *allowed}), what)


def holds_only(names: Iterable[str]) -> Callable[[Path], bool]:
    """is_ours for a folder of known files: every entry is one of `names` (an empty folder too)."""
    allowed = set(names)
    return lambda path: all(p.name in allowed for p in path.iterdir())


# ---------------------------------------------------------------------------------------------
# One writer per folder


@contextmanager
def exclusive(lock_path: Path, what: Path) -> Iterator[None]:
    """Hold the lock of `what` (a folder being written) or fail at once with one line naming the
    process that holds it: two writers never interleave, and nobody waits on a stuck run unawares."""
    from filelock import FileLock, Timeout

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    holder = lock_path.with_name(lock_path.name + ".holder")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        who = holder.read_text().strip() if holder.exists() else "another process"
        raise UserError(f"{what} is being written by {who} (lock {lock_path}): wait for it to finish, "
                        "or stop it, then rerun") from None
    try:
        import socket
        import sys

        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])})\n")
        yield
    finally:
        lock.release()
