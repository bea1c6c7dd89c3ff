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
