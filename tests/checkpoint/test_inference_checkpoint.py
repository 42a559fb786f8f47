"""The inference checkpoint of a Co-DINO model: no auxiliary branch, same outputs, same FLOPs
as the base DINO."""
import os
import subprocess
import sys

import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.utils.analysis import FlopCountAnalysis

from codetr.checkpoint import inference_state_dict, is_training_only

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "parity", "tiny_co_dino_r50.py")


def _models():
    cfg = LazyConfig.load(CONFIG)
    torch.manual_seed(0)
    co_dino = instantiate(cfg.model).eval()
    cfg.model.aux_heads = []
    cfg.model.positive_queries = None
    base = instantiate(cfg.model).eval()
    return co_dino, base


def _inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randint(0, 256, (3, 72, 96), dtype=torch.uint8, generator=generator)},
        {"image": torch.randint(0, 256, (3, 80, 64), dtype=torch.uint8, generator=generator)},
    ]


def test_training_only_keys():
    co_dino, base = _models()
    auxiliary = [k for k in co_dino.state_dict() if is_training_only(k)]
    assert auxiliary and all(not is_training_only(k) for k in base.state_dict())
    assert set(inference_state_dict(co_dino.state_dict())) == set(base.state_dict())


def test_exported_checkpoint_loads_strictly_and_gives_identical_outputs(tmp_path):
    co_dino, base = _models()
    training_checkpoint = tmp_path / "model_final.pth"
    torch.save({"model": co_dino.state_dict(), "iteration": 7}, training_checkpoint)
    exported = tmp_path / "inference.pth"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_inference_checkpoint.py"),
         str(training_checkpoint), str(exported)],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    base.load_state_dict(torch.load(exported, weights_only=True)["model"], strict=True)
    with torch.no_grad():
        expected = co_dino(_inputs())
        actual = base(_inputs())
    for e, a in zip(expected, actual):
        e, a = e["instances"], a["instances"]
        assert len(e) > 0
        assert torch.equal(e.pred_boxes.tensor, a.pred_boxes.tensor)
        assert torch.equal(e.scores, a.scores)
        assert torch.equal(e.pred_classes, a.pred_classes)


def test_export_rejects_a_foreign_file(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "export_inference_checkpoint.py"),
         str(bad), str(tmp_path / "out.pth")],
        capture_output=True, text=True,
    )
    assert result.returncode == 1
    assert "bad.pth" in result.stderr
    assert not (tmp_path / "out.pth").exists()


def test_auxiliary_branch_adds_no_inference_flops():
    co_dino, base = _models()
    inputs = [{"image": torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)}]
    totals = []
    for model in (co_dino, base):
        flops = FlopCountAnalysis(model, inputs)
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        totals.append(flops.total())
    assert totals[0] == totals[1] > 0
