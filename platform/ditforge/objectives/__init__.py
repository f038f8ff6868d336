"""Training objectives and their samplers. `build_objective(spec.objective)` is the one entry point."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from ..spec import ObjectiveSpec


class Objective(Protocol):
    """What the training loop and the samplers need of an objective: RectifiedFlow and DDPM are two."""

    kind: str
    cfg_dropout: float

    def loss(
        self,
        model: Callable[..., Any],
        x0: torch.Tensor,
        cond: dict[str, Any],
        gen: torch.Generator,
        mask_ratio: float = 0.0,
        given: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


def build_objective(ospec: ObjectiveSpec) -> Objective:
    """`ObjectiveSpec` → RectifiedFlow or DDPM."""
    if ospec.kind == "rectified_flow":
        from .flow import RectifiedFlow

        return RectifiedFlow(
            ospec.t_sampling,
            ospec.cfg_dropout,
            logit_mean=ospec.logit_mean,
            logit_std=ospec.logit_std,
            mode_scale=ospec.mode_scale,
            weighting=ospec.weighting,
            snr_gamma=ospec.snr_gamma,
        )
    from .ddpm import DDPM

    return DDPM(
        ospec.prediction,
        ospec.schedule,
        ospec.timesteps,
        ospec.cfg_dropout,
        weighting=ospec.weighting,
        snr_gamma=ospec.snr_gamma,
    )
