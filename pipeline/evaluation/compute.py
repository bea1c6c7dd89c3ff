"""What each method's run cost: tokens each model ran, blocks per token, a FLOP estimate, wall time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.generation import Generation


def block_flops(model: Any) -> tuple[float, float]:
    """(FLOPs per token per decoder block, FLOPs of one LM-head row): 2 x parameters (matmuls only)."""
    from pipeline.architecture import architecture

    blocks = architecture(model).layers
    per_block = 2.0 * sum(p.numel() for p in blocks[0].parameters())
    head = model.get_output_embeddings()
    return per_block, 2.0 * (head.weight.numel() if head is not None else 0)


@dataclass
class Compute:
    a_tokens: int = 0  # prompt + generated tokens A ran
    a_blocks: int = 0  # decoder blocks A ran per token (k for AC, all for a full pass)
    b_tokens: int = 0
    a_new_tokens: int = 0
    b_new_tokens: int = 0
    flops: float = 0.0  # estimate: 2 x params of the blocks run per token + LM-head rows computed
    seconds: float = 0.0

    def add_run(self, pair_model: Any, role: str, gen_or_states: Any, blocks: int | None = None) -> None:
        from pipeline.architecture import architecture

        per_block, head = block_flops(pair_model)
        n_blocks = architecture(pair_model).n_layers if blocks is None else blocks
        if isinstance(gen_or_states, Generation):
            prompt, new = sum(gen_or_states.prompt_tokens), sum(gen_or_states.new_tokens)
            heads = len(gen_or_states.prompt_tokens) + new  # one row per prefill + one per decoding step
            seconds = gen_or_states.seconds
        else:  # SenderStates or TokenStates: a partial pass of A, no LM head
            prompt, new, heads, seconds = gen_or_states.tokens, 0, 0, gen_or_states.seconds
        self.flops += per_block * n_blocks * (prompt + new) + head * heads
        self.seconds += seconds
        if role == "a":
            self.a_tokens += prompt + new
            self.a_new_tokens += new
            self.a_blocks = max(self.a_blocks, n_blocks)
        else:
            self.b_tokens += prompt + new
            self.b_new_tokens += new
