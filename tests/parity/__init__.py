"""
Shared by the parity and checkpoint tests: the stored outputs of the authors' implementation
(``shared/reference/official_parity``) and the tiny Co-DINO model they were computed with.
"""

import os
from typing import Dict, List

import torch
from detectron2.config import LazyConfig
from omegaconf import DictConfig

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parity_dir() -> str:
    """``shared/reference/official_parity`` inside the checkout, else beside it."""
    candidates = [
        os.path.join(root, "shared", "reference", "official_parity")
        for root in (REPO_ROOT, os.path.dirname(REPO_ROOT))
    ]
    return next((path for path in candidates if os.path.isdir(path)), candidates[-1])


PARITY_DIR = _parity_dir()
TINY_CO_DINO_CONFIG = os.path.join(REPO_ROOT, "configs", "parity", "tiny_co_dino_r50.py")
TINY_CO_DINO_CHECKPOINT = os.path.join(
    PARITY_DIR, "tiny_co_dino_5scale_r50_1x_coco_official_layout.pth"
)
TINY_CO_DINO_OUTPUTS = os.path.join(
    PARITY_DIR, "tiny_co_dino_5scale_r50_1x_coco_official_outputs.pt"
)


def tiny_co_dino_config(with_aux_heads: bool) -> DictConfig:
    """
    The model config of the tiny Co-DINO; without ``with_aux_heads``, the DINO-only ablation
    (no auxiliary heads, no positive queries).
    """
    model = LazyConfig.load(TINY_CO_DINO_CONFIG).model
    if not with_aux_heads:
        model.aux_heads = []
        model.positive_queries = None
    return model


def load_reference_outputs() -> Dict:
    """The authors' outputs (see the README beside the file)."""
    return torch.load(TINY_CO_DINO_OUTPUTS, weights_only=False)


def reference_inputs(outputs: Dict) -> List[Dict[str, torch.Tensor]]:
    """The stored BGR uint8 (H, W, 3) images as our model's inputs: RGB (3, H, W) float."""
    return [{"image": image.flip(-1).permute(2, 0, 1).float()} for image in outputs["images_bgr"]]


def edited_state_dict(
    state_dict: Dict[str, torch.Tensor], renamed: Dict[str, str], dropped: List[str]
) -> Dict[str, torch.Tensor]:
    """``state_dict`` without the keys under ``dropped``, then with ``renamed`` prefixes: the
    authors' checkpoint as their model of a training-parity set-up loads it
    (``tools/training_parity_official.py``, which imports this from here)."""
    kept = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in dropped)}
    edited = {}
    for key, value in kept.items():
        for old, new in renamed.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        edited[key] = value
    return edited
