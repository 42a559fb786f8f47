"""
Instance masks through ``DetrDatasetMapper``, copy-paste (``codetr.data.copy_paste``), the
dataset check for missing masks, the toy dataset's exact polygons and the COCO LSJ instance
data config. Tiny images, exact expectations worked out by hand in the comments.
"""

import itertools
import json
import os
import re

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from detectron2.config import LazyConfig, instantiate
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.data.datasets import register_coco_instances
from detectron2.structures import BitMasks, Boxes, BoxMode, Instances, PolygonMasks

from codetr.data import DetrDatasetMapper, build_lsj_train_augmentation, load_checked_dataset_dicts
from codetr.data.copy_paste import CopyPaste
from codetr_toy import generate_toy_dataset, register_toy_datasets
from codetr_toy.shapes import _CATEGORIES, _mask_polygons, _shape_mask

HEIGHT, WIDTH = 40, 60
CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common", "data")
_NAME_IDS = itertools.count()

# An L-shaped object in the 40x60 image: a bar x 30..50, y 5..9 and a leg x 30..34, y 9..15.
# Its annotated box is deliberately looser than the polygon (x 28..52, y 3..17), to show when
# boxes are recomputed from masks.
L_POLYGON = [30, 5, 50, 5, 50, 9, 34, 9, 34, 15, 30, 15]
L_BOX = [28, 3, 52, 17]
# A right triangle with corners (30, 5), (50, 5), (30, 15).
TRIANGLE = [30, 5, 50, 5, 30, 15]
# A rectangle x 2..12, y 20..38.
RECTANGLE = [2, 20, 12, 20, 12, 38, 2, 38]
# flip (x -> 60 - x), resize x2 (80x120), crop x 10..50, y 5..40 (a 35x40 image)
FLIP_RESIZE_CROP = [
    T.HFlipTransform(WIDTH),
    T.ResizeTransform(HEIGHT, WIDTH, 2 * HEIGHT, 2 * WIDTH),
    T.CropTransform(10, 5, 40, 35),
]


def _annotation(bbox, category_id, segmentation=None, iscrowd=0):
    annotation = {
        "bbox": list(bbox),
        "bbox_mode": BoxMode.XYXY_ABS,
        "category_id": category_id,
        "iscrowd": iscrowd,
    }
    if segmentation is not None:
        annotation["segmentation"] = segmentation
    return annotation


def _write_image(path, height=HEIGHT, width=WIDTH, value=50):
    cv2.imwrite(str(path), np.full((height, width, 3), value, dtype=np.uint8))
    return str(path)


@pytest.fixture
def dataset_dict(tmp_path):
    """A grey 40x60 PNG: the L shape, the triangle, the rectangle and a crowd region."""
    crowd = mask_util.encode(np.asfortranarray(np.ones((HEIGHT, WIDTH), dtype=np.uint8)))
    crowd["counts"] = crowd["counts"].decode("ascii")
    return {
        "file_name": _write_image(tmp_path / "image.png"),
        "image_id": 7,
        "height": HEIGHT,
        "width": WIDTH,
        "annotations": [
            _annotation(L_BOX, 2, [L_POLYGON]),
            _annotation([0, 0, 60, 40], 4, crowd, iscrowd=1),
            _annotation([30, 5, 50, 15], 1, [TRIANGLE]),
            _annotation([2, 20, 12, 38], 0, [RECTANGLE]),
        ],
    }


def _mask_mapper(mask_format="polygon", augmentation=(), **kwargs):
    return DetrDatasetMapper(
        is_train=True,
        augmentation=list(augmentation),
        use_instance_mask=True,
        instance_mask_format=mask_format,
        **kwargs,
    )


def _vertices(polygon):
    return sorted(tuple(p) for p in np.asarray(polygon).reshape(-1, 2).tolist())


# ---------------------------------------------------------------------------------------------
# Masks through the mapper


