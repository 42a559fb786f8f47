"""
Start-up checks of detection datasets: ``load_checked_dataset_dicts`` loads datasets the way
detectron2's ``get_detection_dataset_dicts`` does and reports, naming the dataset and file:

- an unregistered dataset name (with the registered ones and how to register a COCO json);
- a json file that is missing, does not parse (with line and column), is not a COCO dict
  with "images", or has no "annotations" key (an error for a training set);
- a dataset without any annotation: an error for a training set, a warning for a test set;
- images listed but missing on disk, all together (a count and the first few paths): an error
  by default, or dropped with a warning (``missing_images="drop"``);
- test images that cannot be opened (empty or not images; their headers are read): an
  error, found before training instead of in the evaluation after it;
- degenerate boxes (width or height <= 0, or non-finite coordinates): one warning per dataset
  with their count and an example; training drops them (detectron2's
  ``filter_empty_instances``);
- with ``require_masks=True`` (training with instance masks: the train mapper's
  ``use_instance_mask``), non-crowd annotations without "segmentation": an error with their
  count and the first few (file and annotation index), before training instead of when the
  mapper meets the first of them.

The json is parsed only to explain a failure of detectron2's loader, so a valid dataset is
read once. Files given as URIs (e.g. "s3://...") are not checked.
"""

import contextlib
import json
import logging
import os
from typing import Dict, Iterator, List, Optional, Sequence, Union

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.detection_utils import check_metadata_consistency
from detectron2.structures import BoxMode

__all__ = [
    "MISSING_IMAGES_MODES",
    "explained_json_errors",
    "load_checked_dataset_dicts",
    "require_registered",
]

MISSING_IMAGES_MODES = ("error", "drop")

# Paths listed in a report of missing images.
_LISTED_PATHS = 5

logger = logging.getLogger(__name__)


def _explain_json_failure(name: str, json_file: str, *, is_train: bool) -> None:
    """
    Raises an error describing what is wrong with the COCO json of dataset ``name``, if it is
    something this function recognises: a missing file, invalid json, not a dict with
    "images", or (for a training set) no "annotations" key. Returns otherwise.
    """
    prefix = f"Dataset {name!r}: json file {json_file}"
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"{prefix} does not exist")
    with open(json_file, "rb") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{prefix} is not valid json: {e.msg} at line {e.lineno} column {e.colno}"
            ) from e
    if not isinstance(content, dict) or "images" not in content:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise ValueError(
            f'{prefix} is not a COCO instances file: expected a dict with an "images" list, '
            f"found {found}"
        )
    if is_train and "annotations" not in content:
        raise ValueError(f'{prefix} has no "annotations" key: a training set needs boxes')


@contextlib.contextmanager
def explained_json_errors(name: str, *, is_train: bool) -> Iterator[None]:
    """
    Around code that loads the registered dataset ``name`` (``DatasetCatalog.get``): when it
    fails, raise instead an error that says what is wrong with the dataset's COCO json, if it
    is one of the problems :func:`_explain_json_failure` recognises.
    """
    json_file = MetadataCatalog.get(name).get("json_file")
    try:
        yield
    except Exception:
        if json_file and not _is_uri(json_file):
            _explain_json_failure(name, json_file, is_train=is_train)
        raise


def _check_annotations_present(
    name: str, json_file: Optional[str], dicts: List[Dict], *, is_train: bool
) -> None:
    """Raises (training) or warns (test) when no record of dataset ``name`` has annotations."""
    if any(record.get("annotations") for record in dicts):
        return
    source = f" (json file {json_file})" if json_file else ""
    message = f"Dataset {name!r}{source} has no annotations"
    if is_train:
        raise ValueError(f"{message}: a training set needs boxes")
    logger.warning(f"{message}: it can be used for inference, but not evaluated")


def _is_missing(path: str) -> bool:
    """Whether a local path is not a file (URIs, e.g. "s3://...", are not checked)."""
    return not _is_uri(path) and not os.path.isfile(path)


def _is_uri(path: str) -> bool:
    return "://" in path


