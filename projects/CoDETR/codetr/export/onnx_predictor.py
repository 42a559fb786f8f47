"""
ONNX Runtime inference of an exported Co-DETR model (``tools/deploy/export_model.py``), with
detectron2's conventions: :class:`OnnxDetector` takes and returns what a detectron2 model does
at inference (so ``inference_on_dataset`` and the evaluators take it as the model), and
:class:`OnnxPredictor` runs one image as :class:`codetr.engine.LazyPredictor` does (so the
demo's drawing with detectron2's ``Visualizer`` takes its output).

Needs ``onnxruntime`` (the ``deploy`` extra).
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.modeling import detector_postprocess
from detectron2.structures import Boxes, Instances
from omegaconf import DictConfig
from torch import Tensor

from codetr.engine.predictor import prepare_image, test_augmentations

from .deployable import INPUT_NAMES, OUTPUT_NAMES, batch_images

__all__ = ["OnnxDetector", "OnnxPredictor", "read_metadata"]

logger = logging.getLogger(__name__)

_ONNX_TYPES = {"tensor(uint8)": torch.uint8, "tensor(float)": torch.float32}


def read_metadata(session: Any) -> Dict[str, str]:
    """The ``codetr.*`` metadata that ``export_onnx`` stores in the model (keys without the
    prefix): ``input_format``, ``num_classes``, ``max_detections``, ..."""
    entries = session.get_modelmeta().custom_metadata_map
    return {k[len("codetr.") :]: v for k, v in entries.items() if k.startswith("codetr.")}


class OnnxDetector:
    """
    An exported model run by ONNX Runtime, called as a detectron2 model at inference:
    ``detector(batched_inputs) -> [{"instances": Instances}]``.

    Args:
        model: path of the ``.onnx`` file, or an ``onnxruntime.InferenceSession`` of it.
        providers: ONNX Runtime execution providers (default: CPU).
        num_threads: intra-op threads of a session created here (default: ONNX Runtime's).
    """

    def __init__(
        self,
        model: Union[str, Any],
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        num_threads: Optional[int] = None,
    ):
        import onnxruntime as ort

        if isinstance(model, str):
            options = ort.SessionOptions()
            if num_threads is not None:
                options.intra_op_num_threads = num_threads
            model = ort.InferenceSession(model, options, providers=list(providers))
        self.session = model
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = [o.name for o in self.session.get_outputs()]
        if set(inputs) != set(INPUT_NAMES) or outputs != list(OUTPUT_NAMES):
            raise ValueError(
                f"Not a model of tools/deploy/export_model.py: inputs {sorted(inputs)}, outputs "
                f"{outputs}; expected inputs {list(INPUT_NAMES)}, outputs {list(OUTPUT_NAMES)}"
            )
        image_type = inputs["images"].type
        if image_type not in _ONNX_TYPES:
            raise ValueError(f"The model's images are {image_type}, expected uint8 or float")
        self.image_dtype = _ONNX_TYPES[image_type]
        self.metadata = read_metadata(self.session)
        self.input_format = self.metadata.get("input_format", "RGB")

    def run(self, images: Tensor, image_sizes: Tensor) -> Tuple[np.ndarray, ...]:
        """
        Runs the graph on a padded batch (see :class:`~codetr.export.DeployableDetector`).

        Returns:
            boxes (B, D, 4), scores (B, D), classes (B, D), num_detections (B,) as arrays.
        """
        feeds = {
            "images": images.to(self.image_dtype).numpy(),
            "image_sizes": image_sizes.to(torch.int64).numpy(),
        }
        return tuple(self.session.run(list(OUTPUT_NAMES), feeds))

    def inference(self, images: Sequence[Tensor]) -> List[Instances]:
        """
        Detections of (3, h, w) images in the model's input format, 0-255: per image
        Instances of its (h, w) with ``pred_boxes`` (XYXY, input pixels), ``scores``,
        ``pred_classes``, sorted by decreasing score (``model.inference(...,
        do_postprocess=False)``).
        """
        batch, sizes = batch_images(
            [torch.as_tensor(image).to(self.image_dtype) for image in images]
        )
        boxes, scores, classes, counts = self.run(batch, sizes)
        results = []
        for index, (height, width) in enumerate(sizes.tolist()):
            count = int(counts[index])
            result = Instances((height, width))
            result.pred_boxes = Boxes(torch.from_numpy(boxes[index, :count].copy()))
            result.scores = torch.from_numpy(scores[index, :count].copy())
            result.pred_classes = torch.from_numpy(classes[index, :count].copy())
            results.append(result)
        return results

    def __call__(self, batched_inputs: List[Dict[str, Any]]) -> List[Dict[str, Instances]]:
        """
        Args:
            batched_inputs: dataset-mapper dicts with "image" (3, h, w) in the model's input
                format and optionally the output "height" / "width".

        Returns:
            per image {"instances": Instances} rescaled to "height" x "width" (default: the
            image size), as a detectron2 model's inference.
        """
        results = self.inference([x["image"] for x in batched_inputs])
        return [
            {
                "instances": detector_postprocess(
                    r, x.get("height", r.image_size[0]), x.get("width", r.image_size[1])
                )
            }
            for r, x in zip(results, batched_inputs)
        ]


class OnnxPredictor:
    """
    One image through an exported model, as :class:`codetr.engine.LazyPredictor` runs the
    PyTorch model: read as BGR, converted to the model's input format, transformed by the test
    augmentations, run, and the detections returned in the original image's coordinates (for
    augmentations that pad, LSJ, the padded canvas at the original scale, as LazyPredictor).

    Build it from parts, ``OnnxPredictor(detector, augmentations)``, or from a config,
    ``OnnxPredictor.from_config(cfg, "model.onnx")``: the augmentations of
    ``cfg.dataloader.test.mapper``.
    """

    def __init__(self, detector: Union[str, OnnxDetector], augmentations: Sequence[T.Augmentation]):
        self.detector = detector if isinstance(detector, OnnxDetector) else OnnxDetector(detector)
        self.augmentations = T.AugmentationList(list(augmentations))
        self.input_format = self.detector.input_format
        if self.input_format not in ("RGB", "BGR"):
            raise ValueError(
                f"The model's input format must be RGB or BGR, got {self.input_format}"
            )

    @classmethod
    def from_config(cls, cfg: DictConfig, model: Union[str, OnnxDetector], **kwargs):
        """``kwargs`` go to :class:`OnnxDetector` when ``model`` is a path."""
        detector = model if isinstance(model, OnnxDetector) else OnnxDetector(model, **kwargs)
        return cls(detector, test_augmentations(cfg))

    def __call__(self, image: Union[str, np.ndarray]) -> Instances:
        """
        Args:
            image: an image file path, or an (H, W, 3) uint8 array in BGR order.

        Returns:
            the detections (``pred_boxes`` absolute XYXY in the original image, ``scores``,
            ``pred_classes``) on the CPU.
        """
        inputs = prepare_image(
            image, input_format=self.input_format, augmentations=self.augmentations
        )
        return self.detector([inputs])[0]["instances"]