def test_polygons_through_flip_resize_crop(dataset_dict):
    """
    Flip then resize x2: L x 20..60, y 10..30 (bar y 10..18, leg x 52..60); triangle
    (60, 10), (20, 10), (60, 30), hypotenuse y = 10 + (x - 20) / 2; rectangle x 96..116. The
    crop (x 10..50, y 5..40, then shifted by (-10, -5)) keeps the L's bar x 20..50 ->
    (10..40, 5..13) and the triangle x 20..50: (20, 10), (50, 10), (50, 25) -> (10, 5),
    (40, 5), (40, 20); nothing of the rectangle, which is removed. The crowd is dropped.
    """
    out = _mask_mapper(augmentation=FLIP_RESIZE_CROP)(dataset_dict)
    instances = out["instances"]
    assert out["image"].shape == (3, 35, 40) and instances.image_size == (35, 40)
    assert instances.gt_classes.tolist() == [2, 1]
    masks = instances.gt_masks
    assert isinstance(masks, PolygonMasks) and [len(p) for p in masks.polygons] == [1, 1]
    assert _vertices(masks.polygons[0][0]) == [(10, 5), (10, 13), (40, 5), (40, 13)]
    assert _vertices(masks.polygons[1][0]) == [(10, 5), (40, 5), (40, 20)]
    # Cropped: boxes recomputed from the masks (the clipped annotated boxes would be
    # [6, 1, 40, 29] and [10, 5, 40, 25], see test_masks_off_keeps_boxes_only).
    assert instances.gt_boxes.tensor.tolist() == [[10, 5, 40, 13], [10, 5, 40, 20]]
    assert masks.area().tolist() == [30 * 8, 30 * 15 / 2]


def test_bitmasks_through_flip_resize_crop(dataset_dict):
    """As above, rasterised at the cropped size: the L's bar is x 10..39, y 5..12 exactly."""
    dataset_dict["annotations"].pop(2)  # the triangle: its slanted edge has no exact pixels
    out = _mask_mapper("bitmask", FLIP_RESIZE_CROP)(dataset_dict)
    instances = out["instances"]
    assert isinstance(instances.gt_masks, BitMasks)
    expected = torch.zeros((1, 35, 40), dtype=torch.bool)
    expected[0, 5:13, 10:40] = True
    assert torch.equal(instances.gt_masks.tensor, expected)
    assert instances.gt_boxes.tensor.tolist() == [[10, 5, 40, 13]]
    assert instances.gt_classes.tolist() == [2]


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
def test_uncropped_images_keep_their_boxes(dataset_dict, mask_format):
    """Flip + resize, no crop: the annotated boxes are transformed, not recomputed."""
    out = _mask_mapper(mask_format, FLIP_RESIZE_CROP[:2])(dataset_dict)
    instances = out["instances"]
    assert instances.gt_boxes.tensor.tolist() == [
        [16, 6, 64, 34],  # the loose L box: x 28..52 -> 8..32 -> 16..64
        [20, 10, 60, 30],
        [96, 40, 116, 76],
    ]
    assert instances.gt_classes.tolist() == [2, 1, 0]
    if mask_format == "polygon":
        # flipped and scaled: (30, 5) -> (30, 5) -> (60, 10); (50, 9) -> (10, 9) -> (20, 18)
        assert instances.gt_masks.polygons[0][0].tolist() == [
            60, 10, 20, 10, 20, 18, 52, 18, 52, 30, 60, 30  # fmt: skip
        ]
    else:
        rectangle = instances.gt_masks.tensor[2]
        assert rectangle.sum() == 20 * 36 and rectangle[40:76, 96:116].all()


def test_mask_and_box_recomputed_after_lsj_crop(dataset_dict):
    """LSJ always crops (FixedSizeCrop): boxes come from the masks, the crowd is dropped."""
    mapper = _mask_mapper("bitmask", build_lsj_train_augmentation(image_size=32))
    np.random.seed(0)
    for _ in range(10):
        instances = mapper(dataset_dict)["instances"]
        assert instances.image_size == (32, 32) and 3 not in instances.gt_classes.tolist()
        assert len(instances.gt_masks) == len(instances.gt_boxes) == len(instances)
        assert torch.equal(
            instances.gt_boxes.tensor, instances.gt_masks.get_bounding_boxes().tensor
        )
        assert instances.gt_masks.nonempty().all()


