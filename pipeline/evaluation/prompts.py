"""From a task's registry entry to what the models read: prompts as token ids (chat template or
plain text with a cue), and the decoding the task's params section asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pipeline.generation import Decoding
from pipeline.tasks.base import TaskPrompts

if TYPE_CHECKING:
    from pipeline.evaluation.config import EvaluateConfig


def encode(tokenizer: Any, text: str, chat: bool = True, cue: str = "Answer:") -> list[int]:
    """Token ids of a user turn: the chat template (with the assistant cue) when the tokenizer has
    one and chat is on, else the plain text followed by a newline and `cue`."""
    if chat and getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True)
        if hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return [int(t) for t in out]
    return [int(t) for t in tokenizer(f"{text}\n{cue}", add_special_tokens=True)["input_ids"]]


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


def check_context(pair: Any, prompts: TaskPrompts, decoding: Decoding, chat: bool = True) -> None:
    """Refuse, before any method runs, an item whose prompt and the tokens to generate do not fit
    the context of the model that reads it: A its prompt_a; B its own prompt, the skyline's and its
    prompt with A's message (at most max_new_tokens of it). Positions past the context would run
    silently with garbage (or die in the allocator), so one line names the item and both lengths.
    A text longer in bytes than the context times the tokenizer's longest token cannot fit and is
    refused without being tokenized (a huge line costs nothing)."""
    from pipeline.architecture import architecture
    from pipeline.errors import UserError

    new, n = decoding.max_new_tokens, len(prompts.ids)
    reads = (("A", pair.model_a, pair.tok_a, getattr(pair, "name_a", "A"), [("prompt_a", prompts.a, new)]),
             ("B", pair.model_b, pair.tok_b, getattr(pair, "name_b", "B"),
              [("prompt_b", prompts.b, new), ("skyline prompt", prompts.skyline or [], new),
               ("prompt with A's message", [prompts.with_message(i, "") for i in range(n)], 2 * new)]))
    for role, model, tokenizer, name, views in reads:
        context = architecture(model).context
        if not context:
            continue
        most_bytes = context * _longest_token_bytes(tokenizer)
        for view, texts, extra in views:
            for i, text in enumerate(texts):
                size = len(text.encode("utf-8"))
                if size > most_bytes:
                    raise UserError(f"item {prompts.ids[i]}: its {view} is {size:,} bytes, more than {role} ({name}) "
                                    f"can read in its context of {context} positions (at most {most_bytes:,} bytes): "
                                    "shorten the item or drop it (refused before tokenizing)")
                length = len(encode(tokenizer, text, chat, prompts.cue))
                if length + extra > context:
                    raise UserError(f"item {prompts.ids[i]}: its {view} is {length} tokens (+{extra} to generate) "
                                    f"but {role} ({name}) has a context of {context} positions: shorten the item "
                                    "or drop it")


def _longest_token_bytes(tokenizer: Any) -> int:
    """The most bytes one token of the vocabulary stands for (an upper bound: byte-level and
    sentencepiece markers count as the characters they are written with)."""
    vocab = tokenizer.get_vocab()
    return max((len(str(t).encode("utf-8")) for t in vocab), default=1) or 1
