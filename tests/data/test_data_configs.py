import os

import pytest
import torch

from detectron2.config import LazyConfig, instantiate
from detectron2.evaluation import COCOEvaluator

from codetr_toy import register_toy_datasets

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "common", "data")
CONFIGS = ["coco.py", "coco_lsj.py", "toy.py"]


@pytest.fixture(scope="module", autouse=True)
def toy_root(tmp_path_factory):
    """The toy datasets under a temporary ``$CODETR_DATASETS`` (the toy config registers them
    again when it is loaded, from there); the variable and the registration restored after."""
    datasets = str(tmp_path_factory.mktemp("datasets"))
    previous = os.environ.get("CODETR_DATASETS")
    os.environ["CODETR_DATASETS"] = datasets
    register_toy_datasets()
    yield os.path.join(datasets, "codetr_toy")
    if previous is None:
        del os.environ["CODETR_DATASETS"]
    else:
        os.environ["CODETR_DATASETS"] = previous
    register_toy_datasets()


def _load(name):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, name))
    if name != "toy.py":  # COCO is not available here: point the configs at the toy split
        cfg.dataloader.train.dataset.names = "codetr_toy_val"
        cfg.dataloader.test.dataset.names = "codetr_toy_val"
    cfg.dataloader.test.num_workers = 0
    return cfg


def test_dataset_names():
    names = {}
    for name in CONFIGS:
        loader = LazyConfig.load(os.path.join(CONFIG_DIR, name)).dataloader
        names[name] = (loader.train.dataset.names, loader.test.dataset.names)
        assert loader.train.dataset.filter_empty is False
        assert loader.train.dataset.is_train is True and loader.test.dataset.is_train is False
        assert loader.train.dataset.missing_images == "error"
        assert loader.train.mapper.image_format == "RGB"
    assert names["coco.py"] == names["coco_lsj.py"] == ("coco_2017_train", "coco_2017_val")
    assert names["toy.py"] == ("codetr_toy_train", "codetr_toy_val")


@pytest.mark.parametrize("name", CONFIGS)
def test_config_instantiates(name):
    cfg = _load(name)
    test_loader = instantiate(cfg.dataloader.test)
    batch = next(iter(test_loader))
    image = batch[0]["image"]
    assert image.dtype == torch.uint8
    expected_shape = {"coco.py": (3, 800, 800), "coco_lsj.py": (3, 1024, 1024)}
    assert image.shape == expected_shape.get(name, (3, 160, 160))  # toy images are 160x160

    evaluator = instantiate(cfg.dataloader.evaluator)
    assert isinstance(evaluator, COCOEvaluator)
    assert evaluator._metadata.name == "codetr_toy_val"

    mapper = instantiate(cfg.dataloader.train.mapper)
    assert mapper.is_train
    assert (mapper.augmentation_with_crop is not None) == (name == "coco.py")


def test_toy_evaluator_generates_the_data(toy_root):
    """COCOEvaluator reads the json when built: the toy config makes sure it exists."""
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, "toy.py"))
    json_file = os.path.join(toy_root, "annotations", "val.json")
    if os.path.exists(json_file):
        os.remove(json_file)
    evaluator = instantiate(cfg.dataloader.evaluator)
    assert evaluator._metadata.json_file == json_file
    assert os.path.isfile(json_file)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trips_save(name, tmp_path):
    cfg = LazyConfig.load(os.path.join(CONFIG_DIR, name))
    path = str(tmp_path / "config.yaml")
    LazyConfig.save(cfg, path)
    assert not os.path.exists(path + ".pkl")  # saved as yaml, nothing unserialisable
    reloaded = LazyConfig.load(path)
    LazyConfig.save(reloaded, path + ".again.yaml")
    with open(path) as first, open(path + ".again.yaml") as second:
        assert first.read() == second.read()

    reloaded.dataloader.test.num_workers = 0
    if name != "toy.py":
        reloaded.dataloader.test.dataset.names = "codetr_toy_val"
    assert len(instantiate(reloaded.dataloader.test).dataset) == 100
