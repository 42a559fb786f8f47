"""
Every experiment config under ``configs/`` (``configs/common`` and ``configs/models`` are parts
that the others import): it loads, survives ``LazyConfig.save`` to yaml and back, and its model
builds at full size. Models are built on the meta device: shapes only, no memory and no
initialisation cost, so even Swin-L builds in a fraction of a second.
"""

import math
from pathlib import Path
from typing import Dict, NamedTuple, Tuple
from unittest import mock

import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from torch import nn

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "configs"
# imported by the experiment configs, not run on their own
_PARTS = ("common", "models")
CONFIG_FILES = sorted(
    path.relative_to(CONFIG_ROOT).as_posix()
    for path in CONFIG_ROOT.rglob("*.py")
    if path.relative_to(CONFIG_ROOT).parts[0] not in _PARTS
)
# the parity configs hold a model only
TRAINING_CONFIG_FILES = [name for name in CONFIG_FILES if not name.startswith("parity/")]
# parameters of the training-only branch (auxiliary heads, positive queries)
TRAINING_ONLY_PREFIXES = ("aux_heads.", "aux_extra_level.", "positive_queries.")
COCO_ITERS_PER_EPOCH = 7393
LVIS_ITERS_PER_EPOCH = 6261  # ceil(100170 LVIS v1 train images / 16)

_linspace = torch.linspace


def _cpu_linspace(*args, **kwargs) -> torch.Tensor:
    kwargs.setdefault("device", "cpu")
    return _linspace(*args, **kwargs)


def build_on_meta(model_cfg) -> nn.Module:
    """
    ``instantiate(model_cfg)`` under ``torch.device("meta")``. detectron2's
    ``SwinTransformer`` reads its drop-path rates back as Python numbers
    (``x.item() for x in torch.linspace(...)``), which a meta tensor cannot give: that
    ``linspace`` alone is computed on the CPU; every module is still built on the meta device.
    """
    with mock.patch.object(torch, "linspace", _cpu_linspace), torch.device("meta"):
        return instantiate(model_cfg)


def inference_parameter_count(model: nn.Module) -> int:
    return sum(
        p.numel()
        for name, p in model.named_parameters()
        if not name.startswith(TRAINING_ONLY_PREFIXES)
    )