@pytest.mark.parametrize("mask_format", ["polygon", "bitmask"])
@pytest.mark.parametrize("crop", [False, True])
def test_images_without_objects_have_empty_masks(dataset_dict, mask_format, crop):
    """No annotation at all, or all objects cropped away: empty masks of the right type."""
    if crop:  # x 14..30, y 30..40 of the original image: misses every object
        augmentation, size = [T.CropTransform(14, 30, 16, 10)], (10, 16)
    else:
        augmentation, size = [], (HEIGHT, WIDTH)
        dataset_dict["annotations"] = []
    instances = _mask_mapper(mask_format, augmentation)(dataset_dict)["instances"]
    assert len(instances) == 0 and instances.image_size == size
    assert instances.gt_boxes.tensor.shape == (0, 4)
    if mask_format == "polygon":
        assert isinstance(instances.gt_masks, PolygonMasks) and len(instances.gt_masks) == 0
    else:
        assert isinstance(instances.gt_masks, BitMasks)
        assert instances.gt_masks.tensor.shape == (0, *size)
        assert instances.gt_masks.tensor.dtype == torch.bool


def test_masks_off_keeps_boxes_only(dataset_dict):
    out = DetrDatasetMapper(is_train=True, augmentation=FLIP_RESIZE_CROP)(dataset_dict)
    assert not out["instances"].has("gt_masks")
    # not recomputed: the annotated boxes transformed and clipped, e.g. the L's loose box
    # [28, 3, 52, 17] -> [16, 6, 64, 34] -> shifted [6, 1, 54, 29] -> clipped at x = 40
    assert out["instances"].gt_boxes.tensor.tolist() == [[6, 1, 40, 29], [10, 5, 40, 25]]


def test_missing_segmentation_is_an_error_naming_the_annotation(dataset_dict):
    file_name = dataset_dict["file_name"]
    del dataset_dict["annotations"][1]["segmentation"]  # the crowd: dropped, no error
    _mask_mapper()(dataset_dict)
    del dataset_dict["annotations"][2]["segmentation"]
    expected = re.escape(f'Annotation 2 of {file_name} has no "segmentation"')
    with pytest.raises(ValueError, match=expected):
        _mask_mapper()(dataset_dict)
    assert DetrDatasetMapper(is_train=True, augmentation=[])(dataset_dict)  # masks off: fine


class TestRequireMasksCheck:
    """``load_checked_dataset_dicts(require_masks=True)`` finds missing masks before training."""

    def _register(self, tmp_path, segmentations):
        image_root = tmp_path / "images"
        image_root.mkdir()
        images, annotations = [], []
        for image_id, segms in enumerate(segmentations, start=1):
            _write_image(image_root / f"{image_id}.jpg", 20, 30)
            images.append(
                {"id": image_id, "file_name": f"{image_id}.jpg", "height": 20, "width": 30}
            )
            for segm in segms:
                annotation = {"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0}
                annotation.update(category_id=1, bbox=[2, 2, 8, 8], area=64.0)
                if segm is not None:
                    annotation["segmentation"] = segm
                annotations.append(annotation)
        json_file = tmp_path / "instances.json"
        json_file.write_text(
            json.dumps(
                {
                    "images": images,
                    "annotations": annotations,
                    "categories": [{"id": 1, "name": "thing"}],
                }
            )
        )
        name = f"_test_masks_{next(_NAME_IDS)}"
        register_coco_instances(name, {}, str(json_file), str(image_root))
        return name, str(image_root)

    def test_missing_masks_are_listed(self, tmp_path):
        square = [[2, 2, 10, 2, 10, 10, 2, 10]]
        # image 2: its annotation 1 has no key, its annotation 2 no valid polygon
        name, root = self._register(tmp_path, [[square], [square, None, []]])
        try:
            assert len(load_checked_dataset_dicts(name, is_train=True)) == 2  # not required
            with pytest.raises(ValueError) as error:
                load_checked_dataset_dicts(name, is_train=True, require_masks=True)
            message = str(error.value)
            assert message.startswith(
                f'2 of the 4 non-crowd annotations of dataset {name!r} have no "segmentation"'
            )
            assert f"annotation 1 of {os.path.join(root, '2.jpg')}" in message
            assert f"annotation 2 of {os.path.join(root, '2.jpg')}" in message
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)

    def test_complete_masks_pass(self, tmp_path):
        name, _ = self._register(tmp_path, [[[[2, 2, 10, 2, 10, 10, 2, 10]]]])
        try:
            dicts = load_checked_dataset_dicts(name, is_train=True, require_masks=True)
            assert dicts[0]["annotations"][0]["segmentation"] == [[2, 2, 10, 2, 10, 10, 2, 10]]
        finally:
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_invalid_mask_arguments(monkeypatch):
    with pytest.raises(ValueError, match="instance_mask_format"):
        _mask_mapper("rle")
    with pytest.raises(ValueError, match='instance_mask_format="bitmask"'):
        _mask_mapper("polygon", copy_paste=CopyPaste())
    with pytest.raises(ValueError, match="use_instance_mask=True"):
        DetrDatasetMapper(is_train=True, augmentation=[], copy_paste=CopyPaste())
    with pytest.raises(ValueError, match="only used in training"):
        DetrDatasetMapper(
            is_train=False,
            augmentation=[],
            use_instance_mask=True,
            instance_mask_format="bitmask",
            copy_paste=CopyPaste(),
        )
    with pytest.raises(ValueError, match="max_num_pasted"):
        CopyPaste(max_num_pasted=0)
    with pytest.raises(ValueError, match="source_pool_size"):
        CopyPaste(source_pool_size=0)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None)
    with pytest.raises(ImportError, match="pip install shapely"):
        _mask_mapper()


