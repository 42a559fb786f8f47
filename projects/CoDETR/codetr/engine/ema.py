"""
An exponential moving average (EMA) of a model's weights, kept while it trains.

:class:`ModelEMA` holds a copy of every tensor of the model's state dict (parameters and
buffers; floating-point ones in at least float32) and, after the optimizer step of iteration
``t`` (0-based), moves the floating-point ones towards the model's values::

    ema = decay_t * ema + (1 - decay_t) * value
    decay_t = decay * (1 - exp(-(t + 1) / warmup_iters))      (decay_t = decay if warmup_iters = 0)

Integer buffers (BatchNorm's ``num_batches_tracked``) take the model's latest value. The warm-up
makes the average follow the weights closely at first (``decay_t`` near 0) and ever more slowly
(``decay_t`` tends to ``decay``, with time constant ``warmup_iters``).

This is the rule of mmdet's ``ExpMomentumEMAHook``, which the authors use for ViT-L Co-DINO
(``momentum=0.0001``, its default ``total_iter=2000`` and ``interval=1``, buffers included):
``ema = (1 - m_t) * ema + m_t * value`` after iteration ``t`` with
``m_t = (1 - momentum) * exp(-(1 + t) / total_iter) + momentum``, i.e.
``decay = 1 - momentum`` and ``warmup_iters = total_iter`` here. Unlike mmdet's hook, which
swaps the average into the model at the end of every epoch (so the authors' checkpoints hold
the average as the weights and the raw weights as ``ema_*`` buffers), the model keeps its raw
weights here, and integer buffers follow the model (mmdet's copy keeps their initial values).

:class:`ModelEMAHook` updates the average after every iteration. ``LazyConfigTrainer`` (with
``cfg.train.model_ema.enabled``) saves it in its checkpoints under :data:`EMA_WEIGHTS_KEY`,
next to the raw weights (``"model"``), restores it exactly on ``--resume``, and evaluates the
averaged weights (:meth:`ModelEMA.applied`).
"""

import contextlib
import logging
import math
from typing import Dict, Iterator, List, Mapping

import torch
from detectron2.engine.train_loop import HookBase
from omegaconf import DictConfig
from torch import Tensor, nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["EMA_WEIGHTS_KEY", "ModelEMA", "ModelEMAHook", "model_ema_enabled"]

logger = logging.getLogger(__name__)

# The checkpoint entry holding the averaged weights, a state dict of the model like "model".
EMA_WEIGHTS_KEY = "model_ema"
_EXAMPLES = 3


def model_ema_enabled(cfg: DictConfig) -> bool:
    """Whether ``cfg.train.model_ema.enabled`` (False for a config without ``model_ema``)."""
    settings = cfg.train.get("model_ema")
    return bool(settings and settings.enabled)


def _average_copy(value: Tensor, like: Tensor) -> Tensor:
    """A detached copy of ``value`` on the device of the model's tensor ``like``, in its dtype
    or, for a floating-point one, in at least float32."""
    dtype = (
        torch.promote_types(like.dtype, torch.float32) if like.is_floating_point() else like.dtype
    )
    return value.detach().to(device=like.device, dtype=dtype, copy=True)


def _some(names: List[str]) -> str:
    """The first few ``names``, with "..." when there are more."""
    return ", ".join(names[:_EXAMPLES]) + (", ..." if len(names) > _EXAMPLES else "")


