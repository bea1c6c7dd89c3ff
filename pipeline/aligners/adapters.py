"""Trainable maps: `linear` (W x), `affine` (W x + b) and `lora` (a frozen base map plus a rank-r
update), trained by `training.train` with MSE or InfoNCE."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.aligners.registry import register
from pipeline.aligners.base import require
from pipeline.aligners.procrustes import accumulate, solve
from pipeline.aligners.training import RowSplit, TrainableAligner, TrainParams


@register("linear")
class Linear(TrainableAligner):
    """Full-rank y = W x, Xavier-initialized."""

    bias: ClassVar[bool] = False

    def build_net(self, d_source: int, d_target: int) -> torch.nn.Module:
        return torch.nn.Linear(d_source, d_target, bias=self.bias)

    def init_net(self, split: RowSplit, generator: torch.Generator) -> torch.nn.Module:
        net = self.build_net(split.d_source, split.d_target)
        torch.nn.init.xavier_uniform_(net.weight, generator=generator)
        if net.bias is not None:
            # Start at the training means (b = mean_y - W mean_x): activations carry large offsets
            # that a zero-initialized bias does not reach at Adam's step size.
            m = accumulate(split.iter_train_blocks())
            with torch.no_grad():
                w = net.weight.double().numpy()
                net.bias.copy_(torch.from_numpy(m.mean_y - w @ m.mean_x))
        return net


@register("affine")
class Affine(Linear):
    """y = W x + b, Xavier-initialized W, b started at the training means."""

    bias = True


BASES = ("procrustes-affine", "procrustes", "identity")


@dataclass(frozen=True)
class LoRAParams(TrainParams):
    rank: int = 32
    base: str = "procrustes-affine"  # the frozen map the low-rank update is added to (see LoRA)

    def __post_init__(self):
        super().__post_init__()
        require(self.rank >= 1, f"rank = {self.rank} must be at least 1")
        require(self.base in BASES, f"base = {self.base!r} must be one of {list(BASES)}")


class LoRALinear(torch.nn.Module):
    """y = W₀ x + b₀ + B A x with W₀, b₀ frozen buffers, A (r × d_in), B (d_out × r)."""

    def __init__(self, d_in: int, d_out: int, rank: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(d_out, d_in))
        self.register_buffer("bias", torch.zeros(d_out))
        self.lora_a = torch.nn.Parameter(torch.zeros(rank, d_in))
        self.lora_b = torch.nn.Parameter(torch.zeros(d_out, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + F.linear(F.linear(x, self.lora_a), self.lora_b)


@register("lora")
class LoRA(TrainableAligner):
    """A rank-r update learned on top of a frozen base map.

    Base (default "procrustes-affine", fitted in one streaming pass over the training rows only):
    between two unrelated models the coordinates of A and B have no correspondence, so the paper's
    identity-on-the-last-min(d_A, d_B)-coordinates base ("identity") starts from an essentially
    arbitrary map and a rank-32 update cannot repair a full-rank error; the affine Procrustes map
    is the best norm-preserving full-rank map the data admit, carries the mean offset and overall
    scale that MSE needs, and costs one pass. B starts at zero (as in LoRA), so training starts
    exactly at the base and only learns what the rotation misses.
    """

    Params = LoRAParams

    def build_net(self, d_source: int, d_target: int) -> torch.nn.Module:
        return LoRALinear(d_source, d_target, self.params.rank)

    def init_net(self, split: RowSplit, generator: torch.Generator) -> torch.nn.Module:
        net = self.build_net(split.d_source, split.d_target)
        weight, bias = self._base(split)
        with torch.no_grad():
            net.weight.copy_(torch.from_numpy(weight))
            if bias is not None:
                net.bias.copy_(torch.from_numpy(bias))
        torch.nn.init.kaiming_uniform_(net.lora_a, a=math.sqrt(5), generator=generator)  # nn.Linear's default
        return net

    def _base(self, split: RowSplit) -> tuple[np.ndarray, np.ndarray | None]:
        if self.params.base == "identity":
            m = min(split.d_source, split.d_target)
            weight = np.zeros((split.d_target, split.d_source))
            weight[-m:, -m:] = np.eye(m)  # the paper's footnote 1: the last min(d_A, d_B) coordinates
            return weight, None
        weight, bias, _ = solve(accumulate(split.iter_train_blocks()), affine=self.params.base == "procrustes-affine")
        return weight, bias