def _parameter_shapes(model: nn.Module) -> Dict[str, Tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _load(name: str):
    return LazyConfig.load(str(CONFIG_ROOT / name))


def test_every_experiment_directory_is_collected():
    assert {name.split("/")[0] for name in CONFIG_FILES} == {
        "co_deformable_detr",
        "co_dino",
        "co_dino_vit",
        "deformable_detr",
        "dino",
        "parity",
        "toy",
    }


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_round_trips_and_builds(name, tmp_path):
    cfg = _load(name)
    saved = tmp_path / "config.yaml"
    LazyConfig.save(cfg, str(saved))
    assert not Path(f"{saved}.pkl").exists()  # LazyConfig.save pickles what yaml cannot hold
    reloaded = LazyConfig.load(str(saved))
    assert set(reloaded) == set(cfg)
    saved_again = tmp_path / "config_again.yaml"
    LazyConfig.save(reloaded, str(saved_again))
    assert saved_again.read_text() == saved.read_text()

    model = build_on_meta(cfg.model)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert inference_parameter_count(model) > 0
    assert _parameter_shapes(build_on_meta(reloaded.model)) == _parameter_shapes(model)


@pytest.mark.parametrize("name", TRAINING_CONFIG_FILES)
def test_schedule_spans_training(name):
    """The lr schedule is read at iteration / max_iter: its own length must be max_iter."""
    cfg = _load(name)
    scheduler = cfg.lr_multiplier
    while "scheduler" in scheduler:  # WarmupParamScheduler around a step schedule
        scheduler = scheduler.scheduler
    assert scheduler.num_updates == cfg.train.max_iter


class SwinRecipe(NamedTuple):
    """What the authors' Swin config sets, per experiment."""

    size: str
    window: int
    drop_path: float
    epochs: int
    lr_step_epoch: int
    queries: int
    max_per_img: int  # detections kept at test time
    weight_decay: float
    lsj_size: int = 0  # 0: DETR augmentation
    iters_per_epoch: int = COCO_ITERS_PER_EPOCH


_CO_DEFORMABLE = "co_deformable_detr/co_deformable_detr_swin_"
_CO_DINO = "co_dino/co_dino_5scale_"
SWIN_RECIPES = {
    f"{_CO_DEFORMABLE}tiny_1x_coco.py": SwinRecipe("T", 7, 0.2, 12, 11, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}tiny_3x_coco.py": SwinRecipe("T", 7, 0.3, 36, 30, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}small_1x_coco.py": SwinRecipe("S", 7, 0.2, 12, 11, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}small_3x_coco.py": SwinRecipe("S", 7, 0.4, 36, 30, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}base_1x_coco.py": SwinRecipe("B", 12, 0.2, 12, 11, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}base_3x_coco.py": SwinRecipe("B", 12, 0.4, 36, 30, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}large_1x_coco.py": SwinRecipe("L", 12, 0.3, 12, 11, 300, 100, 0.05),
    f"{_CO_DEFORMABLE}large_900q_3x_coco.py": SwinRecipe("L", 12, 0.6, 36, 30, 900, 300, 0.05),
    f"{_CO_DINO}swin_large_1x_coco.py": SwinRecipe("L", 12, 0.3, 12, 11, 900, 300, 1e-4),
    f"{_CO_DINO}swin_large_2x_coco.py": SwinRecipe("L", 12, 0.5, 24, 20, 900, 300, 1e-4),
    f"{_CO_DINO}swin_large_3x_coco.py": SwinRecipe("L", 12, 0.6, 36, 30, 900, 300, 1e-4),
    f"{_CO_DINO}lsj_swin_large_1x_coco.py": SwinRecipe("L", 12, 0.3, 12, 11, 900, 300, 1e-4, 1280),
    f"{_CO_DINO}lsj_swin_large_2x_coco.py": SwinRecipe("L", 12, 0.5, 24, 20, 900, 300, 1e-4, 1280),
    # the authors' LSJ 3x keeps the 2x drop path
    f"{_CO_DINO}lsj_swin_large_3x_coco.py": SwinRecipe("L", 12, 0.5, 36, 30, 900, 300, 1e-4, 1280),
    # LVIS: 12 epochs despite the name, as the authors' file
    f"{_CO_DINO}lsj_swin_large_3x_lvis.py": SwinRecipe(
        "L", 12, 0.3, 12, 11, 900, 300, 1e-4, 1280, LVIS_ITERS_PER_EPOCH
    ),
}


def test_every_swin_config_has_a_recipe():
    # the Objects365 configs: test_objects365_configs_follow_the_authors
    swin = sorted(name for name in CONFIG_FILES if "swin" in name and "o365" not in name)
    assert swin == sorted(SWIN_RECIPES)


@pytest.mark.parametrize("name", sorted(SWIN_RECIPES))
def test_swin_config_follows_the_authors(name):
    recipe = SWIN_RECIPES[name]
    cfg = _load(name)
    co_dino = name.startswith(_CO_DINO)
    backbone = cfg.model.backbone
    assert (backbone.size, backbone.window_size) == (recipe.size, recipe.window)
    assert backbone.drop_path_rate == pytest.approx(recipe.drop_path)
    assert not backbone.use_checkpoint
    # Co-DINO: all 4 stages (strides 4..32); Co-Deformable-DETR: the last 3 (8..32); + 1 extra
    stages = ["p0", "p1", "p2", "p3"] if co_dino else ["p1", "p2", "p3"]
    assert list(backbone.out_features) == stages
    assert cfg.model.neck.num_extra_levels == 1
    head = cfg.model.query_head
    assert head.encoder.num_levels == head.decoder.num_levels == len(stages) + 1
    assert head.num_queries == recipe.queries
    # test output: top-k over query x class (Co-DINO: all 900, then soft-NMS)
    assert head.num_candidates == (900 if co_dino else recipe.max_per_img)
    assert head.max_detections == recipe.max_per_img
    if co_dino:
        assert head.encoder.num_checkpointed_layers == 6

    assert cfg.train.max_iter == recipe.epochs * recipe.iters_per_epoch
    assert list(cfg.lr_multiplier.milestones) == [recipe.lr_step_epoch * recipe.iters_per_epoch]
    assert cfg.optimizer.lr == 2e-4
    assert math.isclose(cfg.optimizer.weight_decay, recipe.weight_decay)
    lr_factor = cfg.optimizer.params.lr_factor_func
    assert lr_factor("backbone.layers.2.blocks.0.attn.qkv.weight") == 0.1
    assert lr_factor("query_head.encoder.layers.0.self_attn.sampling_offsets.weight") == (
        1.0 if co_dino else 0.1
    )

    train_augmentation = cfg.dataloader.train.mapper.augmentation
    test_augmentation = cfg.dataloader.test.mapper.augmentation
    if recipe.lsj_size:
        assert train_augmentation.image_size == test_augmentation.image_size == recipe.lsj_size
        assert cfg.dataloader.train.mapper.augmentation_with_crop is None
    else:
        assert cfg.dataloader.train.mapper.augmentation_with_crop is not None
        assert (test_augmentation.min_size, test_augmentation.max_size) == (800, 1333)
    output_dir = "./output/" + Path(name).stem
    assert cfg.train.output_dir == cfg.dataloader.evaluator.output_dir == output_dir


def test_vit_large_coco_config_follows_the_authors():
    cfg = _load("co_dino_vit/co_dino_5scale_vit_large_coco.py")
    backbone, head = cfg.model.backbone, cfg.model.query_head
    assert (backbone.size, backbone.window_size, backbone.drop_path_rate) == ("L", 24, 0.4)
    assert list(backbone.global_block_indexes) == [3, 7, 11, 15, 19, 23]
    assert backbone.use_act_checkpoint and cfg.model.size_divisibility == 32
    assert (head.num_queries, head.num_candidates, head.max_detections) == (1500, 1500, 1000)
    assert (head.denoising.num_dn_queries, head.denoising.box_noise_scale) == (300, 0.4)
    rcnn = cfg.model.aux_heads[0]
    assert (rcnn.num_box_head_convs, rcnn.num_box_head_fcs, rcnn.box_head_norm) == (4, 1, "GN")
    assert rcnn.cls_agnostic_bbox_reg and list(rcnn.box_reg_weights) == [20.0, 20.0, 10.0, 10.0]
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (5e-5, 0.01)
    factor = cfg.optimizer.params.lr_factor_func
    assert factor("backbone.pos_embed") == pytest.approx(0.8**25)
    assert factor("backbone.blocks.23.mlp.up_proj.weight") == pytest.approx(0.8)
    assert factor("neck.branches.p2.1.weight") == factor("query_head.query_embed.weight") == 1.0
    assert dict(cfg.train.model_ema) == dict(enabled=True, decay=0.9999, warmup_iters=2000)
    assert cfg.train.max_iter == 12 * COCO_ITERS_PER_EPOCH
    step = cfg.lr_multiplier.scheduler
    assert list(step.milestones) == [7 * COCO_ITERS_PER_EPOCH]
    assert cfg.lr_multiplier.warmup_factor == 0.01
    assert cfg.lr_multiplier.warmup_length * cfg.train.max_iter == pytest.approx(500)
    augmentation = cfg.dataloader.train.mapper.augmentation
    assert list(augmentation.min_sizes) == list(range(480, 1537, 32))
    assert augmentation.max_size == cfg.dataloader.train.mapper.augmentation_with_crop.max_size
    assert augmentation.max_size == 2400
    test = cfg.dataloader.test.mapper.augmentation
    assert (test.min_size, test.max_size) == (1280, 2048)


def test_vit_large_lvis_config_follows_the_authors():
    cfg = _load("co_dino_vit/co_dino_5scale_lsj_vit_large_lvis.py")
    backbone, head = cfg.model.backbone, cfg.model.query_head
    assert (backbone.window_size, backbone.drop_path_rate) == (16, 0.3)
    assert list(backbone.global_block_indexes) == [2, 5, 8, 11, 14, 17, 20, 23]
    assert (head.num_classes, head.num_queries, head.max_detections) == (1203, 900, 1000)
    rcnn = cfg.model.aux_heads[0]
    assert (rcnn.num_box_head_convs, rcnn.num_box_head_fcs, rcnn.cls_agnostic_bbox_reg) == (
        0,
        2,
        False,
    )
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (5e-5, 0.05)
    assert cfg.optimizer.params.lr_factor_func("backbone.blocks.0.attn.q_proj.weight") == 0.1
    assert not cfg.train.model_ema.enabled
    lvis_epoch = 6261
    assert cfg.train.max_iter == 16 * lvis_epoch
    assert list(cfg.lr_multiplier.scheduler.milestones) == [9 * lvis_epoch, 15 * lvis_epoch]
    assert list(cfg.lr_multiplier.scheduler["values"]) == pytest.approx([1.0, 0.1, 0.01])
    augmentation = cfg.dataloader.train.mapper.augmentation
    assert augmentation.image_size == cfg.dataloader.test.mapper.augmentation.image_size == 1536
    assert cfg.dataloader.train.sampler.repeat_factors.repeat_thresh == 0.001


@pytest.mark.parametrize(
    "name, max_detections, iters_per_epoch",
    [
        ("co_dino/co_dino_5scale_swin_large_16e_o365tococo.py", 300, COCO_ITERS_PER_EPOCH),
        ("co_dino/co_dino_5scale_lsj_swin_large_16e_o365tolvis.py", 1000, LVIS_ITERS_PER_EPOCH),
    ],
)
def test_objects365_fine_tuning_configs_follow_the_authors(name, max_detections, iters_per_epoch):
    cfg = _load(name)
    backbone, head = cfg.model.backbone, cfg.model.query_head
    assert (backbone.size, backbone.window_size, backbone.drop_path_rate) == ("L", 12, 0.3)
    assert (head.denoising.num_dn_queries, head.denoising.box_noise_scale) == (500, 0.4)
    assert head.encoder.num_checkpointed_layers == 6 and head.max_detections == max_detections
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay) == (1e-4, 1e-4)
    assert cfg.optimizer.params.lr_factor_func("backbone.layers.0.blocks.0.mlp.fc1.weight") == 0.1
    assert cfg.train.max_iter == 16 * iters_per_epoch
    assert list(cfg.lr_multiplier.milestones) == [8 * iters_per_epoch]
    test = cfg.dataloader.test.mapper.augmentation
    if "lvis" in name:
        assert test.image_size == cfg.dataloader.train.mapper.augmentation.image_size == 1536
        assert cfg.dataloader.train.dataset.names == "lvis_v1_train"
    else:
        assert backbone.use_checkpoint and cfg.model.size_divisibility == 32
        assert list(cfg.dataloader.train.mapper.augmentation.min_sizes) == list(
            range(480, 1537, 32)
        )
        assert (test.min_size, test.max_size) == (1280, 2048)


