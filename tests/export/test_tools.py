"""
The deployment tools on the toy DINO config (random weights saved as a checkpoint):
``tools/deploy/export_model.py`` in both formats, ``tools/deploy/evaluate_onnx.py`` giving
``train_net.py --eval-only``'s results, and :class:`OnnxPredictor` giving
:class:`LazyPredictor`'s detections, which detectron2's Visualizer draws.
"""

import importlib.util
import os
from unittest import mock

import numpy as np
import onnxruntime  # noqa: F401  (the deploy extra: fail, not skip, without it)
import pytest
import torch
from codetr_toy import ensure_toy_dataset
from detectron2.config import instantiate
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.evaluation import inference_on_dataset
from detectron2.utils.visualizer import Visualizer

from codetr.engine import LazyPredictor, load_lazy_config
from codetr.export.onnx_predictor import OnnxDetector, OnnxPredictor

from ..parity import REPO_ROOT

TOY_CONFIG = os.path.join(REPO_ROOT, "configs", "toy", "dino_toy.py")
_TWO_TEST_IMAGES = (
    "+dataloader.test.sampler={_target_: detectron2.data.samplers.InferenceSampler, size: 2}"
)


def _load_tool(name: str):
    path = os.path.join(REPO_ROOT, "tools", "deploy", name + ".py")
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """(config overrides with the checkpoint, the exported ONNX path, a toy test image)."""
    directory = tmp_path_factory.mktemp("toy")
    cfg = load_lazy_config(TOY_CONFIG)
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    checkpoint = str(directory / "model.pth")
    torch.save({"model": model.state_dict()}, checkpoint)
    overrides = [f"train.init_checkpoint={checkpoint}"]
    ensure_toy_dataset("codetr_toy_val")
    image = os.path.join(MetadataCatalog.get("codetr_toy_val").image_root, "000000.jpg")
    export_model = _load_tool("export_model")
    args = ["--config-file", TOY_CONFIG, "--output", str(directory), "--sample-image", image]
    path = export_model.main([*args, "--format", "onnx", *overrides])
    assert path == str(directory / "model.onnx")
    return overrides, path, image


def test_export_model_writes_both_formats_and_checks_them(toy, tmp_path):
    overrides, onnx_path, image = toy
    session = OnnxDetector(onnx_path).session
    assert session.get_inputs()[0].type == "tensor(uint8)"
    export_model = _load_tool("export_model")
    # the check after the export compares the traced model with PyTorch on the sample
    with mock.patch.object(export_model, "compare_with_pytorch") as compare:
        path = export_model.main(
            ["--config-file", TOY_CONFIG, "--output", str(tmp_path), "--format", "torchscript"]
            + ["--sample-image", image, "--input-dtype", "float32", *overrides]
        )
    compare.assert_called_once()
    model, outputs, sample = compare.call_args[0]
    report = export_model.compare_with_pytorch(model, outputs, sample)
    assert report["equal_prefix"] == report["found"] == report["num_expected"] == 100
    assert report["scores_rel"] < 1e-4
    assert path == str(tmp_path / "model.ts")
    assert isinstance(torch.jit.load(path), torch.jit.ScriptModule)
    assert outputs[0].shape == (1, 100, 4) and sample.shape == (3, 160, 160)
    with pytest.raises(ValueError, match="opset"):
        export_model.main(
            ["--config-file", TOY_CONFIG, "--output", str(tmp_path), "--opset", "15", *overrides]
        )


def test_evaluate_onnx_gives_the_pytorch_model_s_results(toy):
    overrides, onnx_path, _ = toy
    evaluate_onnx = _load_tool("evaluate_onnx")
    results = evaluate_onnx.main(
        ["--config-file", TOY_CONFIG, "--onnx", onnx_path, _TWO_TEST_IMAGES, *overrides]
    )
    cfg = load_lazy_config(TOY_CONFIG, [_TWO_TEST_IMAGES, *overrides])
    predictor = LazyPredictor(cfg)  # the model with the checkpoint's weights
    expected = inference_on_dataset(
        predictor.model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    assert set(results["bbox"]) == set(expected["bbox"])
    for key, value in expected["bbox"].items():
        if np.isnan(value):
            assert np.isnan(results["bbox"][key]), key
        else:
            assert results["bbox"][key] == pytest.approx(value, abs=1e-6), key


def test_onnx_predictor_gives_lazy_predictor_s_detections_and_draws(toy):
    overrides, onnx_path, image_path = toy
    cfg = load_lazy_config(TOY_CONFIG, overrides)
    predictor = OnnxPredictor.from_config(cfg, onnx_path)
    assert predictor.input_format == "RGB"
    image = read_image(image_path, format="BGR")
    # a larger image: the test augmentation resizes it (160 short side), the boxes come back
    image = np.ascontiguousarray(np.kron(image, np.ones((2, 2, 1), np.uint8))[:, :300])
    instances = predictor(image)
    expected = LazyPredictor(cfg)(image)
    assert instances.image_size == expected.image_size == (320, 300)
    assert torch.equal(instances.pred_classes, expected.pred_classes)
    torch.testing.assert_close(
        instances.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-4 * 320
    )
    torch.testing.assert_close(instances.scores, expected.scores, rtol=1e-4, atol=0)
    metadata = MetadataCatalog.get("codetr_toy_val")
    drawn = Visualizer(image[:, :, ::-1], metadata).draw_instance_predictions(instances[:5])
    assert drawn.get_image().shape == (320, 300, 3)


def test_onnx_detector_refuses_other_models(tmp_path):
    path = str(tmp_path / "linear.onnx")
    torch.onnx.export(torch.nn.Linear(2, 2), (torch.zeros(1, 2),), path, dynamo=False)
    with pytest.raises(ValueError, match="export_model"):
        OnnxDetector(path)