def _check_image_files(
    name: str, dicts: List[Dict], *, is_train: bool, missing_images: str
) -> List[Dict]:
    """Returns ``dicts`` without the records whose image file is missing (see the module)."""
    missing = [record["file_name"] for record in dicts if _is_missing(record["file_name"])]
    if not missing:
        return dicts
    image_root = MetadataCatalog.get(name).get("image_root")
    listed = "\n  ".join(missing[:_LISTED_PATHS])
    more = (
        f"\n  ... and {len(missing) - _LISTED_PATHS} more" if len(missing) > _LISTED_PATHS else ""
    )
    message = (
        f"{len(missing)} of the {len(dicts)} images of dataset {name!r} are missing on disk "
        f"(image_root: {image_root}):\n  {listed}{more}"
    )
    if missing_images == "error":
        split = "train" if is_train else "test"
        raise FileNotFoundError(
            f'{message}\nFix the paths, or drop these images with missing_images="drop" '
            f"(command line: dataloader.{split}.dataset.missing_images=drop)"
        )
    if len(missing) == len(dicts):
        raise FileNotFoundError(f"{message}\nNo image of dataset {name!r} is left")
    evaluated = "" if is_train else " (the evaluator still counts them, without detections)"
    logger.warning(f"{message}\nThese images are dropped{evaluated}")
    missing_set = set(missing)
    return [record for record in dicts if record["file_name"] not in missing_set]


def _check_test_images_open(name: str, dicts: List[Dict]) -> None:
    """
    Raises OSError listing the images of test dataset ``name`` whose header cannot be read
    (empty or not images): found at start rather than when the evaluation after training
    reaches them. Reading the headers is cheap (about a second for COCO val2017); truncated
    image data still only shows when the image is decoded.
    """
    unreadable = []
    for record in dicts:
        path = record["file_name"]
        if _is_uri(path):
            continue
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError) as e:
            unreadable.append(f"{path} ({type(e).__name__})")
    if unreadable:
        listed = "\n  ".join(unreadable[:_LISTED_PATHS])
        raise OSError(
            f"{len(unreadable)} of the {len(dicts)} images of test dataset {name!r} cannot be "
            f"opened as images:\n  {listed}\nReplace them, or remove them from its json."
        )


