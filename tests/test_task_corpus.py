"""Task corpora (`corpus.source: task:<name>`): A's store holds each training item's prompt_a, B's
store the same item's skyline prompt, both encoded exactly as evaluation encodes them, on items
disjoint from the evaluation items; an aligner fitted on them loads in evaluation for the same (k, j)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_params
from pipeline.errors import UserError
from tests.helpers import run_cli, write_params

# A chat template in the style of real ones (role markers, generation prompt), for a tiny tokenizer
# that has none: B's prompts then go through apply_chat_template, A's through the plain-text cue.
TEMPLATE = ("{% for m in messages %}<|bos|>{{ m['role'] }}\n{{ m['content'] }}<|eos|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|bos|>assistant\n{% endif %}")


def _task_params(tmp: Path, models: dict, **changes) -> Path:
    """Params of a task corpus of 24 Countries items (12 evaluation items), each section updated by `changes`."""
    sections = {"corpus": {"source": "task:countries", "n": 24, "seed": 1},
                "extract": {"layers": [0, 0.5, 1.0], "max_tokens": 200, "tokens_per_seq": 4},
                "evaluate": {"layer_a": 0.5, "layer_b": 0.5, "countries": {"n": 12, "seed": 0}},
                "fit": {"layers": [0.5, 0.5], "heldout_frac": 0.25, "aligners": {"procrustes": {}}}}
    for name, values in changes.items():
        sections.setdefault(name, {}).update(values)
    return write_params(tmp, models, **sections)


@pytest.fixture(scope="module")
def chat_qwen(tiny_models, tmp_path_factory) -> Path:
    """tiny-qwen with a chat template."""
    out = tmp_path_factory.mktemp("chat_qwen") / "qwen"
    shutil.copytree(tiny_models["qwen"], out)
    config = out / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "chat_template": TEMPLATE}))
    return out


def test_views_hold_the_same_items_apart_from_the_evaluation_items(tmp_path):
    from pipeline.task_corpus import corpus_for
    from pipeline.tasks.registry import get_task

    # corpus.seed = the evaluation seed: a draw of the generator that starts with the evaluation items
    params = load_params(_task_params(tmp_path, {"a": "x", "b": "y"}, corpus={"source": "task:countries", "n": 24,
                                                                              "seed": 0}))
    a, b = corpus_for(params.corpus, params.evaluate, "a"), corpus_for(params.corpus, params.evaluate, "b")
    evaluation = get_task("countries").prompts(params.evaluate.countries)
    assert len(a.texts) == len(b.texts) == 24 and a.index == b.index == list(range(24)) and a.ids == b.ids
    assert not set(a.texts) & set(evaluation.a), "a training item is an evaluation item"
    assert not set(a.ids) & set(evaluation.ids)
    train = get_task("countries").prompts(params.evaluate.countries.training(), 24, exclude=evaluation.held_out())
    assert a.texts == train.a and b.texts == train.skyline  # B's view: B reading prompt_a and its question
    assert a.fingerprint == b.fingerprint  # one corpus for pairing.check_same_corpus
    assert (a.view, b.view) == ("prompt_a", "skyline")
    # the items depend on the evaluation section they avoid, and on corpus.seed
    other = load_params(_task_params(tmp_path, {"a": "x", "b": "y"}, evaluate={"countries": {"n": 12, "seed": 5}}))
    assert (corpus_for(other.corpus, other.evaluate, "a").fingerprint
            != corpus_for(params.corpus, params.evaluate, "a").fingerprint)


def _place(prompt_a: str) -> str:
    return prompt_a.split(" is at ", 1)[1].removesuffix(".")


def test_countries_place_split_no_evaluated_place_in_training(tmp_path):
    """In-task corpora draw the train places; `evaluate.countries.places: eval` scores only the others."""
    from pipeline.task_corpus import corpus_for
    from pipeline.tasks.games import EVAL_SHARE, PLACES, place_split
    from pipeline.tasks.registry import get_task

    params = load_params(_task_params(tmp_path, {"a": "x", "b": "y"}, corpus={"n": 300},
                                      evaluate={"countries": {"n": 100, "places": "eval"}}))
    train, evaluation = corpus_for(params.corpus, params.evaluate, "a"), get_task("countries").prompts(params.evaluate.countries)
    train_places, eval_places = {_place(t) for t in train.texts}, {_place(t) for t in evaluation.a}
    assert len(train.texts) == 300 and len(evaluation.a) == 100
    assert not train_places & eval_places, "an evaluated place was seen in training"
    held, kept = {p for p, _ in place_split("eval")}, {p for p, _ in place_split("train")}
    assert eval_places <= held and train_places <= kept and not held & kept and held | kept == {p for p, _ in PLACES}
    assert len(held) == round(EVAL_SHARE * len(PLACES)) and place_split("eval") == place_split("eval")
    # both records say which side they drew
    assert evaluation.source["places"] == "eval" and train.split["places"] == "train"
    assert train.split["evaluation"]["places"] == "eval" and train.split["shared_with_evaluation"] == 0
    seen = get_task("countries").prompts(params.evaluate.countries.__class__(n=100))  # the default: every place
    assert seen.source["places"] == "all" and {_place(t) for t in seen.a} & train_places


def test_squad_training_items_never_share_a_passage_with_evaluation(tmp_path):
    """A SQuAD file asks several questions per passage: training never reads an evaluated passage."""
    from pipeline.task_corpus import corpus_for
    from pipeline.tasks.registry import get_task

    rows = [{"id": f"p{p}q{q}", "context": f"Person {p} was born in Town{p} and studied law.",
             "question": f"Question {q} about person {p}?", "answers": [f"Town{p}"]} for p in range(12) for q in range(3)]
    path = tmp_path / "squad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = load_params(_task_params(tmp_path, {"a": "x", "b": "y"}, corpus={"source": "task:squad", "n": 40},
                                      evaluate={"squad": {"source": str(path), "n": 6}}))
    train, evaluation = corpus_for(params.corpus, params.evaluate, "a"), get_task("squad").prompts(params.evaluate.squad)
    passages = {it.split("Passage: ", 1)[1].split("\n")[0] for it in evaluation.a}
    assert train.texts and not any(p in t for p in passages for t in train.texts)
    assert train.split["shared_with_evaluation"] == 0 and train.split["layout"] == "squad"
    generated = load_params(_task_params(tmp_path, {"a": "x", "b": "y"}, corpus={"source": "task:squad", "n": 40},
                                         evaluate={"squad": {"n": 20}}))
    split = corpus_for(generated.corpus, generated.evaluate, "a").split
    assert split["passages"] == "generated, seed 1" and split["evaluation"]["passages"] == "generated, seed 0"
    assert split["shared_with_evaluation"] == 0


def test_bad_task_corpora_are_one_line(tmp_path):
    from pipeline.data import load_corpus
    from pipeline.task_corpus import corpus_for

    def params(**kw):
        return load_params(_task_params(tmp_path, {"a": "x", "b": "y", "c": "z"}, **kw))

    nope, plain = params(corpus={"source": "task:nope"}), params()
    with pytest.raises(UserError, match=r"task:nope.*task:<name> with one of squad, gsm8k, countries"):
        corpus_for(nope.corpus, nope.evaluate, "a")
    with pytest.raises(UserError, match="roles a .* and b .* only, not 'c'"):
        corpus_for(plain.corpus, plain.evaluate, "c")
    with pytest.raises(UserError, match="task corpus, read per model role by `xmodel extract` only"):
        load_corpus(params().corpus)
    # a .jsonl whose every item is an evaluation item leaves nothing to train on
    items = tmp_path / "games.jsonl"
    items.write_text("".join(json.dumps({"prompt_a": f"P{i} is at Rome.", "prompt_b": "Where?", "answer": "Italy"})
                             + "\n" for i in range(5)))
    with pytest.raises(UserError, match="leaves no item outside the 5 evaluation items"):
        corpus_for(plain.corpus, params(evaluate={"countries": {"source": str(items), "n": 12}}).evaluate, "a")


def test_long_prompts_are_refused_not_cut(tiny_models, tmp_path, capsys):
    params = _task_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                          extract={"max_tokens": 12})
    code, _, err = run_cli(capsys, "--params", str(params), "extract", "--model", "a")
    assert code == 2
    assert "prompt_a prompts are longer than extract.max_tokens = 12" in err and "raise extract.max_tokens to at least" in err
    assert not (tmp_path / "data" / "stores" / "a.zarr").exists()


def test_a_store_of_one_view_is_never_resumed_as_the_other(tiny_models, tmp_path, capsys):
    params = _task_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["llama"]}, corpus={"n": 8})
    assert run_cli(capsys, "--params", str(params), "extract", "--model", "a", "--quiet")[0] == 0
    store = tmp_path / "data" / "stores" / "a.zarr"
    code, _, err = run_cli(capsys, "--params", str(params), "extract", "--model", "b", "--out", str(store), "--quiet")
    assert code == 2 and "corpus_view" in err


def test_stores_hold_the_states_ac_sends_and_b_has_on_the_skyline(tiny_models, chat_qwen, tmp_path, capsys):
    """Row i of A's store is A's last-token state on encode(prompt_a) at k (what AC sends); row i of
    B's is B's state on encode(skyline) at j; a fit on them loads in evaluation for (k, j)."""
    from pipeline.evaluation.pair import load_aligners, load_pair, resolve_ks
    from pipeline.encoding import encode
    from pipeline.injection import map_vectors, sender_states
    from pipeline.task_corpus import training_prompts
    from store.reader import ActivationStore

    path = _task_params(tmp_path, {"a": tiny_models["llama"], "b": chat_qwen})
    for role in ("a", "b"):
        code, _, err = run_cli(capsys, "--params", str(path), "extract", "--model", role, "--quiet")
        assert code == 0, err
    params = load_params(path)
    cfg = params.evaluate
    pair = load_pair(params.model_specs(), params.paths.cache_dir(), cfg.device, cfg.dtype)
    assert pair.tok_b.chat_template and not getattr(pair.tok_a, "chat_template", None)  # both encode() paths
    k, j = resolve_ks(pair, cfg.layer_a, cfg.layer_b)
    train, _ = training_prompts(params.corpus, cfg)
    store_a, store_b = (ActivationStore(params.paths.store(r)) for r in ("a", "b"))
    assert store_a.identity["corpus_fingerprint"] == store_b.identity["corpus_fingerprint"]
    for store in (store_a, store_b):
        assert store.root["text_index"][:].tolist() == list(range(24))

    sent = sender_states(pair.model_a, pair.tok_a, [encode(pair.tok_a, t, cfg.chat, train.cue) for t in train.a], k)
    np.testing.assert_allclose(store_a.numpy("last", k), sent.vectors.numpy(), rtol=1e-4, atol=1e-5)
    own = sender_states(pair.model_b, pair.tok_b, [encode(pair.tok_b, t, cfg.chat, train.cue) for t in train.skyline], j)
    np.testing.assert_allclose(store_b.numpy("last", j), own.vectors.numpy(), rtol=1e-4, atol=1e-5)
    plain_b = sender_states(pair.model_b, pair.tok_b, [encode(pair.tok_b, t, False, train.cue) for t in train.skyline], j)
    assert not np.allclose(store_b.numpy("last", j), plain_b.vectors.numpy(), atol=1e-3)  # the template matters

    code, _, err = run_cli(capsys, "--params", str(path), "-S", "fit.kind=tokens", "fit", "procrustes", "--quiet")
    assert code == 2 and "per-token rows cannot pair across a task corpus's views" in err
    code, _, err = run_cli(capsys, "--params", str(path), "fit", "procrustes", "--quiet")
    assert code == 0, err
    aligner_dir = params.paths.aligner("procrustes")
    (aligner,) = load_aligners([str(aligner_dir)], Path(params.paths.data), pair, k, j).values()
    assert map_vectors(sent.vectors, aligner, pair.width_b).shape == (24, pair.width_b)
    with pytest.raises(UserError, match="evaluation uses"):
        load_aligners([str(aligner_dir)], Path(params.paths.data), pair, k, j - 1)
    # next to the aligner of the same kind from the main run, it is named by its data dir (here both are one)
    both = load_aligners(["procrustes", str(aligner_dir)], Path(params.paths.data), pair, k, j)
    assert set(both) == {"procrustes", f"procrustes@{Path(params.paths.data).name}"}
    with pytest.raises(UserError, match="lists the aligner procrustes twice"):
        load_aligners(["procrustes", "procrustes"], Path(params.paths.data), pair, k, j)
