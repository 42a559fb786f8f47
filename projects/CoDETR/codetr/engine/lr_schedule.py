"""Learning-rate schedules whose shape does not depend on the length of training."""

from fvcore.common.param_scheduler import MultiStepParamScheduler

__all__ = ["step_lr_multiplier"]


def step_lr_multiplier(
    *, num_updates: int, decay_fraction: float = 0.85, gamma: float = 0.1
) -> MultiStepParamScheduler:
    """
    A constant multiplier of 1, times ``gamma`` from ``decay_fraction`` of training on. Pass
    ``num_updates="${..train.max_iter}"`` in a config so that a shorter or longer run keeps
    the same shape.
    """
    if not 0.0 < decay_fraction < 1.0:
        raise ValueError(f"decay_fraction must lie in (0, 1), got {decay_fraction}")
    milestone = max(1, min(num_updates - 1, int(round(decay_fraction * num_updates))))
    return MultiStepParamScheduler(
        values=[1.0, gamma], milestones=[milestone], num_updates=num_updates
    )
