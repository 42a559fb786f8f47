"""
A LazyConfig as a job uses it: loaded with command-line overrides that are checked against
the config (unknown keys and wrong types are refused before anything is built), and completed
from its dataset (the class count); and :class:`LazyPartial`, the config entry of a part whose
remaining arguments its owner supplies.
"""

import difflib
import functools
import inspect
import logging
import os
from typing import Any, Callable, List, Sequence

from detectron2.config import LazyCall, LazyConfig
from detectron2.utils.registry import locate
from omegaconf import DictConfig, ListConfig, OmegaConf

from codetr.data import thing_class_count

__all__ = ["LazyPartial", "check_training_masks", "load_lazy_config", "sync_num_classes"]

logger = logging.getLogger(__name__)


def load_lazy_config(config_file: str, overrides: Sequence[str] = ()) -> DictConfig:
    """
    Load a LazyConfig file and apply command-line overrides.

    Args:
        config_file: path of a ``.py`` (or saved ``.yaml``) LazyConfig.
        overrides: ``"a.b=value"`` strings (hydra override grammar). A key must exist in
            the config, or be a named argument of the class or function of a ``LazyCall`` /
            ``LazyPartial`` entry (``model.aux_heads.0.mask_on``); ``"+a.b=value"`` adds
            any new key.

    Returns:
        the config.

    Raises:
        FileNotFoundError: if ``config_file`` does not exist.
        KeyError: if an override names a key that the config does not have.
        ValueError: if an override is not of the form ``key=value``.
    """
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"Config file {config_file!r} does not exist")
    cfg = LazyConfig.load(config_file)
    defaults = {}
    for override in overrides:
        key = _check_override_key(cfg, override, config_file)
        defaults[override] = (key, OmegaConf.select(cfg, key, default=None))
    cfg = LazyConfig.apply_overrides(cfg, list(overrides))
    for override, (key, default) in defaults.items():
        _check_override_type(override, key, default, OmegaConf.select(cfg, key, default=None))
    return cfg


def _check_override_key(cfg: DictConfig, override: str, config_file: str) -> str:
    """The key of ``override``; raises when it is malformed or names no key of ``cfg``."""
    key, sep, _ = override.partition("=")
    if not sep or not key.lstrip("+"):
        raise ValueError(f"Override {override!r} is not of the form key=value")
    if key.startswith("+"):
        return key[1:]  # hydra's syntax to add a key
    missing = object()
    if OmegaConf.select(cfg, key, default=missing) is not missing:
        return key

    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, default=None) if parent_key else cfg
    if leaf in _call_arguments(parent):
        return key  # an argument of the entry's class or function that the config leaves out
    hint = ""
    if isinstance(parent, DictConfig):
        prefix = f"{parent_key}." if parent_key else ""
        close = difflib.get_close_matches(leaf, [str(k) for k in parent.keys()], n=3)
        if close:
            hint = " Did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    raise KeyError(
        f"Override {override!r}: the config {config_file!r} has no key {key!r}.{hint} "
        f"Write '+{key}=...' to add a new key."
    )


def _call_arguments(node: Any) -> List[str]:
    """The named arguments of the callable of a ``LazyCall`` / ``LazyPartial`` entry."""
    if not isinstance(node, DictConfig):
        return []
    target = node.get("_partial_target_", node.get("_target_"))
    if target is None:
        return []
    if isinstance(target, str):
        target = locate(target)
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in parameters if p.kind in named]


def _check_override_type(override: str, key: str, default: Any, value: Any) -> None:
    """
    Raises TypeError when an override gives a number or boolean field of the config a value
    of another type (``train.max_iter=abc``, ``train.amp.enabled=yes``), which would otherwise
    fail deep inside training. An integer is accepted for a float field; ``null`` is accepted
    everywhere (constructors take optional arguments); other fields take any value.
    """
    if value is None or default is None:
        return
    if isinstance(default, bool):
        expected, accepted = "a boolean (true or false)", isinstance(value, bool)
    elif isinstance(default, int):
        expected = "an integer"
        accepted = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        expected = "a number"
        accepted = isinstance(value, (int, float)) and not isinstance(value, bool)
    else:
        return
    if not accepted:
        raise TypeError(
            f"Override {override!r}: {key} expects "
            f"{expected} (the config has {default!r}), got {type(value).__name__} {value!r}"
        )


def sync_num_classes(cfg: DictConfig, *, eval_only: bool = False) -> None:
    """
    Sets ``cfg.model.query_head.num_classes`` (the one place configs keep the class count;
    every other module reads it from there) to the class count of the dataset the job uses:
    the first training dataset, or the first test dataset with ``eval_only``.
    """
    if "num_classes" not in cfg.model.get("query_head", {}):
        return
    loader = cfg.dataloader.test if eval_only else cfg.dataloader.train
    names = loader.dataset.names
    name = names[0] if isinstance(names, (list, tuple, ListConfig)) else names
    count = thing_class_count(name)
    if cfg.model.query_head.num_classes != count:
        logger.info(
            f"model.query_head.num_classes: {cfg.model.query_head.num_classes} -> {count}, "
            f"the number of thing_classes of {name!r}"
        )
        cfg.model.query_head.num_classes = count


def check_training_masks(cfg: DictConfig) -> None:
    """
    Raises ``ValueError`` before training when the model trains on instance masks (an
    auxiliary head with ``mask_on``, or a ``model.mask_branch``) but the training data mapper
    gives none (``dataloader.train.mapper.use_instance_mask`` not set), instead of at the first
    batch with objects.
    """
    needing = [
        f"model.aux_heads.{index}.mask_on"
        for index, head in enumerate(cfg.model.get("aux_heads") or [])
        if head.get("mask_on")
    ]
    if cfg.model.get("mask_branch") is not None:
        needing.append("model.mask_branch")
    mapper = cfg.get("dataloader", {}).get("train", {}).get("mapper", {})
    if needing and not mapper.get("use_instance_mask"):
        raise ValueError(
            f"{' and '.join(needing)} train(s) on instance masks, but the training data has "
            f"none: set dataloader.train.mapper.use_instance_mask=True"
        )


class LazyPartial:
    """
    detectron2's ``LazyCall`` for a part that its owner finishes building: the config entry
    ``LazyPartial(ATSSHead)(num_convs=1)`` instantiates to ``functools.partial(ATSSHead,
    num_convs=1)``, and ``CoDETR`` calls it with the arguments it derives (the input shapes of
    the auxiliary heads, the head count of the positive queries), so that no config states
    them. The entry's keys are overridden like any other (``model.aux_heads.1.num_convs=2``).
    """

    def __init__(self, target: Callable[..., Any]):
        if not callable(target):
            raise TypeError(f"LazyPartial needs a callable, got {target!r}")
        self._target = target

    def __call__(self, **kwargs) -> DictConfig:
        # the target is kept by name, as LazyConfig.save writes a _target_
        name = f"{self._target.__module__}.{self._target.__qualname__}"
        return LazyCall(bind_partial)(_partial_target_=name, **kwargs)


def bind_partial(*, _partial_target_: str, **kwargs) -> functools.partial:
    """
    What a :class:`LazyPartial` entry instantiates to. Arguments the target does not take
    are refused here, when the config is instantiated, naming the target and the keys.
    """
    target = locate(_partial_target_)
    try:
        inspect.signature(target).bind_partial(**kwargs)
    except TypeError as error:
        raise TypeError(f"{_partial_target_}: {error} (given {sorted(kwargs)})") from None
    return functools.partial(target, **kwargs)
