"""
Training hooks that keep a run's work when it stops early, and its logs exact on resume.

- :class:`StopWithCheckpoint`: SIGINT / SIGTERM (or another hook's request) end training after
  the iteration in progress, with a checkpoint of that iteration.
- :class:`SkippedImageLimit`: logs the training images the mapper could not read and stops the
  run when too many of an epoch's images were unreadable.
- :class:`MetricHistory`: checkpoints the recent values of the logged scalars, so that a resumed
  run logs the same smoothed values as an uninterrupted one.
"""

import contextlib
import logging
import os
import signal
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from detectron2.engine.train_loop import HookBase
from detectron2.utils import comm
from fvcore.common.checkpoint import Checkpointer

__all__ = ["StopWithCheckpoint", "SkippedImageLimit", "MetricHistory"]

logger = logging.getLogger(__name__)

# wall-clock times (IterationTimer's and the printer's estimate), which no resumed run repeats
_TIMINGS = ("time", "data_time", "rank_data_time", "eta_seconds")


class StopWithCheckpoint(HookBase):
    """
    Ends training cleanly after the iteration in progress when a stop was requested: by one of
    ``signals`` (while :meth:`catch_signals` is active) or by :meth:`request`. The main process
    then writes the checkpoint ``model_{iter:07d}.pth`` of that iteration (unless the periodic
    checkpointer just wrote it), and every process exits with ``SystemExit(exit_code)``:
    128 + the signal number for a signal. ``--resume`` continues from that checkpoint.

    On the first signal the previous handlers are restored, so a second Ctrl-C stops at once
    (losing the iteration in progress). With several processes, a request on any of them stops
    all of them after the same iteration.

    Register it after the PeriodicCheckpointer and the writers.
    """

    def __init__(
        self,
        checkpointer: Optional[Checkpointer],
        *,
        signals: Sequence[signal.Signals] = (signal.SIGINT, signal.SIGTERM),
    ):
        """
        Args:
            checkpointer: writes the checkpoint; None on the processes that do not write them.
            signals: the signals that request a stop.
        """
        self._checkpointer = checkpointer
        self._signals = tuple(signals)
        self._exit_code = 0
        self._reason = ""

    def request(self, reason: str, *, exit_code: int) -> None:
        """
        Stop after the current iteration and exit with ``exit_code`` (non-zero); ``reason``
        completes the log line "Training stopped after iteration N: {reason}".
        """
        if not self._exit_code:
            self._exit_code, self._reason = exit_code, reason

    @contextlib.contextmanager
    def catch_signals(self) -> Iterator[None]:
        """
        Within this context, ``signals`` request a stop instead of killing the process. Enter
        it before the training data loader starts its worker processes: the forked workers
        inherit the handler (which ignores signals outside this process), so a Ctrl-C sent to
        the whole process group does not kill them under the main process.
        """
        if threading.current_thread() is not threading.main_thread():
            yield  # signal handlers can only be installed by the main thread
            return
        pid = os.getpid()
        previous = {s: signal.getsignal(s) for s in self._signals}

        def handle(signum: int, frame) -> None:
            if os.getpid() != pid:
                return  # a data loader worker: the main process decides
            for s, handler in previous.items():
                signal.signal(s, handler)
            name = signal.Signals(signum).name
            logger.warning(
                f"{name} received: finishing iteration {self.trainer.iter}, then saving a "
                f"checkpoint and exiting. Send {name} again to stop at once (the iteration in "
                "progress is then lost)."
            )
            self.request(f"{name} received", exit_code=128 + signum)

        for s in self._signals:
            signal.signal(s, handle)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def after_step(self) -> None:
        exit_code, reason = self._exit_code, self._reason
        if comm.get_world_size() > 1:
            requests: List[Tuple[int, str]] = comm.all_gather((exit_code, reason))
            exit_code, reason = max(requests)
        if not exit_code:
            return
        iteration = self.trainer.iter
        if self._checkpointer is not None:
            name = f"model_{iteration:07d}"
            last = self._checkpointer.get_checkpoint_file()
            if os.path.basename(last) != f"{name}.pth":
                self._checkpointer.save(name, iteration=iteration)
            logger.warning(
                f"Training stopped after iteration {iteration}: {reason}. The checkpoint "
                f"{os.path.join(self._checkpointer.save_dir, name)}.pth holds that iteration: "
                "continue with --resume."
            )
        comm.synchronize()
        raise SystemExit(exit_code)