@pytest.mark.parametrize(
    "name",
    ["co_dino/co_dino_5scale_swin_large_o365.py", "co_dino_vit/co_dino_5scale_vit_large_o365.py"],
)
def test_objects365_pre_training_config(name):
    cfg = _load(name)
    assert cfg.model.query_head.num_classes == 365
    assert cfg.train.max_iter == 22 * (-(-1742292 // 16))
    assert cfg.dataloader.train.dataset.names == "objects365_v2_train"
    assert cfg.dataloader.test.dataset.names == "objects365_v2_val"


def test_mask_config_follows_the_authors():
    """The authors' mask config is their R50 config with a mask head on the RoI head and masks
    in the training data; the test output stays the query head's."""
    cfg = _load("co_deformable_detr/co_deformable_detr_mask_r50_1x_coco.py")
    base = _load("co_deformable_detr/co_deformable_detr_r50_1x_coco.py")
    rcnn = cfg.model.aux_heads[0]
    assert rcnn.mask_on and "mask_loss_weight" not in rcnn  # 1 x lambda_2 x 6 decoder layers
    assert cfg.dataloader.train.mapper.use_instance_mask
    assert "use_instance_mask" not in cfg.dataloader.test.mapper
    assert cfg.dataloader.evaluator.tasks is None  # bbox, and segm when the output has masks
    assert cfg.model.eval_module == base.model.eval_module == "detr"
    assert cfg.train.output_dir == cfg.dataloader.evaluator.output_dir
    assert cfg.train.output_dir == "./output/co_deformable_detr_mask_r50_1x_coco"
    # nothing else differs
    del rcnn["mask_on"], cfg.dataloader.train.mapper["use_instance_mask"]
    del cfg.dataloader.evaluator["tasks"]
    cfg.train.output_dir = base.train.output_dir
    assert LazyConfig.to_py(cfg) == LazyConfig.to_py(base)


@pytest.mark.parametrize(
    "name, base, mask_loss_weight",
    [
        (
            "co_dino/co_dino_5scale_r50_1x_coco_instance.py",
            "co_dino/co_dino_5scale_r50_1x_coco.py",
            1.33,
        ),
        (
            "co_dino_vit/co_dino_5scale_vit_large_coco_instance.py",
            "co_dino_vit/co_dino_5scale_vit_large_coco.py",
            1.33,
        ),
        (
            "co_dino_vit/co_dino_5scale_lsj_vit_large_lvis_instance.py",
            "co_dino_vit/co_dino_5scale_lsj_vit_large_lvis.py",
            1.0,
        ),
    ],
)
def test_instance_configs_add_the_mask_branch_and_masks_only(name, base, mask_loss_weight):
    """Co-DINO-Inst configs: their box config with the query head's mask branch (the authors'
    mask loss weight; everything else the builder's defaults), masks in the training data and
    an evaluator that reads its tasks from the predictions; LVIS also copy-pastes (bitmasks)."""
    cfg, base_cfg = _load(name), _load(base)
    assert "mask_branch" not in base_cfg.model
    branch = cfg.model.pop("mask_branch")
    assert branch._partial_target_.endswith("mask_heads.query_mask_branch.build_query_mask_branch")
    assert {k for k in branch if k != "_target_"} == {"_partial_target_", "mask_loss_weight"}
    assert branch.mask_loss_weight == mask_loss_weight
    assert cfg.model.eval_module == "detr"
    mapper = cfg.dataloader.train.mapper
    if "lvis" in name:
        assert cfg.dataloader.train.dataset.pop("require_masks") is True  # from the mapper
        assert mapper.pop("instance_mask_format") == "bitmask"
        assert mapper.pop("copy_paste").max_num_pasted == 100
    assert mapper.pop("use_instance_mask") is True
    assert "use_instance_mask" not in cfg.dataloader.test.mapper
    assert cfg.dataloader.evaluator.pop("tasks") is None
    assert cfg.train.output_dir == "./output/" + name.split("/")[1][: -len(".py")]
    assert cfg.dataloader.evaluator.output_dir == cfg.train.output_dir
    cfg.train.output_dir = base_cfg.train.output_dir
    assert LazyConfig.to_py(cfg) == LazyConfig.to_py(base_cfg)


# the authors' models built by their code: `python tools/parameter_counts_official.py` (total,
# inference without the auxiliary heads, positive-query projections and extra level)
AUTHORS_PARAMETER_COUNTS = {
    "co_dino_vit/co_dino_5scale_vit_large_coco.py": (365367657, 347240588),
    "co_dino_vit/co_dino_5scale_lsj_vit_large_lvis.py": (374877868, 349394753),
    # the authors published no config: theirs is their COCO ViT-L config with 365 classes
    "co_dino_vit/co_dino_5scale_vit_large_o365.py": (366902382, 347826263),
    "co_dino/co_dino_5scale_lsj_swin_large_3x_lvis.py": (246123424, 220640309),
    "co_dino/co_dino_5scale_swin_large_16e_o365tococo.py": (235471769, 218332544),
    "co_dino/co_dino_5scale_lsj_swin_large_16e_o365tolvis.py": (246123424, 220640309),
    "co_dino/co_dino_5scale_r50_1x_lvis.py": (75855660, 50372545),
    "co_dino/co_dino_5scale_lsj_r50_1x_lvis.py": (75855660, 50372545),
    "co_deformable_detr/co_deformable_detr_r50_1x_coco.py": (65129894, 47594380),
    # + the mask head of the Faster R-CNN auxiliary head (2,643,280)
    "co_deformable_detr/co_deformable_detr_mask_r50_1x_coco.py": (67773174, 47594380),
    # + the query head's mask branch (COCO 18,659,262; LVIS 20,316,810), used at inference too
    "co_dino_vit/co_dino_5scale_vit_large_coco_instance.py": (384026919, 365899850),
    "co_dino_vit/co_dino_5scale_lsj_vit_large_lvis_instance.py": (395194678, 369711563),
    # the authors published no config: theirs is their R50 config with the mask parts of their
    # ViT-L COCO instance config
    "co_dino/co_dino_5scale_r50_1x_coco_instance.py": (83863267, 66724042),
}
# their frozen BatchNorm keeps its affine values as parameters, detectron2's FrozenBatchNorm2d as
# buffers: 2 x 26560 channels in a ResNet-50
R50_FROZEN_BN_AFFINE = 53120


@pytest.mark.parametrize("name", sorted(AUTHORS_PARAMETER_COUNTS))
def test_parameter_counts_equal_the_authors_models(name):
    model = build_on_meta(_load(name).model)
    frozen_bn = R50_FROZEN_BN_AFFINE if "r50" in name else 0
    total, inference = AUTHORS_PARAMETER_COUNTS[name]
    assert sum(p.numel() for p in model.parameters()) + frozen_bn == total
    assert inference_parameter_count(model) + frozen_bn == inference
