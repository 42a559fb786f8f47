"""
Training and evaluation driven by a LazyConfig.

detectron2's :class:`DefaultTrainer` reads yacs keys in its constructor, ``build_hooks``,
``resume_or_load`` and ``test``; :class:`LazyConfigTrainer` replaces those parts and keeps the
rest (the hook machinery, ``run_step``, ``state_dict``). The config must have the fields
``model``, ``optimizer``, ``lr_multiplier``, ``dataloader.train``, ``dataloader.test``,
optionally ``dataloader.evaluator``, and ``train`` (see ``configs/common/train.py``).
"""

import contextlib
import copy
import json
import logging
import os
import time
import weakref
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from detectron2.config import instantiate
from detectron2.data import DatasetFromList
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, hooks
from detectron2.engine.defaults import create_ddp_model, default_writers
from detectron2.engine.train_loop import HookBase, TrainerBase
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.solver import LRMultiplier
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import EventWriter, get_event_storage
from detectron2.utils.logger import setup_logger
from fvcore.common.param_scheduler import ParamScheduler
from omegaconf import DictConfig, OmegaConf


from .checkpointer import AtomicCheckpointer, min_loaded_shares
from .device import AMP_PRECISIONS, amp_precision, autocast_to, inference_precision, train_device
from .ema import EMA_WEIGHTS_KEY, ModelEMA, ModelEMAHook, model_ema_enabled
from .hooks import MetricHistory, SkippedImageLimit, StopWithCheckpoint
from .optimizer import add_gradient_clipping

__all__ = [
    "drop_metrics_from",
    "DeviceAMPTrainer",
    "LazyConfigTrainer",
]

logger = logging.getLogger(__name__)


def drop_metrics_from(metrics_file: str, iteration: int) -> None:
    """
    Removes from ``metrics_file`` (detectron2's ``metrics.json``, a json object per line) the
    rows of ``iteration`` and later: a run that stopped after its last checkpoint wrote them,
    and the resumed run writes them again. The file is rewritten in place: the writers may
    already hold it open for appending.
    """
    if not os.path.isfile(metrics_file):
        return
    with open(metrics_file, "r+") as f:
        lines = f.readlines()
        kept = [line for line in lines if _metrics_row_iteration(line) < iteration]
        if len(kept) == len(lines):
            return
        f.seek(0)
        f.writelines(kept)
        f.truncate()
    logger.info(
        f"{metrics_file}: dropped {len(lines) - len(kept)} rows of iterations >= {iteration}, "
        "written after the checkpoint this run resumes from"
    )


def _metrics_row_iteration(line: str) -> float:
    """The iteration of a ``metrics.json`` row; infinity for a row cut short by a kill."""
    try:
        return json.loads(line).get("iteration", -1)
    except json.JSONDecodeError:
        return float("inf")


def _iteration_seed(base_seed: int, rank: int, iteration: int) -> int:
    """A 32-bit seed that depends only on (base seed, rank, iteration)."""
    return int(np.random.SeedSequence([base_seed, rank, iteration]).generate_state(1)[0])


class _EndOfTrainingSafe(ParamScheduler):
    """
    fvcore ParamSchedulers are defined on ``where`` in [0, 1) (``ConstantParamScheduler`` and
    rescaled ``CompositeParamScheduler`` intervals raise at 1), but detectron2's LRScheduler
    hook also steps after the last iteration, asking for ``where = max_iter / max_iter = 1``.
    That rate is never used: answer it with the rate of the last iteration.
    """

    def __init__(self, scheduler: ParamScheduler, *, max_iter: int):
        self._scheduler = scheduler
        self._last_where = (max_iter - 1) / max_iter

    def __call__(self, where: float) -> float:
        return self._scheduler(min(where, self._last_where))