# ---------------------------------------------------------------------------------------------
# Copy-paste


def _instances(size, boxes_and_classes, masks):
    instances = Instances(size)
    instances.gt_boxes = Boxes(torch.tensor([b for b, _ in boxes_and_classes], dtype=torch.float32))
    instances.gt_classes = torch.tensor([c for _, c in boxes_and_classes], dtype=torch.int64)
    instances.gt_masks = BitMasks(torch.stack(masks))
    return instances


def _rect_mask(size, y0, y1, x0, x1):
    """Pixels rows y0..y1-1, columns x0..x1-1."""
    mask = torch.zeros(size, dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _destination_and_source():
    """
    12x12 images. Destination (value 10): A rows 0-3 x cols 0-3 (class 0), B rows 6-9 x cols
    6-11 (class 1), C rows 0-1 x cols 8-11 (class 2), D rows 6-11 x cols 0-4 (class 3).
    Source (value 200): S1 rows 0-5 x cols 2-9 (class 10), S2 rows 10-11 x cols 0-4 (class 11).
    """
    size = (12, 12)
    dst = _instances(
        size,
        [([0, 0, 4, 4], 0), ([6, 6, 12, 10], 1), ([8, 0, 12, 2], 2), ([0, 6, 5, 12], 3)],
        [
            _rect_mask(size, 0, 4, 0, 4),
            _rect_mask(size, 6, 10, 6, 12),
            _rect_mask(size, 0, 2, 8, 12),
            _rect_mask(size, 6, 12, 0, 5),
        ],
    )
    src = _instances(
        size,
        [([2, 0, 10, 6], 10), ([0, 10, 5, 12], 11)],
        [_rect_mask(size, 0, 6, 2, 10), _rect_mask(size, 10, 12, 0, 5)],
    )
    image = np.full((12, 12, 3), 10, dtype=np.uint8)
    source_image = np.full((12, 12, 3), 200, dtype=np.uint8)
    return image, dst, source_image, src


def test_copy_paste_exact():
    """
    Pasting S1 and S2 (thresholds: box sides within 1 px, or more than 10 pixels left):
    A keeps cols 0-1 (8 px, box [0, 0, 2, 4]: moved 2) -> dropped; B untouched -> kept;
    C keeps cols 10-11 (4 px, moved 2) -> dropped; D keeps rows 6-9 (20 px, box [0, 6, 5, 10]:
    moved 2, but 20 > 10) -> kept. Then S1, S2.
    """
    image, dst, source_image, src = _destination_and_source()
    copy_paste = CopyPaste(bbox_occluded_thr=1, mask_occluded_thr=10, selected=False)
    out_image, out = copy_paste(image, dst, source_image, src)

    assert out.gt_classes.tolist() == [1, 3, 10, 11]
    assert out.gt_boxes.tensor.tolist() == [
        [6, 6, 12, 10],
        [0, 6, 5, 10],
        [2, 0, 10, 6],
        [0, 10, 5, 12],
    ]
    expected_masks = torch.stack(
        [
            _rect_mask((12, 12), 6, 10, 6, 12),
            _rect_mask((12, 12), 6, 10, 0, 5),
            _rect_mask((12, 12), 0, 6, 2, 10),
            _rect_mask((12, 12), 10, 12, 0, 5),
        ]
    )
    assert torch.equal(out.gt_masks.tensor, expected_masks)
    expected_image = np.full((12, 12, 3), 10, dtype=np.uint8)
    expected_image[0:6, 2:10] = 200
    expected_image[10:12, 0:5] = 200
    assert out_image.dtype == np.uint8 and np.array_equal(out_image, expected_image)
    # the inputs are not modified
    assert dst.gt_masks.tensor.sum() == 16 + 24 + 8 + 30 and (image == 10).all()


def test_copy_paste_thresholds_keep_partly_hidden_objects():
    """With mmdet's thresholds (10 px, 300 pixels) every partly hidden 12x12 object stays."""
    image, dst, source_image, src = _destination_and_source()
    _, out = CopyPaste(selected=False)(image, dst, source_image, src)
    assert out.gt_classes.tolist() == [0, 1, 2, 3, 10, 11]
    assert out.gt_boxes.tensor[:4].tolist() == [
        [0, 0, 2, 4],
        [6, 6, 12, 10],
        [10, 0, 12, 2],
        [0, 6, 5, 10],
    ]


def test_copy_paste_drops_fully_hidden_objects():
    """
    A 2x2 object at rows/cols 1-2 hidden by S1 (rows 0-5, cols 0-5): its empty mask's box
    [0, 0, 0, 0] is within mmdet's 10 px of [1, 1, 3, 3] (mmdet keeps it); here it is dropped.
    """
    size = (12, 12)
    dst = _instances(size, [([1, 1, 3, 3], 0)], [_rect_mask(size, 1, 3, 1, 3)])
    src = _instances(size, [([0, 0, 6, 6], 5)], [_rect_mask(size, 0, 6, 0, 6)])
    image = np.zeros((12, 12, 3), dtype=np.uint8)
    _, out = CopyPaste(selected=False)(image, dst, image + 1, src)
    assert out.gt_classes.tolist() == [5]


def test_copy_paste_selects_like_mmdet():
    """
    ``selected``: a count drawn from [0, min(n, max_num_pasted - 1)], then that many distinct
    objects, with numpy's global generator (mmdet's ``_select_object``). No object drawn:
    the destination is returned unchanged.
    """
    image, dst, source_image, src = _destination_and_source()
    seen = set()
    for seed in range(40):
        np.random.seed(seed)
        count = np.random.randint(0, 3)
        indices = np.random.choice(2, size=count, replace=False).tolist()
        np.random.seed(seed)
        out_image, out = CopyPaste(bbox_occluded_thr=1, mask_occluded_thr=10)(
            image, dst, source_image, src
        )
        pasted = [10 + i for i in indices]
        seen.add(tuple(sorted(pasted)))
        if count == 0:
            assert out is dst and out_image is image
        else:
            assert out.gt_classes.tolist()[-count:] == pasted
    assert seen == {(), (10,), (11,), (10, 11)}

    for seed in range(20):  # max_num_pasted=2: at most one object
        np.random.seed(seed)
        _, out = CopyPaste(max_num_pasted=2, selected=True)(image, dst, source_image, src)
        assert len(out) - sum(c < 10 for c in out.gt_classes.tolist()) <= 1


def test_copy_paste_rejects_mismatched_inputs():
    image, dst, source_image, src = _destination_and_source()
    with pytest.raises(ValueError, match="same size"):
        CopyPaste()(image, dst, source_image[:10], src)
    polygons = Instances((12, 12), gt_masks=PolygonMasks([[[0, 0, 4, 0, 4, 4]]]))
    with pytest.raises(TypeError, match='instance_mask_format="bitmask"'):
        CopyPaste()(image, polygons, source_image, src)


def _square_dict(tmp_path, name, value, squares):
    """A 16x16 image of one grey value with square objects (x0, y0, side, class)."""
    return {
        "file_name": _write_image(tmp_path / f"{name}.png", 16, 16, value),
        "image_id": name,
        "height": 16,
        "width": 16,
        "annotations": [
            _annotation([x, y, x + s, y + s], c, [[x, y, x + s, y, x + s, y + s, x, y + s]])
            for x, y, s, c in squares
        ],
    }


def test_mapper_pastes_from_recently_mapped_images(tmp_path):
    """
    The mapper keeps the dicts it mapped and pastes from one of them (never the image
    itself). Image A (value 40): a 6x6 square at (2, 2), class 0. Image B (value 90): an 8x8
    square at (6, 6), class 1. B after A: A's square is pasted onto B (B's square loses its
    corner rows 6-7 x columns 6-7: 60 px left, box unchanged, kept).
    """
    a = _square_dict(tmp_path, "a", 40, [(2, 2, 6, 0)])
    b = _square_dict(tmp_path, "b", 90, [(6, 6, 8, 1)])
    mapper = _mask_mapper(
        "bitmask", copy_paste=CopyPaste(selected=False, mask_occluded_thr=10, source_pool_size=1)
    )
    first = mapper(a)  # nothing mapped before: no paste
    assert first["instances"].gt_classes.tolist() == [0]
    assert (first["image"] == 40).all()

    second = mapper(b)
    instances = second["instances"]
    assert instances.gt_classes.tolist() == [1, 0]
    assert instances.gt_boxes.tensor.tolist() == [[6, 6, 14, 14], [2, 2, 8, 8]]
    assert torch.equal(
        instances.gt_masks.tensor,
        torch.stack(
            [
                _rect_mask((16, 16), 6, 14, 6, 14) & ~_rect_mask((16, 16), 2, 8, 2, 8),
                _rect_mask((16, 16), 2, 8, 2, 8),
            ]
        ),
    )
    expected = torch.full((3, 16, 16), 90, dtype=torch.uint8)
    expected[:, 2:8, 2:8] = 40
    assert torch.equal(second["image"], expected)
    assert "annotations" not in second and "annotations" in b

    third = mapper(a)  # pool of one: B only
    assert third["instances"].gt_classes.tolist() == [0, 1]


def test_mapper_copy_paste_needs_one_size(tmp_path):
    a = _square_dict(tmp_path, "a", 40, [(2, 2, 6, 0)])
    small = dict(_square_dict(tmp_path, "small", 40, [(2, 2, 6, 0)]))
    small["file_name"] = _write_image(tmp_path / "small.png", 12, 16, 40)
    small["height"] = 12
    mapper = _mask_mapper("bitmask", copy_paste=CopyPaste(selected=False))
    mapper(small)
    expected = f"for {re.escape(a['file_name'])} and .* for .*small.png"
    with pytest.raises(ValueError, match=expected):
        mapper(a)


def test_lsj_copy_paste_is_reproducible(dataset_dict, tmp_path):
    """Same numpy seed, same outputs: every draw goes through numpy's global generator."""
    records = [dataset_dict, _square_dict(tmp_path, "a", 40, [(2, 2, 6, 0), (9, 9, 5, 3)])]

    def run():
        mapper = _mask_mapper(
            "bitmask",
            build_lsj_train_augmentation(image_size=24),
            copy_paste=CopyPaste(mask_occluded_thr=20),
        )
        np.random.seed(3)
        return [mapper(records[i % 2]) for i in range(8)]

    for one, two in zip(run(), run()):
        assert torch.equal(one["image"], two["image"])
        assert torch.equal(one["instances"].gt_classes, two["instances"].gt_classes)
        assert torch.equal(one["instances"].gt_boxes.tensor, two["instances"].gt_boxes.tensor)
        assert torch.equal(one["instances"].gt_masks.tensor, two["instances"].gt_masks.tensor)
        instances = one["instances"]
        assert torch.equal(
            instances.gt_boxes.tensor, instances.gt_masks.get_bounding_boxes().tensor
        )


# ---------------------------------------------------------------------------------------------
# Toy shapes: exact polygons


def _rasterise(polygons, height, width):
    return mask_util.decode(mask_util.merge(mask_util.frPyObjects(polygons, height, width))) > 0


def test_toy_polygons_are_the_drawn_pixels():
    """Every shape, at every size and angle drawn here: pycocotools gives back its pixels."""
    rng = np.random.default_rng(0)
    for category in range(len(_CATEGORIES)):
        for radius in (2, 3, 5, 9, 17, 30):
            mask = _shape_mask(category, (40, 35), radius, rng.uniform(0, 2 * np.pi), 80, 90)
            polygons = _mask_polygons(mask)
            assert np.array_equal(_rasterise(polygons, 80, 90), mask), (category, radius)
            assert PolygonMasks([polygons]).area().item() == mask.sum()


def test_outline_of_touching_and_holed_masks():
    mask = np.zeros((5, 6), dtype=bool)
    mask[1, 1] = mask[2, 2] = True  # touching at a corner: two polygons
    mask[2:4, 3:5] = True
    assert _mask_polygons(mask) == [
        [1, 1, 2, 1, 2, 2, 1, 2],
        [2, 2, 5, 2, 5, 4, 3, 4, 3, 3, 2, 3],
    ]
    assert np.array_equal(_rasterise(_mask_polygons(mask), 5, 6), mask)
    ring = np.ones((3, 3), dtype=bool)
    ring[1, 1] = False
    with pytest.raises(ValueError, match="hole"):
        _mask_polygons(ring)


def test_toy_annotations_have_exact_masks_and_unchanged_boxes(tmp_path):
    json_file = generate_toy_dataset(
        str(tmp_path), split="train", num_images=2, seed=0, image_size=(64, 64), max_objects=4
    )
    with open(json_file) as f:
        coco = json.load(f)
    # boxes and areas as generated before masks were added (generator version 1)
    assert [
        (a["image_id"], a["category_id"], a["bbox"], a["area"]) for a in coco["annotations"]
    ] == [
        (1, 3, [22.0, 17.0, 14.0, 15.0], 107.0),
        (2, 2, [46.0, 35.0, 17.0, 17.0], 197.0),
        (2, 1, [20.0, 42.0, 13.0, 13.0], 169.0),
        (2, 5, [29.0, 27.0, 9.0, 13.0], 61.0),
        (2, 2, [24.0, 2.0, 17.0, 17.0], 197.0),
    ]
    # the square: exactly its 4 corners
    assert coco["annotations"][2]["segmentation"] == [[20, 42, 33, 42, 33, 55, 20, 55]]
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        masks = PolygonMasks([annotation["segmentation"]])
        assert masks.get_bounding_boxes().tensor.tolist() == [[x, y, x + w, y + h]]
        assert masks.area().item() == annotation["area"]
        pixels = _rasterise(annotation["segmentation"], 64, 64)
        assert pixels.sum() == annotation["area"]
        ys, xs = np.nonzero(pixels)
        assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x, y, x + w, y + h]


