"""Training objectives and their samplers. `build_objective(spec.objective)` is the one entry point."""

from __future__ import annotations


def build_objective(ospec):
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