class DeviceAMPTrainer(AMPTrainer):
    """
    detectron2's :class:`AMPTrainer` on any device. Its ``run_step`` asserts that CUDA is
    available and uses ``torch.cuda.amp.autocast``; this one autocasts on the device of the
    model's parameters with ``torch.autocast``, so AMP also runs on CPU (in bfloat16), and keeps
    every option of :class:`AMPTrainer` (``zero_grad_before_forward``, ``log_grad_scaler``,
    ``async_write_metrics``, ``gather_metric_period``, a tensor loss).
    Gradients are scaled only for float16: bfloat16 has the exponent range of float32.
    The grad scaler's state is checkpointed by :meth:`AMPTrainer.state_dict`.
    """

    def __init__(
        self,
        *,
        model: torch.nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
        precision: torch.dtype,
        gather_metric_period: int = 1,
        zero_grad_before_forward: bool = False,
        log_grad_scaler: bool = False,
        async_write_metrics: bool = False,
    ):
        """
        Args:
            model: returns a dict of losses (or one loss tensor) in training mode.
            data_loader: an iterable of training batches.
            optimizer: the optimizer; any gradient clipping must happen in its ``step``
                (see :func:`codetr.engine.optimizer.add_gradient_clipping`), which runs after
                the gradients are unscaled.
            precision: ``torch.float16`` or ``torch.bfloat16``.
            gather_metric_period, zero_grad_before_forward, log_grad_scaler,
                async_write_metrics: as :class:`AMPTrainer`.
        """
        if precision not in AMP_PRECISIONS.values():
            raise ValueError(
                f"DeviceAMPTrainer(precision=) must be float16 or bfloat16, got {precision}"
            )
        self.device_type = next(model.parameters()).device.type
        grad_scaler = torch.amp.GradScaler(self.device_type, enabled=precision == torch.float16)
        super().__init__(
            model,
            data_loader,
            optimizer,
            gather_metric_period=gather_metric_period,
            zero_grad_before_forward=zero_grad_before_forward,
            grad_scaler=grad_scaler,
            precision=precision,
            log_grad_scaler=log_grad_scaler,
            async_write_metrics=async_write_metrics,
        )

    def run_step(self) -> None:
        # AMPTrainer.run_step with torch.autocast on the model's device instead of CUDA's
        assert self.model.training, "[DeviceAMPTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast(device_type=self.device_type, dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()

        self.grad_scaler.scale(losses).backward()
        if self.log_grad_scaler:
            get_event_storage().put_scalar("[metric]grad_scaler", self.grad_scaler.get_scale())
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(
                self._write_metrics, loss_dict, data_time, iter=self.iter
            )
        else:
            self._write_metrics(loss_dict, data_time)
        self.grad_scaler.step(self.optimizer)
        self.grad_scaler.update()


