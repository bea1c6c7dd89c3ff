"""The paper's learned projection W (Ramesh & Li 2025, §3.1): W ∈ R^{d_B × d_A} trained with MSE,
Xavier init, Adam lr 1e-3, batch 32, 10 epochs. It is the `linear` aligner with those defaults;
early stopping is off by default (the paper trains all epochs; held-out rows are only scored)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.aligners.registry import register
from pipeline.aligners.adapters import Linear
from pipeline.aligners.training import TrainParams


@dataclass(frozen=True)
class ProjectionParams(TrainParams):
    loss: str = "mse"
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 10
    patience: int = 0


@register("projection")
class LearnedProjection(Linear):
    Params = ProjectionParams
