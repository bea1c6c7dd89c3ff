"""From a task's registry entry to what the models read: its prompts (as token ids through
pipeline.encoding.encode), and the decoding the task's params section asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Collection

from pipeline.encoding import encode
from pipeline.generation import Decoding
from pipeline.tasks.base import TaskPrompts

if TYPE_CHECKING:
    from pipeline.config_evaluate import EvaluateConfig


def task_prompts(task: str, cfg: EvaluateConfig, n: int | None = None,
                 exclude: frozenset[str] = frozenset()) -> tuple[TaskPrompts, Decoding]:
    """The task's items as prompts (from its params section; items whose A prompt is in `exclude`
    skipped), with the task's decoding."""
    from pipeline.tasks.registry import get_task

    section = cfg.section(task)
    prompts = get_task(task).prompts(section, n, exclude)
    return prompts, decoding_for(section, prompts)


def decoding_for(section: Any, prompts: TaskPrompts) -> Decoding:
    return Decoding(max_new_tokens=section.max_new_tokens, sampling=section.sampling, top_p=section.top_p,
                    temperature=section.temperature, seed=section.seed, stop_strings=prompts.stop_strings)


def check_context(pair: Any, prompts: TaskPrompts, decoding: Decoding, chat: bool = True,
                  methods: Collection[str] = ("skyline", "nl"), a_prefix: bool = False) -> None:
    """Refuse, before any method runs, an item whose prompt and the tokens to generate do not fit
    the context of the model that reads it: A its prompt_a; B its own prompt, the skyline's (when
    `methods` has skyline) and its prompt with A's message (nl; at most max_new_tokens of it), and
    with `a_prefix` (a method that puts A's cache of prompt_a before B's prompt, like kv) its own
    prompt after prompt_a's positions.
    Positions past the context would run silently with garbage (or die in the allocator), so one
    line names the item and both lengths. A text longer in bytes than the context times the
    tokenizer's longest token cannot fit and is refused without being tokenized (a huge line costs
    nothing)."""
    from pipeline.architecture import architecture
    from pipeline.errors import UserError

    new, n = decoding.max_new_tokens, len(prompts.ids)
    a_lengths = [0] * n

    def fits(role: str, model: Any, tokenizer: Any, name: str, view: str, texts: list[str], extra) -> list[int]:
        context = architecture(model).context
        if not context:
            return [len(encode(tokenizer, t, chat, prompts.cue)) for t in texts] if role == "A" else []
        most_bytes = context * _longest_token_bytes(tokenizer)
        lengths = []
        for i, text in enumerate(texts):
            size = len(text.encode("utf-8"))
            if size > most_bytes:
                raise UserError(f"item {prompts.ids[i]}: its {view} is {size:,} bytes, more than {role} ({name}) "
                                f"can read in its context of {context} positions (at most {most_bytes:,} bytes): "
                                "shorten the item or drop it (refused before tokenizing)")
            length = len(encode(tokenizer, text, chat, prompts.cue))
            more, what = extra(i)
            if length + more > context:
                raise UserError(f"item {prompts.ids[i]}: its {view} is {length} tokens (+{more} {what}) but {role} "
                                f"({name}) has a context of {context} positions: shorten the item or drop it")
            lengths.append(length)
        return lengths

    name_a, name_b = getattr(pair, "name_a", "A"), getattr(pair, "name_b", "B")
    a_lengths = fits("A", pair.model_a, pair.tok_a, name_a, "prompt_a", prompts.a, lambda i: (new, "to generate"))
    b_extra = ((lambda i: (a_lengths[i] + new, "of A's prompt_a before it and to generate")) if a_prefix and a_lengths
               else (lambda i: (new, "to generate")))
    fits("B", pair.model_b, pair.tok_b, name_b, "prompt_b", prompts.b, b_extra)
    if "skyline" in methods:
        fits("B", pair.model_b, pair.tok_b, name_b, "skyline prompt", prompts.skyline or [],
             lambda i: (new, "to generate"))
    if "nl" in methods:
        fits("B", pair.model_b, pair.tok_b, name_b, "prompt with A's message",
             [prompts.with_message(i, "") for i in range(n)], lambda i: (2 * new, "for A's message and to generate"))


def _longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes one token of the vocabulary stands for (an upper bound: byte-level and
    sentencepiece markers count as the characters they are written with)."""
    vocab = tokenizer.get_vocab()
    return max((len(str(t).encode("utf-8")) for t in vocab), default=1) or 1
