"""
A :class:`DetectionCheckpointer` whose files are replaced atomically.

fvcore's ``Checkpointer.save`` writes the checkpoint and the ``last_checkpoint`` tag in place:
a crash (or a full disk) in the middle leaves a truncated file that a later ``--resume``
tries to load. Here every file is written to a temporary file in the same folder and then
renamed over the target with ``os.replace``, which is atomic on POSIX and Windows: a reader
sees either the old complete file or the new complete file.
"""

import os
import pickle
import re
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Set

import torch
from detectron2.checkpoint import DetectionCheckpointer
from fvcore.common.checkpoint import _IncompatibleKeys
from omegaconf import DictConfig
from torch import nn

from codetr.checkpoint import (
    convert_official_swin,
    convert_published_eva02,
    convert_torchvision_resnet,
    is_official_swin_state_dict,
    is_torchvision_resnet_state_dict,
    load_pickle_weights,
    published_eva02_state_dict,
)

from .ema import EMA_WEIGHTS_KEY

__all__ = [
    "AtomicCheckpointer",
    "CheckpointMismatchError",
    "atomic_write",
    "min_loaded_shares",
]

# The temporary files of ``atomic_write``: ".{basename}.{pid}.tmp".
_TEMPORARY_FILE = re.compile(r"^\..+\.(\d+)\.tmp$")
_EXAMPLES = 3


class CheckpointMismatchError(ValueError):
    """A weight file fills too few of the model's tensors: it is not a checkpoint of this model."""


def min_loaded_shares(cfg: DictConfig) -> Dict[str, float]:
    """
    The :class:`AtomicCheckpointer` arguments ``min_loaded_fraction`` and
    ``min_backbone_fraction`` of ``cfg.train.init_checkpoint_min_loaded`` (a dict with the keys
    ``model`` and ``backbone``); the defaults for the keys, or the dict, it lacks.

    Raises:
        KeyError: the dict has another key.
    """
    shares = cfg.train.get("init_checkpoint_min_loaded") or {}
    unknown = sorted(set(shares) - {"model", "backbone"})
    if unknown:
        raise KeyError(
            f"cfg.train.init_checkpoint_min_loaded has unknown keys {unknown}; "
            "expected 'model' and 'backbone'"
        )
    return {
        "min_loaded_fraction": float(shares.get("model", 0.0)),
        "min_backbone_fraction": float(shares.get("backbone", 0.5)),
    }


