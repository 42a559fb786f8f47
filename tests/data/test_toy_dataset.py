import json
import os
from collections import Counter

import pytest

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import register_coco_instances

from codetr_toy import (
    TOY_DATASET_SPLITS,
    TOY_THING_CLASSES,
    ensure_toy_dataset,
    generate_toy_dataset,
    register_toy_datasets,
)


def _read_split(root, split):
    with open(os.path.join(root, "annotations", f"{split}.json"), "rb") as f:
        json_bytes = f.read()
    image_dir = os.path.join(root, split)
    images = {}
    for name in sorted(os.listdir(image_dir)):
        with open(os.path.join(image_dir, name), "rb") as f:
            images[name] = f.read()
    return json_bytes, images


@pytest.fixture(scope="module")
def val_split(tmp_path_factory):
    """40 images of the default size: (root, parsed json)."""
    root = str(tmp_path_factory.mktemp("toy"))
    json_file = generate_toy_dataset(root, split="val", num_images=40, seed=3)
    with open(json_file) as f:
        return root, json.load(f)


@pytest.fixture
def toy_registered_in(tmp_path):
    """Registers the toy datasets under tmp_path; restores the default registration after."""
    register_toy_datasets(str(tmp_path))
    yield str(tmp_path)
    register_toy_datasets()


def test_generation_is_deterministic(tmp_path):
    kwargs = dict(split="train", num_images=6, seed=7, image_size=(64, 96))
    generate_toy_dataset(str(tmp_path / "a"), **kwargs)
    generate_toy_dataset(str(tmp_path / "b"), **kwargs)
    json_a, images_a = _read_split(str(tmp_path / "a"), "train")
    json_b, images_b = _read_split(str(tmp_path / "b"), "train")
    assert json_a == json_b
    assert list(images_a) == [f"{i:06d}.jpg" for i in range(6)]
    assert images_a == images_b


def test_different_seed_or_split_differs(tmp_path):
    common = dict(num_images=4, image_size=(64, 64))
    generate_toy_dataset(str(tmp_path / "a"), split="train", seed=0, **common)
    generate_toy_dataset(str(tmp_path / "b"), split="train", seed=1, **common)
    generate_toy_dataset(str(tmp_path / "c"), split="val", seed=0, **common)
    json_a, images_a = _read_split(str(tmp_path / "a"), "train")
    json_b, images_b = _read_split(str(tmp_path / "b"), "train")
    json_c, images_c = _read_split(str(tmp_path / "c"), "val")
    assert json.loads(json_a)["annotations"] != json.loads(json_b)["annotations"]
    assert all(images_a[name] != images_b[name] for name in images_a)
    assert all(images_a[name] != images_c[name] for name in images_a)


def test_annotations_are_valid(val_split):
    root, coco = val_split
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4, 5]
    assert [c["name"] for c in coco["categories"]] == TOY_THING_CLASSES
    assert len(coco["images"]) == 40
    for image in coco["images"]:
        assert (image["height"], image["width"]) == (160, 160)
        assert os.path.isfile(os.path.join(root, "val", image["file_name"]))

    counts = Counter(a["image_id"] for a in coco["annotations"])
    assert set(counts) == {image["id"] for image in coco["images"]}  # >= 1 object each
    assert max(counts.values()) <= 15
    assert max(counts.values()) >= 10  # crowded images exist
    assert {a["category_id"] for a in coco["annotations"]} == {1, 2, 3, 4, 5}
    assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])

    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert ann["iscrowd"] == 0
        assert x >= 0 and y >= 0 and x + w <= 160 and y + h <= 160
        assert w >= 4 and h >= 4
        assert 0 < ann["area"] <= w * h
        if TOY_THING_CLASSES[ann["category_id"] - 1] in ("square", "circle", "cross"):
            assert w == h  # boxes are the exact extent of symmetric shapes


def test_size_ranges_differ_by_category(val_split):
    _, coco = val_split
    widths = {}
    for ann in coco["annotations"]:
        widths.setdefault(ann["category_id"], []).append(ann["bbox"][2])
    # square 0.10-0.22 and triangle 0.16-0.34 of 160 px (triangle width >= 0.86 * extent)
    assert max(widths[1]) <= 0.22 * 160 + 1
    assert max(widths[3]) > 0.22 * 160 + 1


def test_generate_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_images"):
        generate_toy_dataset(str(tmp_path), split="train", num_images=0, seed=0)
    with pytest.raises(ValueError, match="image_size"):
        generate_toy_dataset(str(tmp_path), split="train", num_images=1, seed=0, image_size=(8, 8))
    with pytest.raises(ValueError, match="max_objects"):
        generate_toy_dataset(str(tmp_path), split="train", num_images=1, seed=0, max_objects=0)


def test_registration_is_lazy_and_loads(toy_registered_in):
    root = toy_registered_in
    metadata = MetadataCatalog.get("codetr_toy_val")
    assert metadata.thing_classes == TOY_THING_CLASSES
    assert metadata.evaluator_type == "coco"
    assert metadata.json_file == os.path.join(root, "annotations", "val.json")
    assert metadata.image_root == os.path.join(root, "val")
    assert os.listdir(root) == []  # nothing generated by registration

    dicts = DatasetCatalog.get("codetr_toy_val")
    assert len(dicts) == TOY_DATASET_SPLITS["codetr_toy_val"].num_images
    assert os.path.isfile(metadata.json_file)
    assert not os.path.exists(os.path.join(root, "train"))  # only the requested split
    assert all(len(d["annotations"]) >= 1 for d in dicts)
    assert dicts[0]["file_name"] == os.path.join(root, "val", "000000.jpg")
    classes = {a["category_id"] for d in dicts for a in d["annotations"]}
    assert classes == set(range(len(TOY_THING_CLASSES)))  # contiguous ids
    assert metadata.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2, 4: 3, 5: 4}


def test_ensure_generates_once_and_repairs(toy_registered_in):
    json_file = os.path.join(toy_registered_in, "annotations", "val.json")
    assert ensure_toy_dataset("codetr_toy_val") == "codetr_toy_val"
    with open(json_file) as f:
        expected = f.read()
    mtime = os.stat(json_file).st_mtime_ns
    ensure_toy_dataset("codetr_toy_val")
    assert os.stat(json_file).st_mtime_ns == mtime  # up to date: not rewritten

    with open(json_file, "w") as f:
        json.dump({"info": {"seed": -1}}, f)  # stale or foreign file
    ensure_toy_dataset("codetr_toy_val")
    with open(json_file) as f:
        assert f.read() == expected


def test_ensure_accepts_any_registered_dataset(tmp_path):
    json_file = str(tmp_path / "mine_val.json")  # never created: only toy files are generated
    register_coco_instances("_test_mine_val", {}, json_file, str(tmp_path))
    try:
        assert ensure_toy_dataset("_test_mine_val") == "_test_mine_val"
        assert ensure_toy_dataset("coco_2017_val") == "coco_2017_val"
        assert os.listdir(tmp_path) == []
    finally:
        DatasetCatalog.remove("_test_mine_val")
        MetadataCatalog.remove("_test_mine_val")


def test_ensure_rejects_unregistered_name():
    with pytest.raises(KeyError) as info:
        ensure_toy_dataset("mine_val")
    message = str(info.value)
    assert "Dataset 'mine_val' is not registered" in message
    assert "train_net.py --register-coco mine_val JSON IMAGE_ROOT" in message
    assert "codetr_toy_train, codetr_toy_val" in message