# ---------------------------------------------------------------------------------------------
# The COCO LSJ instance data config


def test_coco_lsj_instance_config(tmp_path, monkeypatch):
    monkeypatch.setenv("CODETR_DATASETS", str(tmp_path))
    register_toy_datasets()
    try:
        cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "coco_lsj_instance.py"))
        path = str(tmp_path / "config.yaml")
        LazyConfig.save(cfg, path)
        cfg = LazyConfig.load(path)
        train = cfg.dataloader.train
        assert train.dataset.names == "coco_2017_train" and train.dataset.require_masks is True
        assert train.mapper.augmentation.image_size == 1024

        train.dataset.names = "codetr_toy_val"  # COCO is not available here
        train.mapper.augmentation.image_size = 64
        mapper = instantiate(train.mapper)
        assert mapper.use_instance_mask and mapper.instance_mask_format == "bitmask"
        assert repr(mapper.copy_paste) == (
            "CopyPaste(max_num_pasted=100, bbox_occluded_thr=10, mask_occluded_thr=300, "
            "selected=True, source_pool_size=20)"
        )
        dicts = instantiate(train.dataset)
        np.random.seed(0)
        for record in dicts[:4]:
            instances = mapper(record)["instances"]
            assert isinstance(instances.gt_masks, BitMasks)
            assert instances.gt_masks.tensor.shape[1:] == (64, 64)
            assert torch.equal(
                instances.gt_boxes.tensor, instances.gt_masks.get_bounding_boxes().tensor
            )
    finally:
        monkeypatch.undo()
        register_toy_datasets()