def _report_degenerate_boxes(name: str, dicts: List[Dict]) -> None:
    """Logs one warning with the number of degenerate boxes of dataset ``name``, if any."""
    entries = [
        (record["file_name"], ann["bbox"], BoxMode(ann["bbox_mode"]))
        for record in dicts
        for ann in record.get("annotations", ())
    ]
    count, example = 0, None
    for mode in sorted({entry[2] for entry in entries}):
        selected = [entry for entry in entries if entry[2] == mode]
        boxes = np.asarray([entry[1] for entry in selected], dtype=np.float64)
        boxes = BoxMode.convert(boxes, mode, BoxMode.XYXY_ABS)
        degenerate = ~np.isfinite(boxes).all(axis=1)
        degenerate |= (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        indices = np.flatnonzero(degenerate)
        count += len(indices)
        if example is None and len(indices):
            file_name, box, _ = selected[indices[0]]
            example = f"{file_name}: bbox {list(box)} ({mode.name})"
    if count:
        logger.warning(
            f"Dataset {name!r} has {count} degenerate boxes (width or height <= 0, or "
            f"non-finite coordinates), e.g. {example}. Training drops them (detectron2's "
            f"filter_empty_instances); fix them in the dataset to use them"
        )


def _check_segmentations(name: str, dicts: List[Dict]) -> None:
    """
    Raises ValueError listing the non-crowd annotations of dataset ``name`` without
    "segmentation" (by file and index in the record's "annotations", as the mapper names them).
    """
    missing = [
        f"annotation {index} of {record['file_name']}"
        for record in dicts
        for index, ann in enumerate(record.get("annotations", ()))
        if ann.get("iscrowd", 0) == 0 and "segmentation" not in ann
    ]
    if missing:
        total = sum(
            ann.get("iscrowd", 0) == 0 for record in dicts for ann in record.get("annotations", ())
        )
        listed = "\n  ".join(missing[:_LISTED_PATHS])
        more = (
            f"\n  ... and {len(missing) - _LISTED_PATHS} more"
            if len(missing) > _LISTED_PATHS
            else ""
        )
        raise ValueError(
            f"{len(missing)} of the {total} non-crowd annotations of dataset {name!r} have no "
            f'"segmentation" (instance masks), which training with masks needs '
            f"(require_masks=True, the train mapper's use_instance_mask):\n  {listed}{more}\n"
            "detectron2's load_coco_json leaves the key out when the json gives no valid "
            "polygon. Add the masks, or train without them."
        )


def require_registered(name: str) -> None:
    """Raises KeyError when ``name`` is not a registered dataset, listing those that are."""
    if name not in DatasetCatalog.list():
        raise KeyError(
            f"Dataset {name!r} is not registered. Register a COCO-format dataset with "
            f"'train_net.py --register-coco {name} JSON IMAGE_ROOT' (or detectron2's "
            f"register_coco_instances). Registered: {', '.join(sorted(DatasetCatalog.list()))}"
        )


def _load_one(
    name: str, *, is_train: bool, filter_empty: bool, missing_images: str, require_masks: bool
) -> List[Dict]:
    """Loads and checks one dataset (see ``load_checked_dataset_dicts``)."""
    require_registered(name)
    with explained_json_errors(name, is_train=is_train):
        dicts = get_detection_dataset_dicts(name, filter_empty=filter_empty)
    json_file = MetadataCatalog.get(name).get("json_file")
    if not isinstance(dicts, list):
        raise TypeError(
            f"Dataset {name!r} is a {type(dicts).__name__}, not a list of dicts: use detectron2's "
            "get_detection_dataset_dicts for it"
        )
    _check_annotations_present(name, json_file, dicts, is_train=is_train)
    dicts = _check_image_files(name, dicts, is_train=is_train, missing_images=missing_images)
    if not is_train:
        _check_test_images_open(name, dicts)
    _report_degenerate_boxes(name, dicts)
    if require_masks:
        _check_segmentations(name, dicts)
    return dicts


def load_checked_dataset_dicts(
    names: Union[str, Sequence[str]],
    *,
    is_train: bool,
    filter_empty: bool = False,
    missing_images: str = "error",
    require_masks: bool = False,
) -> List[Dict]:
    """
    Loads registered datasets with detectron2's ``get_detection_dataset_dicts`` (one dataset at
    a time), checking each as described in the module docstring; errors and warnings name the
    dataset and the file.

    Args:
        names: a registered dataset name or a list of them (concatenated, in order).
        is_train: whether the datasets are for training: a missing "annotations" key or a
            dataset without annotations is then an error (a warning otherwise).
        filter_empty: drop images without non-crowd annotations (as in detectron2).
        missing_images: what to do with images listed but missing on disk: "error" (raise
            ``FileNotFoundError`` listing them) or "drop" (remove them with a warning).
        require_masks: every non-crowd annotation must have a "segmentation" (set it when the
            train mapper has ``use_instance_mask``; a config can write
            ``require_masks="${..mapper.use_instance_mask}"``).

    Returns:
        the dataset dicts of all ``names``.
    """
    if missing_images not in MISSING_IMAGES_MODES:
        raise ValueError(
            f"missing_images must be one of {MISSING_IMAGES_MODES}, got {missing_images!r}"
        )
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("names must name at least one dataset, got an empty list")
    per_dataset = [
        _load_one(
            name,
            is_train=is_train,
            filter_empty=filter_empty,
            missing_images=missing_images,
            require_masks=bool(require_masks),
        )
        for name in names
    ]
    if len(names) > 1 and all(hasattr(MetadataCatalog.get(n), "thing_classes") for n in names):
        check_metadata_consistency("thing_classes", names)
    return [record for dicts in per_dataset for record in dicts]
