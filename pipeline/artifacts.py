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
folder and swapped in by two renames; the old one stays loadable until then. The renames of one
commit are journalled first, and a kill between any two of them is finished (rolled forward) by
the next reader or writer of those outputs (`recover`, `settle`): never half old, half new. A folder
is only ever replaced after `store.owned.check_replaceable` recognised it as one xmodel wrote.

Locks. A folder's writer (extract, fit) holds its lock exclusively; its readers (fit and grid read
stores, evaluate, grid and report read aligners) hold the lock's shared side while they read.

Every write passes `faults.fault_point("writes")`, so the tests can fail any of them like a full disk;
"commits" after each rename of a commit, "locks" where a lock's holder is written.
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

    @property
    def stores(self) -> tuple[Path, Path]:
        return self.store("a"), self.store("b")  # A's and B's, what fit, grid and kvmaps read

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
        that is not there yet). More than one rename is journalled first (`_Journal`): a kill or an
        error between them is rolled forward by the next reader or writer, never left half old, half new."""
        steps: list[dict[str, str | None]] = []
        target = next(iter([t for _, t, *_ in self._dirs] + [t for _, t in self._files]), Path("."))
        try:
            for tmp, target, is_ours, what in self._dirs:
                check_ours(target, is_ours, what)
                old = tempfile.mkdtemp(prefix=_prefix(target, OLD), dir=target.parent) if target.exists() else None
                steps.append({"tmp": str(tmp), "target": str(target), "old": old})
            steps += [{"tmp": str(tmp), "target": str(target), "old": None} for tmp, target in self._files]
            journal = _Journal.begin(steps) if len(steps) > 1 or any(st["old"] for st in steps) else None
        except OSError as e:  # nothing renamed yet: every previous output stays as it was
            self.discard()
            for step in steps:
                if step["old"]:
                    shutil.rmtree(step["old"], ignore_errors=True)
            raise _failed(target, e) from None
        try:
            for step in steps:
                target = Path(step["target"])
                _apply(step)
                fault_point("commits")
        except OSError as e:
            if journal is None:  # its one rename did not happen
                self.discard()
                raise _failed(target, e) from None
            # some outputs may be new: the journal and the temporaries stay, for the next run to finish
            self._files, self._dirs = [], []
            raise UserError(f"renaming {target} into place failed ({e.strerror or e}): check the disk and rerun any "
                            "xmodel command on this data dir; it finishes these outputs first") from None
        if journal is not None:
            journal.end()
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


def _apply(step: dict[str, str | None]) -> None:
    """One rename of a commit (a folder: two, the old one moved aside into `old` first); a step
    already done is skipped, so a commit can be rolled forward from any point."""
    tmp, target, old = Path(step["tmp"]), Path(step["target"]), step["old"]
    if not tmp.exists():  # done (a folder: only its old copy may be left to remove)
        if old is not None and not target.exists() and (Path(old) / "dir").is_dir():
            os.rename(Path(old) / "dir", target)  # its new copy is gone: the old one is all there is
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return
    if old is not None:
        if target.exists() and not (Path(old) / "dir").exists():
            os.rename(target, Path(old) / "dir")
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


class _Journal:
    """The renames of one commit, written before the first of them as `.xmodel-commit-PID-*`
    into every folder a target lives in, and removed after the last. Whoever next reads or writes
    beside one of those targets (`recover`) finds the journal of a dead writer and finishes its
    renames: every temporary was complete before the first rename, so rolling forward is always right."""

    PREFIX = ".xmodel-commit"

    def __init__(self, copies: list[Path]) -> None:
        self.copies = copies

    @classmethod
    def begin(cls, steps: list[dict[str, str | None]]) -> _Journal:
        folders = sorted({str(Path(st["target"]).parent) for st in steps})
        name = f"{cls.PREFIX}-{os.getpid()}-{os.urandom(4).hex()}"  # no .json: never globbed as a record
        copies = [Path(f) / name for f in folders]
        body = dumps({"copies": [str(c) for c in copies], "steps": steps})
        written = []
        try:
            for copy in copies:
                tmp = copy.with_name(copy.name + ".writing")
                tmp.write_text(body)
                os.replace(tmp, copy)
                written.append(copy)
        except OSError:
            for copy in (*written, *(c.with_name(c.name + ".writing") for c in copies)):
                copy.unlink(missing_ok=True)
            raise
        return cls(copies)

    def end(self) -> None:
        for copy in self.copies:
            copy.unlink(missing_ok=True)

    @classmethod
    def settle(cls, folder: Path) -> None:
        """Finish the commits of dead writers journalled in `folder`."""
        import fcntl

        for path in _leftovers(folder, f"{cls.PREFIX}-"):
            if path.name.endswith(".writing"):  # killed before its commit began: nothing was renamed
                path.unlink(missing_ok=True)
                continue
            try:
                with open(path, "r+b") as f:
                    fcntl.flock(f, fcntl.LOCK_EX)  # one reader or writer finishes it; the others wait
                    if not path.exists():
                        continue  # finished meanwhile
                    doc = json.loads(f.read() or b"{}")
                    for step in doc.get("steps", []):
                        _apply(step)
                    for copy in [*doc.get("copies", []), path]:
                        Path(copy).unlink(missing_ok=True)
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                raise UserError(f"finishing an interrupted write ({path}) failed ({getattr(e, 'strerror', None) or e}): "
                                f"free disk space or check that {folder} is writable, then rerun") from None


def settle(paths: Layout) -> None:
    """Finish every commit a killed writer left in the data dir's output folders, before reading them."""
    for folder in (paths.data, paths.aligners, paths.metrics_dir, paths.details_dir, paths.data / "plots",
                   paths.data / "evaluate"):
        if folder.is_dir():
            _Journal.settle(folder)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it straight back
    os.umask(mask)
    return mask


