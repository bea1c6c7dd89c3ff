"""Task corpora: a registered task's prompts as extraction texts, for in-distribution aligners.

`corpus.source: task:<name>` (any task of pipeline.tasks.registry) draws `corpus.n` of the task's
items with `corpus.seed` from the task's own `evaluate.<name>` section (its source, setting, ...),
skipping every item the evaluation uses (the registry's `exclude`, by A's prompt): the aligner never
trains on an item it is scored on. Each model role reads its own view of the same items, row for row:

    a: prompt_a  -- what A reads, so A's stored last-token state is the state AC sends
    b: skyline   -- B reading A's information and its own question (B's own prompt where the task
                    has no skyline): B's state when it knows the answer

so any aligner fitted on the two stores (pairing by text_index, the item's row) maps A's state on
prompt_a to B's own state on the skyline prompt: the paper's "in-distribution W", made task-aware.

Both views share one fingerprint (the items, both views' texts and the prompt encoding), which is
what fitting compares to accept two stores as one corpus (pipeline.pairing.check_same_corpus); each
store's identity also records its view, so a store of one view is never resumed as the other.

Each text is encoded by pipeline.encoding.encode, the function evaluation uses (the chat
template with the assistant cue when evaluate.chat and the tokenizer has one, else the task's
plain-text cue), so the stored last-token state is exactly the one evaluation sends or replaces.
A prompt longer than extract.max_tokens is refused rather than cut: cutting would change that state.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from typing import Any

from pipeline.config import CorpusConfig
from pipeline.data import Corpus, load_corpus
from pipeline.errors import UserError

VIEWS = {"a": "prompt_a", "b": "skyline"}  # model role -> the prompt its store holds


@dataclass(frozen=True)
class TaskCorpus(Corpus):
    """One role's view of a task corpus (`texts` are that view's prompts; `index` the item rows)."""

    view: str = "prompt_a"
    ids: tuple[str, ...] = ()  # the task's item ids, row for row
    shared_fingerprint: str = ""  # of the items and both views: the same in A's and B's store
    split: Any = None  # which items: the training side's source (Countries: places train) and the evaluation's
    chat: bool = True  # encode()'s arguments, as evaluation passes them
    cue: str = "Answer:"

    @property
    def fingerprint(self) -> str:
        return self.shared_fingerprint

    def tokenize(self, tokenizer: Any, max_tokens: int) -> tuple[list, list]:
        """(token ids, end offsets) of each prompt, encoded as evaluation encodes it; none is cut."""
        import numpy as np

        from pipeline.encoding import encode

        ids = [np.asarray(encode(tokenizer, t, self.chat, self.cue), dtype=np.int32) for t in self.texts]
        longest = max((len(x) for x in ids), default=0)
        if longest > max_tokens:
            over = sum(len(x) > max_tokens for x in ids)
            raise UserError(f"corpus {self.source!r}: {over} of {len(ids)} {self.view} prompts are longer than "
                            f"extract.max_tokens = {max_tokens} in this model's prompt format (longest: {longest} "
                            f"tokens); raise extract.max_tokens to at least {longest} (a prompt is never cut: "
                            "AC sends the state of its last token)")
        # Running length of the tokens' string forms (template included; bytes for byte-level BPE):
        # where each token ends in the prompt as the model reads it. The two views are different
        # texts, so per-token rows never pair across them (pipeline.pairing refuses).
        ends = [np.cumsum([len(p) for p in tokenizer.convert_ids_to_tokens(x.tolist())], dtype=np.int64).astype(np.int32)
                for x in ids]
        return ids, ends


def corpus_for(cfg: CorpusConfig, evaluate: Any, role: str) -> Corpus:
    """The texts extraction runs model `role` over: the role's view of a task corpus (whose items
    `evaluate`, the EvaluateConfig, defines), or the corpus."""
    if cfg.task is None:
        return load_corpus(cfg)
    if role not in VIEWS:
        raise UserError(f"corpus.source = {cfg.source!r} has views for the roles a (prompt_a) and b "
                        f"(skyline) only, not {role!r}: extract --model a or --model b")
    return task_corpus(cfg, evaluate, role)


def task_corpus(cfg: CorpusConfig, evaluate: Any, role: str) -> TaskCorpus:
    """Role `role`'s view of the task corpus `cfg.source` (see the module doc); `evaluate` is the
    EvaluateConfig whose `<task>` section defines the items and `chat` the prompt format."""
    train, held = training_prompts(cfg, evaluate)
    b_texts = train.skyline if train.skyline is not None else train.b
    h = hashlib.sha256(json.dumps({"source": cfg.source, "chat": evaluate.chat, "cue": train.cue,
                                   "items": list(zip(train.ids, train.a, b_texts))}).encode())
    return TaskCorpus(texts=list(train.a if role == "a" else b_texts), index=list(range(len(train.ids))),
                      source=cfg.source, view=VIEWS[role], ids=tuple(train.ids),
                      shared_fingerprint=h.hexdigest()[:16], chat=evaluate.chat, cue=train.cue, split=train.source)


def training_prompts(cfg: CorpusConfig, evaluate: Any):
    """(the corpus's items as pipeline.tasks.base.TaskPrompts, the evaluation items' A prompts)."""
    from pipeline.tasks.registry import TASKS, get_task

    name = cfg.task
    if name not in TASKS:
        raise UserError(f"corpus.source = {cfg.source!r} names no task: use task:<name> with one of "
                        f"{', '.join(TASKS)}")
    task, section = get_task(name), evaluate.section(name)
    evaluation = task.prompts(section)  # exactly what evaluate@<name> reads (its n and seed)
    held = evaluation.held_out()  # its A prompts and what carries their answers (SQuAD: the passages)
    # drawn from the section's training side (Countries: the train places) with the corpus seed
    train = task.prompts(replace(section.training(), seed=cfg.seed), cfg.n, exclude=held)
    train.source = {**train.source, "evaluation": evaluation.source,
                    "shared_with_evaluation": len(held & train.held_out())}
    if not train.ids:
        raise UserError(f"corpus.source = {cfg.source!r} leaves no item outside the {len(held)} evaluation items "
                        f"(evaluate.{name}.source = {section.source!r}): use a larger source or fewer "
                        f"evaluate.{name}.n")
    return train, frozenset(evaluation.a)