class LazyConfigTrainer(DefaultTrainer):
    """
    :class:`DefaultTrainer` configured by a LazyConfig.

    It builds the model on ``cfg.train.device``, the optimizer from ``cfg.optimizer`` (with
    global gradient-norm clipping inside ``step`` when ``cfg.train.clip_grad.enabled``), the
    training loader, DDP when there are several processes, a :class:`SimpleTrainer` or (with
    ``cfg.train.amp.enabled``) a :class:`DeviceAMPTrainer`, the LR scheduler
    ``LRMultiplier(cfg.lr_multiplier)``, an :class:`AtomicCheckpointer` and the hooks
    IterationTimer, LRScheduler, PeriodicCheckpointer, EvalHook and PeriodicWriter.

    With ``cfg.train.model_ema.enabled`` it also keeps an exponential moving average of the
    weights (:class:`ModelEMA`, as ``self.model_ema``), updated after every iteration, saved
    in the checkpoints as ``"model_ema"`` next to the raw weights (``"model"``), and
    evaluated in place of the raw weights.

    Exact resume: a checkpoint holds the model, the iteration, the optimizer, the scheduler,
    the grad scaler and the EMA of the weights. With ``cfg.train.seed >= 0`` every iteration
    also reseeds the random generators of python, numpy and torch from (seed, rank,
    iteration), and a resumed run replays (loads and drops) the training batches of the
    iterations already done before it continues. So an interrupted and resumed run computes
    the same weights (and EMA) as an uninterrupted one, at the cost of reading the data of the
    done iterations once more.
    With ``cfg.train.seed < 0`` the resumed run continues with new random data.

    Example::

        cfg = load_lazy_config("configs/toy/dino_toy.py", ["train.max_iter=10"])
        trainer = LazyConfigTrainer(cfg)
        trainer.resume_or_load(resume=True)
        trainer.train()
    """

    def __init__(self, cfg: DictConfig):
        """
        Args:
            cfg: the LazyConfig (see the module docstring for the fields it needs).
        """
        TrainerBase.__init__(self)  # DefaultTrainer.__init__ reads yacs keys
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        self.cfg = cfg
        self.seed: Optional[int] = cfg.train.seed if cfg.train.seed >= 0 else None
        if self.seed is not None:
            # As default_setup does: the model's initial weights and the order of the
            # training data then depend only on the seed, also without default_setup.
            seed_all_rng(self.seed + comm.get_rank())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        self.train_dataset = instantiate(cfg.dataloader.train.dataset)
        self.train_mapper = instantiate(cfg.dataloader.train.mapper)
        data_loader = self.build_train_loader(
            cfg, dataset=self.train_dataset, mapper=self.train_mapper
        )
        self.check_evaluation_setup(cfg)
        self.model_ema = self.build_model_ema(cfg, model)
        model = self.build_ddp_model(cfg, model)
        self._trainer = self.build_step_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        ema_checkpointable = {} if self.model_ema is None else {EMA_WEIGHTS_KEY: self.model_ema}
        self.checkpointer = AtomicCheckpointer(
            model,
            cfg.train.output_dir,
            trainer=weakref.proxy(self),
            **ema_checkpointable,
            **min_loaded_shares(cfg),
        )
        if comm.is_main_process():
            self.checkpointer.remove_stale_temporary_files()
        self.start_iter = 0
        self.max_iter = cfg.train.max_iter
        self._last_eval_results: Optional[Dict[str, Any]] = None
        self._stop = StopWithCheckpoint(self.checkpointer if comm.is_main_process() else None)
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_model(cls, cfg: DictConfig) -> torch.nn.Module:
        """``instantiate(cfg.model)`` on ``cfg.train.device``."""
        model = instantiate(cfg.model).to(train_device(cfg))
        logger.info(f"Model:\n{model}")
        return model

    @classmethod
    def build_model_ema(cls, cfg: DictConfig, model: torch.nn.Module) -> Optional[ModelEMA]:
        """
        With ``cfg.train.model_ema.enabled``: an (empty) :class:`ModelEMA` of ``model`` with
        the ``decay`` and ``warmup_iters`` of ``cfg.train.model_ema``; else None.
        """
        if not model_ema_enabled(cfg):
            return None
        settings = cfg.train.model_ema
        return ModelEMA(model, decay=settings.decay, warmup_iters=settings.warmup_iters)

    @classmethod
    def build_optimizer(cls, cfg: DictConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
        """
        ``instantiate(cfg.optimizer)`` with ``cfg.optimizer.params.model = model``, plus
        gradient clipping from ``cfg.train.clip_grad`` (``enabled``, ``max_norm``,
        ``norm_type``).
        """
        cfg.optimizer.params.model = model
        optimizer = instantiate(cfg.optimizer)
        clip = cfg.train.clip_grad
        if clip.enabled:
            add_gradient_clipping(optimizer, max_norm=clip.max_norm, norm_type=clip.norm_type)
        return optimizer

    @classmethod
    def build_train_loader(cls, cfg: DictConfig, *, dataset: Any = None, mapper: Any = None) -> Any:
        """
        ``instantiate(cfg.dataloader.train)``, with its ``dataset`` and ``mapper`` replaced by
        the given, already built, objects (the trainer reads the dataset's size and the
        mapper's count of skipped images).
        """
        loader = copy.copy(cfg.dataloader.train)
        if dataset is not None:
            # what build_detection_train_loader wraps a list in; a list put into the config
            # would become a ListConfig of DictConfigs
            loader.dataset = (
                DatasetFromList(dataset, copy=False) if isinstance(dataset, list) else dataset
            )
        if mapper is not None:
            loader.mapper = mapper
        return instantiate(loader)

    @classmethod
    def check_evaluation_setup(cls, cfg: DictConfig) -> None:
        """
        Builds (without running) the test loader and the evaluator that the evaluations
        during and after training will build, so that a wrong test dataset or evaluator fails
        before iteration 0 rather than after the last one.
        """
        if "evaluator" in cfg.dataloader:
            instantiate(cfg.dataloader.test)
            instantiate(cfg.dataloader.evaluator)

    @classmethod
    def build_ddp_model(cls, cfg: DictConfig, model: torch.nn.Module) -> torch.nn.Module:
        """
        Wrap ``model`` in DistributedDataParallel when there are several processes, with the
        keyword arguments ``cfg.train.ddp``. CPU processes (gloo) get ``device_ids=None``.
        """
        ddp_kwargs = dict(cfg.train.ddp)
        if train_device(cfg).type == "cpu":
            ddp_kwargs["device_ids"] = None
        return create_ddp_model(model, **ddp_kwargs)

    @classmethod
    def build_step_trainer(
        cls,
        cfg: DictConfig,
        model: torch.nn.Module,
        data_loader: Any,
        optimizer: torch.optim.Optimizer,
    ) -> SimpleTrainer:
        """
        :class:`DeviceAMPTrainer` when ``cfg.train.amp.enabled`` (``cfg.train.amp.precision``
        "float16", "bfloat16" or "auto": float16 on CUDA, bfloat16 elsewhere), else
        :class:`SimpleTrainer`.
        """
        amp = cfg.train.amp
        if not amp.enabled:
            return SimpleTrainer(model, data_loader, optimizer)
        try:
            precision = amp_precision(amp.precision, train_device(cfg))
        except ValueError as e:
            raise ValueError(f"cfg.train.amp.precision: {e}") from None
        return DeviceAMPTrainer(
            model=model, data_loader=data_loader, optimizer=optimizer, precision=precision
        )

    @classmethod
    def build_lr_scheduler(cls, cfg: DictConfig, optimizer: torch.optim.Optimizer) -> LRMultiplier:
        """
        ``LRMultiplier(optimizer, instantiate(cfg.lr_multiplier), cfg.train.max_iter)``: the
        fvcore ParamScheduler is read at the fraction ``iteration / max_iter`` of training
        (it need not accept 1, see :class:`_EndOfTrainingSafe`).
        """
        max_iter = cfg.train.max_iter
        try:
            schedule = instantiate(cfg.lr_multiplier)
        except ValueError as e:  # fvcore's schedulers name neither the config nor max_iter
            raise ValueError(
                f"cfg.lr_multiplier cannot be built with train.max_iter={max_iter}: {e}"
            ) from e
        multiplier = _EndOfTrainingSafe(schedule, max_iter=max_iter)
        return LRMultiplier(optimizer, multiplier, max_iter)

    def build_hooks(self) -> List[Optional[HookBase]]:
        """
        IterationTimer, LRScheduler, ModelEMAHook (with ``cfg.train.model_ema.enabled``),
        PeriodicCheckpointer (main process, ``cfg.train.checkpointer``), EvalHook
        (``cfg.train.eval_period``; of the EMA of the weights when there is one), MetricHistory,
        SkippedImageLimit (``cfg.train.max_skipped_image_fraction``, when the training mapper
        counts skipped images), PeriodicWriter (main process, ``cfg.train.log_period``) and
        StopWithCheckpoint. ``None`` entries are dropped by ``register_hooks``.
        """
        cfg = self.cfg
        is_main = comm.is_main_process()
        counts_skipped_images = hasattr(self.train_mapper, "skipped_images")

        def test_and_save_results() -> Dict[str, Any]:
            if self.model_ema is None:
                weights = contextlib.nullcontext()
            else:
                logger.info("Evaluating the EMA of the weights (cfg.train.model_ema)")
                weights = self.model_ema.applied()
            with weights:
                self._last_eval_results = self.test(cfg, self.model)
            return self._last_eval_results

        return [
            hooks.IterationTimer(),
            hooks.LRScheduler(),
            None if self.model_ema is None else ModelEMAHook(self.model_ema),
            (
                hooks.PeriodicCheckpointer(self.checkpointer, **cfg.train.checkpointer)
                if is_main
                else None
            ),
            hooks.EvalHook(cfg.train.eval_period, test_and_save_results),
            MetricHistory(),
            (
                SkippedImageLimit(
                    skipped_images=lambda: self.train_mapper.skipped_images,
                    num_images=len(self.train_dataset),
                    images_per_iteration=(
                        cfg.dataloader.train.total_batch_size // comm.get_world_size()
                    ),
                    max_fraction=cfg.train.max_skipped_image_fraction,
                    stop=self._stop,
                )
                if counts_skipped_images
                else None
            ),
            (
                hooks.PeriodicWriter(self.build_writers(), period=cfg.train.log_period)
                if is_main
                else None
            ),
            self._stop,
        ]

    def build_writers(self) -> List[EventWriter]:
        """detectron2's ``default_writers`` in ``cfg.train.output_dir``."""
        return default_writers(self.cfg.train.output_dir, self.max_iter)

    def resume_or_load(self, resume: bool = True) -> None:
        """
        With ``resume`` and a ``last_checkpoint`` in ``cfg.train.output_dir``: load the model
        and the whole training state (with the EMA of the weights) from it and continue after
        its iteration. Otherwise load only the model weights (``"model"``) of
        ``cfg.train.init_checkpoint`` (if set) and start at 0; an EMA of the weights then
        starts at them.
        """
        unused = self.checkpointer.resume_or_load(self.cfg.train.init_checkpoint, resume=resume)
        if not (resume and self.checkpointer.has_checkpoint()):
            return
        if EMA_WEIGHTS_KEY in unused:
            logger.warning(
                f"{self.checkpointer.get_checkpoint_file()} holds an EMA of the weights, which "
                "this run neither continues nor saves (cfg.train.model_ema.enabled is False)"
            )
        # The checkpoint holds the iteration that had just finished.
        self.start_iter = self.iter + 1
        if self.start_iter >= self.max_iter:
            raise RuntimeError(
                f"--resume: the run in {self.cfg.train.output_dir!r} is finished (its last "
                f"checkpoint, {self.checkpointer.get_checkpoint_file()!r}, is iteration "
                f"{self.iter} and train.max_iter={self.max_iter}): nothing to train. Raise "
                "train.max_iter to train longer, or choose another train.output_dir."
            )
        if comm.is_main_process():
            drop_metrics_from(
                os.path.join(self.cfg.train.output_dir, "metrics.json"), self.start_iter
            )

    def run_step(self) -> None:
        if self.seed is not None:
            seed_all_rng(_iteration_seed(self.seed, comm.get_rank(), self.iter))
        super().run_step()

    def train(self) -> Optional[Dict[str, Any]]:
        """
        Train from ``start_iter`` to ``cfg.train.max_iter``.

        Returns:
            the results of the last evaluation, if any ran.
        """
        with self._stop.catch_signals():
            self._replay_training_data()
            TrainerBase.train(self, self.start_iter, self.max_iter)
        return self._last_eval_results

    def _replay_training_data(self) -> None:
        """Advance the training data stream past the iterations a resumed run has done."""
        if not 0 < self.start_iter < self.max_iter:
            return
        if self.seed is None:
            logger.warning(
                "cfg.train.seed < 0: the resumed run does not continue the same data stream "
                "and random numbers; set train.seed >= 0 for an exact resume."
            )
            return
        logger.info(f"Replaying the training data of iterations 0..{self.start_iter - 1} ...")
        rank = comm.get_rank()
        for iteration in range(self.start_iter):
            seed_all_rng(_iteration_seed(self.seed, rank, iteration))
            next(self._trainer._data_loader_iter)

    @classmethod
    def test(cls, cfg: DictConfig, model: torch.nn.Module) -> Dict[str, Any]:
        """
        Run ``model`` on ``cfg.dataloader.test`` and evaluate it with
        ``cfg.dataloader.evaluator``; the main process logs the results table. The model runs
        under autocast when ``cfg.train.inference_amp.enabled`` (:func:`inference_precision`).

        Returns:
            the evaluator's results (empty when the config has no evaluator).
        """
        if "evaluator" not in cfg.dataloader:
            logger.warning("cfg.dataloader has no evaluator: skipping evaluation.")
            return {}
        precision = inference_precision(cfg)
        if precision is not None:
            logger.info(f"Evaluating under autocast in {precision} (cfg.train.inference_amp)")
        with autocast_to(next(model.parameters()).device.type, precision):
            results = inference_on_dataset(
                model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
            )
        if comm.is_main_process():
            print_csv_format(results)
        return results