def _prefix(target: Path, kind: str) -> str:
    # the writer's pid is in the name, so cleanup can tell a dead writer's leftovers from a live one's
    return f".{target.name}{kind}{os.getpid()}-"


def recover(target: Path) -> None:
    """Repair what a killed writer left beside `target`, before it is read or written: a commit
    journalled there is finished (`_Journal`), a folder caught between the two renames of an
    unjournalled swap is renamed back, and its temporaries (only names we make, of dead processes)
    are removed."""
    parent = target.parent
    if not parent.is_dir():
        return
    _Journal.settle(parent)
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
# One writer or many readers per folder


def aligner_lock(directory: Path) -> Path | None:
    """The lock `xmodel fit` holds while it writes the aligner folder `directory` (<data>/aligners/NAME):
    <data>/.locks/aligners.NAME.lock; None for a folder outside an aligners folder (no fit writes it)."""
    directory = Path(directory).absolute()
    if directory.parent.name != "aligners":
        return None
    return Layout(directory.parent.parent).lock(f"aligners/{directory.name}")


def store_lock(store: Path) -> Path:
    """The lock of an activation store: beside it (`--force` replaces the store, never its lock)."""
    store = Path(store).absolute()
    return store.with_name(f".{store.name}.lock")


@contextmanager
def exclusive(lock_path: Path, what: Path) -> Iterator[None]:
    """Hold the lock of `what` (a folder being written) or fail at once with one line naming the
    process that holds it: two writers never interleave, a writer never replaces what a reader is
    reading, and nobody waits on a stuck run unawares. The holder's name is written into the lock file."""
    with _locked(lock_path, what, shared=False):
        yield


@contextmanager
def shared(lock_path: Path | None, what: Path) -> Iterator[None]:
    """Hold the readers' side of the lock of `what` (any number of readers at once, no writer),
    or fail at once with one line naming the writer. No lock (None): nothing is held."""
    if lock_path is None:
        yield
        return
    with _locked(lock_path, what, shared=True):
        yield


def folder_hash(directory: Path) -> str | None:
    """sha256 over the names and bytes of the files at the top of `directory` (an aligner: its
    weights and aligner.json; a checkpoint folder below is not part of it); None if it is gone.
    What an evaluation record names the aligner it used by, and how the report sees it changed."""
    import hashlib

    h = hashlib.sha256()
    try:
        for f in sorted(p for p in Path(directory).iterdir() if p.is_file()):
            h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
            h.update(f.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return None
    return h.hexdigest()


@contextmanager
def _locked(lock_path: Path, what: Path, shared: bool) -> Iterator[None]:
    f = _acquire(Path(lock_path), what, shared)
    try:
        yield
    finally:
        if f is not None:
            f.close()  # releases the lock


def _acquire(lock_path: Path, what: Path, shared: bool):
    """The open lock file, locked; None for a reader of a read-only data dir (nobody writes there).
    fcntl.flock on a file opened with O_NOFOLLOW: a symlink planted at the lock's name is refused,
    never followed (its target would be locked and overwritten); the lock goes with the open file,
    so a killed holder never leaves a stale lock. Every OSError here is one line."""
    import fcntl

    f = None
    try:
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            flags = (os.O_RDONLY if shared else os.O_RDWR) | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
            f = os.fdopen(os.open(lock_path, flags, 0o666), "rb" if shared else "r+b", buffering=0)
        except OSError as e:
            if shared and e.errno in (errno.EROFS, errno.EACCES):
                return None
            raise
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{what} is being {_holder(f)} (lock {lock_path}): wait for it to finish, or stop it, "
                            "then rerun") from None
        if not shared:  # the writer names itself for whoever it keeps out
            fault_point("locks")
            f.truncate(0)
            f.write(_me().encode())
        return f
    except BaseException as e:
        if f is not None:
            f.close()
        if isinstance(e, OSError):
            raise _lock_failed(lock_path, e) from None
        raise


def _me() -> str:
    import socket
    import sys

    return f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv[:3])})\n"


def _holder(f) -> str:
    """Who holds the lock of the open lock file f: a writer names itself in it; readers write nothing."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:  # a writer
        who = os.pread(f.fileno(), 400, 0).decode(errors="replace").strip()
        return f"written by {who or 'another process'}"
    fcntl.flock(f, fcntl.LOCK_UN)
    return "read by another process (an evaluation, fit, grid or report)"


def _lock_failed(lock_path: Path, e: OSError) -> UserError:
    if e.errno == errno.ELOOP or lock_path.is_symlink():
        return UserError(f"{lock_path} is a symbolic link: lock files are never followed; remove it and rerun")
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"writing lock {lock_path} failed ({e.strerror}): free disk space and rerun; nothing was changed")
    return UserError(f"cannot use lock {lock_path} ({e.strerror or e}): {lock_path.parent} must be a writable "
                     "folder of lock files; move away whatever is in its place and rerun")
