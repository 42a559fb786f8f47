"""
A :class:`DetectionCheckpointer` whose files are replaced atomically.

fvcore's ``Checkpointer.save`` writes the checkpoint and the ``last_checkpoint`` tag in place:
a crash (or a full disk) in the middle leaves a truncated file that a later ``--resume``
tries to load. Here every file is written to a temporary file in the same folder and then
renamed over the target with ``os.replace``, which is atomic on POSIX and Windows: a reader
sees either the old complete file or the new complete file.
"""

import os
from typing import IO, Any, Callable, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer

from codetr.checkpoint import (
    convert_official_swin,
    convert_torchvision_resnet,
    is_official_swin_state_dict,
    is_torchvision_resnet_state_dict,
)

__all__ = ["AtomicCheckpointer", "atomic_write"]


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

    Loading also accepts ImageNet backbone weights as published: a plain torchvision ResNet
    state dict, or an official Swin checkpoint; their names are mapped to the detector's
    ``backbone.*``.
    """

    def _load_file(self, filename: str) -> Dict[str, Any]:
        loaded = super()._load_file(filename)
        weights = loaded["model"]
        if is_torchvision_resnet_state_dict(weights):
            self.logger.info(f"{filename}: torchvision ResNet weights, mapped to backbone.*")
            return {"model": convert_torchvision_resnet(weights)}
        if is_official_swin_state_dict(weights):
            self.logger.info(f"{filename}: official Swin weights, mapped to backbone.*")
            return {"model": convert_official_swin(weights)}
        return loaded

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
