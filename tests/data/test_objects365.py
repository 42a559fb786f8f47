"""Objects365 registration: the layout under $DETECTRON2_DATASETS, read from a small
COCO-format set made from the toy shapes."""

import os
import shutil

from detectron2.data import DatasetCatalog, MetadataCatalog

from codetr.data import register_objects365, thing_class_count
from codetr_toy import generate_toy_dataset


def test_objects365_splits_read_from_the_documented_layout(tmp_path, monkeypatch):
    root = tmp_path / "objects365"
    json_file = generate_toy_dataset(str(tmp_path / "toy"), split="val", num_images=3, seed=2)
    (root / "annotations").mkdir(parents=True)
    shutil.copy(json_file, root / "annotations" / "zhiyuan_objv2_val.json")
    shutil.copytree(tmp_path / "toy" / "val", root / "val")
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    register_objects365()
    try:
        metadata = MetadataCatalog.get("objects365_v2_val")
        assert metadata.json_file == str(root / "annotations" / "zhiyuan_objv2_val.json")
        assert metadata.image_root == str(root / "val")
        train = MetadataCatalog.get("objects365_v2_train")
        assert train.json_file == str(root / "annotations" / "zhiyuan_objv2_train.json")
        # class names from the json when the split is first read
        assert thing_class_count("objects365_v2_val") == 5
        records = DatasetCatalog.get("objects365_v2_val")
        assert len(records) == 3 and all(os.path.isfile(r["file_name"]) for r in records)
    finally:
        for name in ("objects365_v2_train", "objects365_v2_val"):
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