class ModelEMA:
    """
    The exponential moving average of a model's state dict (see the module docstring), on the
    devices of the model's tensors. It is empty until :meth:`reset` or :meth:`load_state_dict`.

    Example::

        ema = ModelEMA(model, decay=0.9999, warmup_iters=2000)
        ema.reset()
        for iteration in range(max_iter):
            ...  # a training step
            ema.update(iteration)
        with ema.applied():
            evaluate(model)
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup_iters: int = 0):
        """
        Args:
            model: the trained model (a DDP / DataParallel wrapper is looked through: the
                names are those of the wrapped model's state dict).
            decay: the decay of the average after warm-up, in [0, 1); 0 follows the weights.
            warmup_iters: the time constant, in iterations, of the decay's warm-up; 0: none.
        """
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ModelEMA(decay=) must be in [0, 1), got {decay}")
        if warmup_iters < 0:
            raise ValueError(f"ModelEMA(warmup_iters=) must be >= 0, got {warmup_iters}")
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        self._model = model
        self.decay = decay
        self.warmup_iters = warmup_iters
        self._state: Dict[str, Tensor] = {}

    @property
    def initialized(self) -> bool:
        """Whether the average holds weights (after :meth:`reset` or :meth:`load_state_dict`)."""
        return bool(self._state)

    def decay_at(self, iteration: int) -> float:
        """The decay applied by :meth:`update` after ``iteration`` (0-based)."""
        if self.warmup_iters == 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(iteration + 1) / self.warmup_iters))

    def reset(self) -> None:
        """Start the average at the model's current weights."""
        self._state = {
            name: _average_copy(value, value) for name, value in self._model_state().items()
        }

    @torch.no_grad()
    def update(self, iteration: int) -> None:
        """Move the average towards the model's weights after the step of ``iteration``."""
        decay = self.decay_at(iteration)
        for name, value in self._model_state().items():
            average = self._state[name]
            if average.is_floating_point():
                average.mul_(decay).add_(value, alpha=1.0 - decay)
            else:
                average.copy_(value)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """
        Within this context the model holds the averaged weights (cast to its dtypes); its own
        weights, copied meanwhile, are put back exactly on exit.
        """
        model_state = self._model_state()
        with torch.no_grad():
            raw = {name: value.clone() for name, value in model_state.items()}
            for name, value in model_state.items():
                value.copy_(self._state[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in model_state.items():
                    value.copy_(raw[name])

    def state_dict(self) -> Dict[str, Tensor]:
        """The averaged weights, named as the model's state dict (they load into the model)."""
        if not self._state:
            raise RuntimeError("ModelEMA.state_dict(): empty; call reset() or load_state_dict()")
        return dict(self._state)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """
        Restore the averaged weights of :meth:`state_dict` exactly, on the devices of the
        model's tensors. The model's tensors that ``state`` lacks (or holds in another shape)
        start at the model's current values, and entries of ``state`` that the model lacks are
        dropped, both with a warning.
        """
        loaded, restarted = {}, []
        for name, value in self._model_state().items():
            saved = state.get(name)
            if saved is None or saved.shape != value.shape:
                restarted.append(name)
                saved = value
            loaded[name] = _average_copy(saved, value)
        dropped = [name for name in state if name not in loaded]
        if restarted:
            logger.warning(
                f"The EMA of the weights restarts at the model's values for {len(restarted)} "
                f"tensors missing from the saved average or of another shape: {_some(restarted)}"
            )
        if dropped:
            logger.warning(
                f"The saved EMA of the weights has {len(dropped)} entries that the model lacks, "
                f"dropped: {_some(dropped)}"
            )
        self._state = loaded

    def _model_state(self) -> Dict[str, Tensor]:
        """The model's state dict: detached tensors sharing the model's storage."""
        state = self._model.state_dict()
        if self._state and state.keys() != self._state.keys():
            raise RuntimeError(
                "ModelEMA: the model's state dict no longer has the names of the average"
            )
        return state


class ModelEMAHook(HookBase):
    """
    Updates a :class:`ModelEMA` after every iteration. Register it before the hooks that save
    checkpoints or evaluate. When training begins on an empty average (not restored from a
    checkpoint) it starts the average at the model's weights.
    """

    def __init__(self, ema: ModelEMA):
        """
        Args:
            ema: the average of the trainer's model.
        """
        self._ema = ema

    def before_train(self) -> None:
        if self._ema.initialized:
            return
        if self.trainer.start_iter > 0:
            logger.warning(
                f"The EMA of the weights starts at iteration {self.trainer.start_iter}, from the "
                f"resumed weights: the checkpoint resumed from holds none ('{EMA_WEIGHTS_KEY}')."
            )
        self._ema.reset()

    def after_step(self) -> None:
        self._ema.update(self.trainer.iter)
