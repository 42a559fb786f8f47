"""
The built-in synthetic "toy shapes" detection dataset (COCO format, generated on demand), for
the toy configs, the demo and the tests. Apart from the model package: nothing is registered
until ``register_toy_datasets()`` is called.
"""

from .shapes import (
    TOY_DATASET_SPLITS,
    TOY_THING_CLASSES,
    ToySplit,
    default_toy_root,
    ensure_toy_dataset,
    generate_toy_dataset,
    register_toy_datasets,
)

__all__ = [
    "TOY_DATASET_SPLITS",
    "TOY_THING_CLASSES",
    "ToySplit",
    "default_toy_root",
    "ensure_toy_dataset",
    "generate_toy_dataset",
    "register_toy_datasets",
]