class SkippedImageLimit(HookBase):
    """
    Puts the number of training images skipped as unreadable (by this process's mapper) into
    the metrics as ``data/skipped_images``, and asks ``stop`` to end the run when more than
    ``max_fraction`` of the images one process draws in an epoch were skipped in that epoch.
    """

    def __init__(
        self,
        *,
        skipped_images: Callable[[], int],
        num_images: int,
        images_per_iteration: int,
        max_fraction: float,
        stop: StopWithCheckpoint,
    ):
        """
        Args:
            skipped_images: returns the number of images skipped so far by this process.
            num_images: the number of images of the training set.
            images_per_iteration: the images this process draws per iteration.
            max_fraction: the largest tolerated share of skipped images per epoch.
            stop: the hook that ends training with a checkpoint.
        """
        self._skipped_images = skipped_images
        self._images_per_epoch = max(1, num_images // comm.get_world_size())
        self._images_per_iteration = images_per_iteration
        self._max_fraction = max_fraction
        self._stop = stop
        self._epoch = -1
        self._skipped_before_epoch = 0
        self._logged = 0

    def after_step(self) -> None:
        skipped = self._skipped_images()
        if skipped != self._logged:
            self.trainer.storage.put_scalar("data/skipped_images", skipped, smoothing_hint=False)
            self._logged = skipped
        epoch = (self.trainer.iter + 1) * self._images_per_iteration // self._images_per_epoch
        if epoch != self._epoch:
            self._epoch, self._skipped_before_epoch = epoch, skipped
        in_epoch = skipped - self._skipped_before_epoch
        if in_epoch > self._max_fraction * self._images_per_epoch:
            self._stop.request(
                f"{in_epoch} of the {self._images_per_epoch} images of this epoch could not be "
                "read, more than train.max_skipped_image_fraction="
                f"{self._max_fraction} (the warnings above name them)",
                exit_code=1,
            )


class MetricHistory(HookBase):
    """
    Saves, in each checkpoint, the values of the last ``window_size`` iterations of every
    smoothed scalar in the trainer's event storage (the losses; not the timings), and puts them
    back into the storage of a resumed run. The writers' smoothed values (medians over
    ``window_size`` iterations, e.g. ``total_loss`` in ``metrics.json``) then continue as in an
    uninterrupted run.
    """

    def __init__(self, *, window_size: int = 20):
        """
        Args:
            window_size: the writers' smoothing window (detectron2's default writers: 20).
        """
        self._window_size = window_size
        self._restored: Dict[str, List[Tuple[float, int]]] = {}

    def state_dict(self) -> Dict[str, List[Tuple[float, int]]]:
        storage = getattr(self.trainer, "storage", None)
        if storage is None:
            return {}
        recent = {}
        smoothed = storage.smoothing_hints()
        for name, history in storage.histories().items():
            values = history.values()
            if values and smoothed.get(name) and name not in _TIMINGS:
                first = values[-1][1] - self._window_size
                recent[name] = [(v, i) for v, i in values if i > first]
        return recent

    def load_state_dict(self, state: Dict[str, List[Tuple[float, int]]]) -> None:
        self._restored = state

    def before_train(self) -> None:
        histories = self.trainer.storage.histories()
        for name, values in self._restored.items():
            for value, iteration in values:
                histories[name].update(value, iteration)
        self._restored = {}
