"""The one rule for anything xmodel removes or replaces: only what xmodel created itself.

`check_replaceable(path, is_ours)` is called before every deletion or replacement of a folder
(a store under --force, a leftover `*.creating`, an aligner directory, an evaluation output
folder, the report). It refuses, with one line naming the folder and the fix:
  - the current directory, the project (the nearest parent holding .git or dvc.yaml), the root or
    the home directory, and any folder that contains one of them;
  - a folder that exists but that `is_ours` does not recognise as something xmodel wrote.
Lives in store/ (which imports nothing from pipeline/) so that the store writer and the
pipeline's artifact writers share it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from store.errors import UserError


class NotOurs(UserError):
    """A folder xmodel did not create (or a folder that must never be removed). str() is the one line."""


def _protected() -> list[Path]:
    cwd = Path.cwd().resolve()
    out = [cwd, Path(cwd.anchor), Path.home().resolve()]
    for p in (cwd, *cwd.parents):
        if (p / ".git").exists() or (p / "dvc.yaml").exists():
            out.append(p)
            break
    return out


def check_replaceable(path: Path | str, is_ours: Callable[[Path], bool], what: str = "folder") -> None:
    """Raise NotOurs unless `path` is absent, or a folder that xmodel made (`is_ours(path)`) and that
    is neither the current directory, the project, nor a folder containing either."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    real = path.resolve()
    for p in _protected():
        if real == p or real in p.parents:
            raise NotOurs(f"{path}: refusing to replace a {what} that is, or contains, {p}: choose another path")
    if path.is_symlink() or not path.is_dir() or not is_ours(path):
        raise NotOurs(f"{path}: exists and is not a {what} written by xmodel, so it is left alone: "
                      "move it away or choose another path")
