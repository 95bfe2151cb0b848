"""Memory planning: what a training step needs, what fits on which GPU, what to set."""

from loratune.plan.memory import Breakdown, Setup, estimate
from loratune.plan.recommend import GPUS, parse_memory, recommend
from loratune.plan.report import PlanError
from loratune.plan.shapes import PRESETS, ModelShape, resolve_shape

__all__ = ["GPUS", "PRESETS", "Breakdown", "ModelShape", "PlanError", "Setup", "estimate",
           "parse_memory", "recommend", "resolve_shape"]
