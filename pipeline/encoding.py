"""A prompt as the token ids a model reads: its chat template with the assistant cue, or the plain
text and a cue. One function, shared by evaluation and by extraction over a task corpus (so that the
states stored for a prompt are those of the prompt evaluation sends); light, so that extraction does
not depend on evaluation code."""

from __future__ import annotations

from typing import Any


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