def _process_exists(pid: int) -> bool:
    """Whether a process ``pid`` runs (or may run: on Windows, which has no signal 0)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _examples(items: Sequence[Any]) -> str:
    """The first few ``items``, and how many there are in all."""
    shown = "; ".join(str(item) for item in items[:_EXAMPLES])
    return f"{len(items)}" + (f", e.g. {shown}" if items else "")


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """
    Write a file atomically on a local file system.

    Args:
        path: the file to create or replace.
        write: called with a binary file object open for writing; it writes the whole content.
            If it raises, ``path`` is left untouched and the temporary file is removed.
    """
    folder, basename = os.path.split(os.path.abspath(path))
    # Hidden, and not ending with ".pth": never mistaken for a checkpoint by
    # ``Checkpointer.get_all_checkpoint_files``.
    tmp_path = os.path.join(folder, f".{basename}.{os.getpid()}.tmp")
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise


class AtomicCheckpointer(DetectionCheckpointer):
    """
    Same as :class:`DetectionCheckpointer`, but the checkpoint files and the
    ``last_checkpoint`` tag are written atomically (see :func:`atomic_write`), so an
    interrupted save never damages the previous checkpoint. ``save_dir`` must be on a local
    file system.

    Loading runs no code of the file: ``.pkl`` files (detectron2 and Detectron1 model zoo) are
    read by :func:`codetr.checkpoint.load_pickle_weights`, which allows numpy arrays and plain
    data only, and every ``torch.load`` uses ``weights_only=True``. It also accepts ImageNet
    backbone weights as published: a plain torchvision ResNet state dict, an official Swin
    checkpoint, or an EVA-02 checkpoint (patch embedding and position embedding resized to the
    model's); their names are mapped to the detector's ``backbone.*``.

    A checkpoint of a run with an EMA of the weights (:mod:`codetr.engine.ema`) holds the raw
    weights as ``"model"`` and the averaged ones as ``"model_ema"``; with ``load_ema_weights``
    the model is given the averaged ones.

    A file given to :meth:`load` (e.g. ``train.init_checkpoint``; not the last checkpoint of
    ``save_dir`` that ``resume_or_load(resume=True)`` resumes from) must fill enough of the
    model's tensors, else :class:`CheckpointMismatchError` names the file and what matched
    (see ``min_loaded_fraction`` and ``min_backbone_fraction``).
    """

    def __init__(
        self,
        model: nn.Module,
        save_dir: str = "",
        *,
        save_to_disk: Optional[bool] = None,
        min_loaded_fraction: float = 0.0,
        min_backbone_fraction: float = 0.5,
        load_ema_weights: bool = False,
        **checkpointables: Any,
    ):
        """
        Args:
            model, save_dir, save_to_disk, checkpointables: as for
                :class:`DetectionCheckpointer`.
            min_loaded_fraction: a loaded file must fill at least this share of the model's
                tensors (its state dict entries), and at least one of them.
            min_backbone_fraction: a loaded file that holds only ``backbone.*`` tensors must
                fill at least this share of the model's ``backbone.*`` tensors.
            load_ema_weights: load into the model the EMA of the weights (``"model_ema"``) of a
                file that holds one, instead of its raw weights (``"model"``); a file without
                one gives its raw weights, with a warning.
        """
        for name, value in [
            ("min_loaded_fraction", min_loaded_fraction),
            ("min_backbone_fraction", min_backbone_fraction),
        ]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"AtomicCheckpointer({name}=) must be in [0, 1], got {value}")
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.min_loaded_fraction = min_loaded_fraction
        self.min_backbone_fraction = min_backbone_fraction
        self.load_ema_weights = load_ema_weights
        # The file that the load in progress checks the loaded share of (None: no check).
        self._checked_file: Optional[str] = None

    def load(
        self,
        path: str,
        checkpointables: Optional[List[str]] = None,
        *,
        check_loaded_share: bool = True,
    ) -> Dict[str, Any]:
        """
        Load ``path`` as :meth:`DetectionCheckpointer.load` does.

        Args:
            path: the file (or URL); empty: load nothing.
            checkpointables: the checkpointables to load; None: all that the file holds.
            check_loaded_share: raise :class:`CheckpointMismatchError`, before the usual
                warnings about mismatched keys, when the file fills too few of the model's
                tensors.
        """
        self._checked_file = path if check_loaded_share else None
        try:
            return super().load(path, checkpointables)
        finally:
            self._checked_file = None

    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        """
        With ``resume`` and a last checkpoint in ``save_dir``: load it with all checkpointables
        (no loaded-share check: it is this run's own checkpoint). Otherwise load only the model
        weights of ``path``, with the loaded-share check.
        """
        if resume and self.has_checkpoint():
            return self.load(self.get_checkpoint_file(), check_loaded_share=False)
        return self.load(path, checkpointables=[])

    def remove_stale_temporary_files(self) -> List[str]:
        """
        Delete the temporary files that :func:`atomic_write` left in ``save_dir`` when its
        process was killed during a save: ``.{basename}.{pid}.tmp`` whose process no longer
        runs. Those of running processes (a save in progress) are kept.

        Returns:
            the paths removed (none when ``save_dir`` is empty or missing, or when this
            process does not save).
        """
        if not self.save_dir or not self.save_to_disk or not os.path.isdir(self.save_dir):
            return []
        removed = []
        for name in sorted(os.listdir(self.save_dir)):
            match = _TEMPORARY_FILE.match(name)
            if match is None or _process_exists(int(match.group(1))):
                continue
            path = os.path.join(self.save_dir, name)
            try:
                os.remove(path)
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            self.logger.warning(
                f"Removed {path}: the temporary file of a save interrupted in process "
                f"{match.group(1)}, which no longer runs"
            )
            removed.append(path)
        return removed

    def _load_file(self, filename: str) -> Dict[str, Any]:
        loaded = self._read_file(filename)
        if self.load_ema_weights:
            if EMA_WEIGHTS_KEY in loaded:
                self.logger.info(f"{filename}: loading its EMA weights ('{EMA_WEIGHTS_KEY}')")
                loaded["model"] = loaded.pop(EMA_WEIGHTS_KEY)
            else:
                self.logger.warning(
                    f"{filename} holds no EMA weights ('{EMA_WEIGHTS_KEY}'): loading its raw "
                    "weights ('model')"
                )
        weights = loaded["model"]
        if is_torchvision_resnet_state_dict(weights):
            self.logger.info(f"{filename}: torchvision ResNet weights, mapped to backbone.*")
            return {"model": convert_torchvision_resnet(weights)}
        if is_official_swin_state_dict(weights):
            self.logger.info(f"{filename}: official Swin weights, mapped to backbone.*")
            return {"model": convert_official_swin(weights)}
        eva02 = published_eva02_state_dict(loaded)
        if eva02 is not None:
            self.logger.info(
                f"{filename}: EVA-02 weights, mapped to backbone.* (patch and position "
                "embeddings resized to the model's)"
            )
            return {"model": convert_published_eva02(eva02, self.model.state_dict())}
        return loaded

    def _read_file(self, filename: str) -> Dict[str, Any]:
        """:meth:`DetectionCheckpointer._load_file`, without running code of the file."""
        # DetectionCheckpointer reads .pkl / .pyth with pickle.load / torch.load itself (no
        # hook): its handling of those formats is repeated here on the safely loaded data.
        if filename.endswith(".pkl"):
            data = load_pickle_weights(filename)
            if "model" in data and "__author__" in data:
                self.logger.info(f"Reading a file from '{data['__author__']}'")
                return data
            if "blobs" in data:  # Detectron1 detection models; ImageNet models have no blobs
                data = data["blobs"]
            data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
            return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}
        if filename.endswith(".pyth"):
            data = self._torch_load(filename)
            if "model_state" not in data:
                raise ValueError(
                    f"Cannot load .pyth file {filename}; pycls checkpoints must contain "
                    "'model_state'."
                )
            model_state = {
                k: v
                for k, v in data["model_state"].items()
                if not k.endswith("num_batches_tracked")
            }
            return {"model": model_state, "__author__": "pycls", "matching_heuristics": True}
        return super()._load_file(filename)

    def _torch_load(self, f: str) -> Any:
        """``torch.load`` of tensors and plain data only (``weights_only=True``), on the CPU."""
        try:
            return torch.load(f, map_location=torch.device("cpu"), weights_only=True)
        except pickle.UnpicklingError as e:
            raise pickle.UnpicklingError(f"{f}: {e}") from e

    def _load_model(self, checkpoint: Dict[str, Any]) -> _IncompatibleKeys:
        if self._checked_file is None:
            return super()._load_model(checkpoint)
        loaded_keys: Set[str] = set()

        def record_keys(module: nn.Module, state_dict: Dict[str, Any], *args: Any) -> None:
            # What the model is given, after renaming, matching heuristics and the removal of
            # the tensors of another shape.
            loaded_keys.update(state_dict)

        handle = self.model.register_load_state_dict_pre_hook(record_keys)
        try:
            incompatible = super()._load_model(checkpoint)
        finally:
            handle.remove()
        self._check_loaded_share(self._checked_file, loaded_keys, incompatible)
        return incompatible

    def _check_loaded_share(
        self, filename: str, loaded_keys: Set[str], incompatible: _IncompatibleKeys
    ) -> None:
        """
        Raise :class:`CheckpointMismatchError` when the file ``filename`` filled too few of the
        model's tensors: the model was given the tensors ``loaded_keys``, and ``incompatible``
        is what ``_load_model`` returned.
        """
        model_keys = list(self.model.state_dict())
        filled = [k for k in model_keys if k in loaded_keys]
        wrong_shape = [k for k, _, _ in incompatible.incorrect_shapes]
        file_keys = loaded_keys.union(incompatible.unexpected_keys, wrong_shape)
        backbone_keys = [k for k in model_keys if k.startswith("backbone.")]
        filled_backbone = [k for k in filled if k.startswith("backbone.")]
        backbone_only = bool(file_keys) and all(k.startswith("backbone.") for k in file_keys)

        too_few = not filled or len(filled) < self.min_loaded_fraction * len(model_keys)
        too_few_backbone = (
            backbone_only
            and bool(backbone_keys)
            and len(filled_backbone) < self.min_backbone_fraction * len(backbone_keys)
        )
        if not (too_few or too_few_backbone):
            return

        required = (
            f"at least {self.min_loaded_fraction:.0%} of them"
            if self.min_loaded_fraction > 0
            else "at least one"
        )
        filled_text = f"{len(filled)} of the model's {len(model_keys)} tensors ({required})"
        if backbone_only:
            filled_text += (
                f" and {len(filled_backbone)} of its {len(backbone_keys)} backbone.* tensors "
                f"(at least {self.min_backbone_fraction:.0%} of them, as the file holds "
                "backbone.* tensors only)"
            )
        shapes = [
            f"{k}: {tuple(file_shape)} in the file, {tuple(model_shape)} in the model"
            for k, file_shape, model_shape in incompatible.incorrect_shapes
        ]
        missing = [k for k in model_keys if k not in file_keys]
        raise CheckpointMismatchError(
            f"{filename} is not a checkpoint of this model: it filled {filled_text}.\n"
            f"  tensors of another shape in the file: {_examples(shapes)}\n"
            f"  keys of the file not in the model: {_examples(incompatible.unexpected_keys)}\n"
            f"  tensors of the model not in the file: {_examples(missing)}"
        )

    def save(self, name: str, **kwargs: Any) -> None:
        """
        Save the model and all checkpointables to ``{save_dir}/{name}.pth`` and tag it as the
        last checkpoint.

        Args:
            name: file name without extension.
            kwargs: extra data stored in the checkpoint.
        """
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)

        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        """
        Record ``last_filename_basename`` as the checkpoint to resume from.
        """
        atomic_write(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )
