"""Latent methods (B receives something other than text) and their controls.

A latent method yields `Variant`s: a name, the message (per item, the tensor(s) that reach B: the
vector grafted, the states placed, the key/value prefix) and `send`, which runs B on a message.
Each variant runs once on its own message and once per `evaluate.controls` entry on a transformed
one, on the same items, so that the report counts a method as carrying information only where it
beats its mismatched control (a published replication found one-vector injection changing answers
no more often than norm-matched noise):

  mismatched   item i receives item σ(i)'s message, σ a fixed derangement (seeded): a message of
               the right kind and size from the wrong item
  noise        Gaussian noise with each row's norm (every vector along the last axis keeps its
               length): the right size, no content
  zero         zeros: the channel open, nothing in it
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context, Method, MethodRun
from pipeline.generation import Generation

CONTROLS = ("mismatched", "noise", "zero")
CONTROL_SEED = 0


@dataclass
class Sent:
    """What sending one message to B produced."""

    gen: Generation
    compute: Compute
    diagnostics: dict[str, list[float]]
    details: dict[str, Any]


@dataclass
class Variant:
    name: str
    message: list[Any]  # per item: the tensor(s) that reach B
    send: Callable[[list[Any]], Sent]  # B on a message (the variant's own, or a control's)
    bytes_sent: list[int]  # per item: what A sends for it
    family: str


def derangement(n: int, seed: int = CONTROL_SEED) -> list[int]:
    """A fixed permutation of range(n) with no fixed point (n >= 2), seeded: item i gets σ[i]."""
    import random

    if n < 2:
        return list(range(n))
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        if all(i != s for i, s in enumerate(order)):
            return order


def controlled(message: Sequence[Any], control: str, seed: int = CONTROL_SEED) -> list[Any]:
    """The message of `control` (module doc) for every item."""
    import torch

    if control == "mismatched":
        if len(message) < 2:  # one item has no other item's message: the "control" would be the method itself
            from pipeline.errors import UserError

            raise UserError("evaluate.controls: mismatched needs at least 2 items (another item's message); "
                            "evaluate more items or drop it")
        return [message[s] for s in derangement(len(message), seed)]
    if control == "zero":
        return [torch.zeros_like(t) for t in message]
    if control == "noise":
        g = torch.Generator().manual_seed(seed)
        out = []
        for t in message:
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32)
            norms = t.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            out.append((noise * norms.cpu()).to(device=t.device, dtype=t.dtype))
        return out
    raise ValueError(f"unknown control {control!r}")


class LatentMethod(Method):
    """A method whose variants send B a message; runs each variant and its controls."""

    def variants(self, ctx: Context) -> Iterator[Variant]:
        raise NotImplementedError

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        for v in self.variants(ctx):
            sent = v.send(v.message)
            yield self.record(ctx, v.name, sent.gen, sent.compute, diagnostics=sent.diagnostics,
                              bytes_sent=v.bytes_sent, details=sent.details, family=v.family)
            for control in ctx.cfg.controls:
                sent = v.send(controlled(v.message, control))
                run = self.record(ctx, f"{v.name}~{control}", sent.gen, sent.compute, diagnostics=sent.diagnostics,
                                  bytes_sent=v.bytes_sent, details=sent.details, family="control")
                run.control_of, run.control = v.name, control
                yield run
