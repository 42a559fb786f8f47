#!/usr/bin/env python
"""
Record what one training step of the authors' Co-DETR code computes on the tiny parity models of
``shared/reference/official_parity``: every loss term, the total, the gradients of a fixed set
of parameters and every random number drawn, so that ``tests/parity/test_training_parity.py``
can replay the step on our model; and, with ``--curve-output``, a training curve for
``tests/parity/test_training_curve.py`` and ``tools/training_curve_parity.py``. Regenerate the
fixtures with

    python tools/training_parity_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src --output tests/parity/training_reference.pt
    python tools/training_parity_official.py --codetr-root /path/to/Co-DETR \
        --mmcv-root /path/to/src --curve-output tests/parity/training_curve_reference.pt

(``--codetr-root`` / ``--mmcv-root`` as in ``tools/benchmark_official.py``, whose harness this
uses: the authors' code from source, mmcv 1.7.0 without compiled ops, the CPU stand-ins listed
there.)

The batch: the two images of the parity outputs, normalised and zero-padded as the parity
README says, with the ground truth of :data:`GROUND_TRUTH` (image 0: three objects, two of
them overlapping; image 1: one small object). Each model runs in the set-ups of :data:`SETUPS`;
a set-up edits the authors' model config (and, where a head is removed, the names of the
remaining heads' parameters, recorded with it so that our side loads the same weights).

The fixture, one dict (``torch.load(..., weights_only=True)``):
``{"images": [(H, W, 3) uint8 BGR], "gt_boxes": [(n, 4) float xyxy pixels], "gt_labels":
[(n,) int64], "models": {model: {setup: {"losses": {name: float}, "total": float,
"gradients": {authors' parameter name: Tensor}, "draws": [{"callers": innermost
first, the first with its line, "function", "value"}], "proposals": [(P, 5) RPN proposals and
scores per image, as the RoI head got them; none without it], "renamed": {old prefix: new
prefix}, "dropped": [prefix]}}}}``.

The training curve: :data:`CURVE_MODEL` with all heads (:data:`CURVE_SETUP`), ``--curve-steps``
(30) steps of plain SGD (``torch.optim.SGD`` over the parameters that require gradients,
learning rate ``--curve-lr``, momentum 0, weight decay 0, no gradient clipping) on the batch
above every step, torch seeded with ``--seed`` once before the first step. The learning rate,
:data:`CURVE_LR` = 1e-4, was chosen from 1e-4, 3e-4 and 1e-3 on this run: with 1e-4 the total
falls steadily over all 30 steps (155.7 to 94.9); with 3e-4 it is down to 89 by step 13 and
then only wanders (82.5 to 88), so that the second half of the curve trains little; with 1e-3
it jumps back up (83.2 to 94.1 at step 7) and oscillates around 88. Its fixture:
``{"images", "gt_boxes", "gt_labels"`` as above, ``"model", "setup", "lr", "seed", "trained":
[the authors' names of the parameters SGD updates], "steps": [{"losses", "total", "draws",
"proposals"} as above, of the step, before its update]}``.
"""

import argparse
import copy
import inspect
import json
import os
import sys
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional

import torch

# tools/benchmark_official.py and tools/tiny_parity_official.py, beside this file
from benchmark_official import import_authors_code
from tiny_parity_official import authors_inputs
from codetr.checkpoint import load_official_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the set-ups' checkpoint edits are shared with the tests that replay them (tests/parity)
sys.path.insert(0, REPO_ROOT)
from tests.parity import edited_state_dict  # noqa: E402

PARITY_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference", "official_parity")
MODELS = ("tiny_co_dino_5scale_r50_1x_coco", "tiny_co_deformable_detr_r50_1x_coco")
# the training curve: this model and set-up, SGD with this learning rate
CURVE_MODEL = MODELS[0]
CURVE_SETUP = "all_heads"
CURVE_LR = 1e-4

# x1, y1, x2, y2 in pixels; image 0 is 243 x 192 (H x W), image 1 183 x 215
GROUND_TRUTH = (
    ([[20.0, 30.0, 120.0, 150.0], [60.0, 80.0, 170.0, 220.0], [5.0, 5.0, 40.0, 35.0]], [3, 17, 0]),
    ([[100.0, 90.0, 116.0, 104.0]], [45]),
)

# the parameters whose gradients are recorded (authors' names; "Q." = "query_head.",
# "T." = "query_head.transformer."); those of a removed head are left out. Of the layers with
# more than 30k weights, the bias (it gets the same gradients through the layer's output).
RECORDED_PARAMETERS = (
    "backbone.conv1.weight",
    "neck.convs.1.conv.weight",
    "T.encoder.layers.0.attentions.0.sampling_offsets.weight",
    "T.encoder.layers.0.attentions.0.value_proj.weight",
    "T.decoder.layers.1.attentions.0.attn.in_proj_weight",
    "T.decoder.layers.1.attentions.1.sampling_offsets.weight",
    "T.decoder.layers.1.attentions.1.attention_weights.weight",
    "T.decoder.layers.1.attentions.1.value_proj.weight",
    "T.decoder.layers.1.attentions.1.output_proj.weight",
    "T.decoder.layers.0.attentions.1.sampling_offsets.weight",
    "T.decoder.layers.1.ffns.0.layers.0.0.weight",
    "T.decoder.layers.1.ffns.0.layers.1.weight",
    "T.decoder.ref_point_head.layers.0.weight",
    "T.decoder.ref_point_head.layers.1.weight",
    "T.query_embed.weight",
    "Q.query_embedding.weight",
    "T.pos_trans.weight",
    "T.enc_output.weight",
    "Q.cls_branches.1.weight",
    "Q.cls_branches.1.bias",
    "Q.reg_branches.1.4.weight",
    "Q.reg_branches.1.0.weight",
    "Q.cls_branches.2.weight",
    "Q.cls_branches.2.bias",
    "Q.reg_branches.2.4.weight",
    "Q.label_embedding.weight",
    "Q.downsample.0.bias",
    "T.aux_pos_trans.0.weight",
    "T.aux_pos_trans.1.weight",
    "T.pos_feats_trans.0.weight",
    "T.pos_feats_trans.1.weight",
    "T.head_pos_embed.weight",
    "rpn_head.rpn_conv.bias",
    "rpn_head.rpn_cls.weight",
    "rpn_head.rpn_reg.weight",
    "roi_head.0.bbox_head.shared_fcs.1.weight",
    "roi_head.0.bbox_head.fc_cls.weight",
    "roi_head.0.bbox_head.fc_reg.bias",
    "bbox_head.0.cls_convs.0.conv.bias",
    "bbox_head.0.atss_cls.bias",
    "bbox_head.0.atss_reg.weight",
    "bbox_head.0.atss_centerness.weight",
)


def _without_rcnn(config: Dict) -> Dict:
    """ATSS as the only auxiliary head (K = 1)."""
    config["rpn_head"] = None
    config["roi_head"] = [None]
    config["train_cfg"] = [config["train_cfg"][0], config["train_cfg"][2]]
    config["test_cfg"] = [config["test_cfg"][0], config["test_cfg"][2]]
    config["query_head"]["transformer"]["num_co_heads"] = 1
    return config


def _without_aux(config: Dict) -> Dict:
    config["rpn_head"] = None
    config["roi_head"] = [None]
    config["bbox_head"] = [None]
    return config


def _without_positive_queries(config: Dict) -> Dict:
    config["with_pos_coord"] = False
    return config


def _no_denoising_queries(gt_bboxes, gt_labels, label_embedding, img_metas):
    """Stands in for the authors' denoising generator, which their Co-DINO head requires: no
    denoising queries, no attention mask, no denoising losses (their head's own path for a
    missing ``dn_meta``)."""
    return None, None, None, None


# set-up -> (models it applies to, config edit, state-dict renames, dropped prefixes)
SETUPS = {
    "all_heads": (MODELS, lambda c: c, {}, []),
    "no_aux_heads": (MODELS, _without_aux, {}, ["rpn_head.", "roi_head.", "bbox_head."]),
    "no_positive_queries": (MODELS, _without_positive_queries, {}, []),
    # Co-Deformable-DETR only with both branches: the authors' head position embedding
    # (nn.Embedding(num_co_heads, 1, padding_idx=1)) cannot be built for one branch
    "atss_only": (
        MODELS[:1],
        _without_rcnn,
        # the ATSS head's positive-query branch is the authors' branch 1 with the RoI head, 0
        # without it
        {
            "query_head.transformer.aux_pos_trans.1.": "query_head.transformer.aux_pos_trans.0.",
            "query_head.transformer.aux_pos_trans_norm.1.": (
                "query_head.transformer.aux_pos_trans_norm.0."
            ),
            "query_head.transformer.pos_feats_trans.1.": "query_head.transformer.pos_feats_trans.0.",
            "query_head.transformer.pos_feats_norm.1.": "query_head.transformer.pos_feats_norm.0.",
        },
        [
            "rpn_head.",
            "roi_head.",
            "query_head.transformer.aux_pos_trans.0.",
            "query_head.transformer.aux_pos_trans_norm.0.",
            "query_head.transformer.pos_feats_trans.0.",
            "query_head.transformer.pos_feats_norm.0.",
        ],
    ),
    # the model is edited after it is built: see _no_denoising_queries
    "no_denoising": (MODELS[:1], lambda c: c, {}, []),
}


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--codetr-root", required=True, metavar="DIR")
    parser.add_argument("--mmcv-root", required=True, metavar="DIR")
    parser.add_argument("--parity-dir", default=PARITY_DIR, metavar="DIR")
    parser.add_argument("--output", metavar="FILE", help="the one-step fixture")
    parser.add_argument(
        "--seed", type=int, default=0, help="torch seed before each step (before the curve's run)"
    )
    parser.add_argument("--curve-output", metavar="FILE", help="the training-curve fixture")
    parser.add_argument("--curve-steps", type=int, default=30, metavar="N")
    parser.add_argument("--curve-lr", type=float, default=CURVE_LR, metavar="LR")
    parser.add_argument(
        "--all-gradients",
        action="store_true",
        help="record every parameter's gradient (to look for a difference)",
    )
    parser.add_argument("--setups", nargs="*", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args(argv)
    if not (args.output or args.curve_output):
        parser.error("nothing to record: give --output, --curve-output or both")
    return args


_RANDOM_FUNCTIONS = (
    "rand",
    "rand_like",
    "randint",
    "randint_like",
    "randn",
    "randn_like",
    "randperm",
    "multinomial",
    "normal",
    "bernoulli",
)


@contextmanager
def recorded_draws() -> Iterator[List[Dict]]:
    """Every call of torch's random functions, in order, with the calling function and result."""
    draws: List[Dict] = []
    originals = {name: getattr(torch, name) for name in _RANDOM_FUNCTIONS}

    def recording(name: str, function: Callable) -> Callable:
        def draw(*args, **kwargs):
            value = function(*args, **kwargs)
            frame = inspect.currentframe().f_back
            callers = [
                f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                f":{frame.f_lineno}"
            ]
            frame = frame.f_back
            while frame is not None and len(callers) < 8:
                callers.append(
                    f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_code.co_name}"
                )
                frame = frame.f_back
            # integers are stored as int32 to keep the fixture small
            stored = value.int() if value.dtype == torch.int64 else value.clone()
            draws.append({"callers": callers, "function": name, "value": stored})
            return value

        return draw

    for name, function in originals.items():
        setattr(torch, name, recording(name, function))
    try:
        yield draws
    finally:
        for name, function in originals.items():
            setattr(torch, name, function)


@contextmanager
def recorded_proposals(model) -> Iterator[List[torch.Tensor]]:
    """The RPN proposals the authors' RoI head receives: per image (P, 5) boxes and score,
    in their order (the test replays the order of proposals whose scores tie)."""
    proposals: List[torch.Tensor] = []
    heads = [head for head in (getattr(model, "roi_head", None) or []) if head is not None]
    if not heads:
        yield proposals
        return
    head = heads[0]
    forward_train = head.forward_train

    def recording(x, img_metas, proposal_list, *args, **kwargs):
        proposals.extend(p.detach().clone() for p in proposal_list)
        return forward_train(x, img_metas, proposal_list, *args, **kwargs)

    head.forward_train = recording
    try:
        yield proposals
    finally:
        del head.forward_train


def authors_batch(images_bgr: List[torch.Tensor]) -> Dict:
    """mmdet's training inputs: RGB, normalised, zero-padded at the bottom / right. Each
    image's ``pad_shape`` is its own size, as after the authors' ``Pad(size_divisor=1)``; the
    anchor heads' valid flags come from it."""
    batch, metas = authors_inputs(images_bgr, size_divisor=1)
    return dict(
        img=batch,
        img_metas=metas,
        gt_bboxes=[torch.tensor(boxes) for boxes, _ in GROUND_TRUTH],
        gt_labels=[torch.tensor(labels) for _, labels in GROUND_TRUTH],
    )


def authors_parameter_name(name: str) -> str:
    return name.replace("T.", "query_head.transformer.", 1).replace("Q.", "query_head.", 1)


def authors_model(*, model_name: str, setup: str, parity_dir: str) -> torch.nn.Module:
    """The authors' detector of ``setup`` with the parity weights, in training mode."""
    from mmcv import ConfigDict
    from mmdet.models import build_detector

    _, edit, renamed, dropped = SETUPS[setup]
    with open(os.path.join(parity_dir, f"{model_name}_model_config.json")) as f:
        config = edit(copy.deepcopy(json.load(f)))
    if config["query_head"].get("dn_cfg"):
        # the stored config is the one as built, after the generator's builder took its type
        config["query_head"]["dn_cfg"].setdefault("type", "CdnQueryGenerator")
    model = build_detector(ConfigDict(config))
    checkpoint = load_official_checkpoint(
        os.path.join(parity_dir, f"{model_name}_official_layout.pth")
    )
    model.load_state_dict(edited_state_dict(checkpoint, renamed, dropped), strict=True)
    if setup == "no_denoising":
        model.query_head.dn_generator = _no_denoising_queries
    return model.train()


def step_record(
    *,
    model: torch.nn.Module,
    losses: Dict[str, torch.Tensor],
    draws: List[Dict],
    proposals: List[torch.Tensor],
) -> Dict:
    """Backward of the total of ``losses`` (``model.forward_train``'s), and what a step records:
    the loss terms, the total, the forward pass's random draws and RoI-head proposals (the
    gradients stay on the parameters)."""
    total, log_vars = model._parse_losses(losses)
    total.backward()
    return {
        # "loss" is _parse_losses' total, recorded as "total"
        "losses": {k: float(v) for k, v in log_vars.items() if "loss" in k and k != "loss"},
        "total": float(total),
        "draws": draws,
        "proposals": proposals,
    }


def training_step(
    model_name: str, setup: str, images_bgr: List[torch.Tensor], args: argparse.Namespace
) -> Dict:
    model = authors_model(model_name=model_name, setup=setup, parity_dir=args.parity_dir)
    torch.manual_seed(args.seed)
    # forward_train is called here, not in a helper: each draw records its callers, and those of
    # the fixture are kept as they are
    with recorded_draws() as draws, recorded_proposals(model) as proposals:
        losses = model.forward_train(**authors_batch(images_bgr))
    step = step_record(model=model, losses=losses, draws=draws, proposals=proposals)
    parameters = dict(model.named_parameters())
    if args.all_gradients:
        names = [n for n, p in parameters.items() if p.grad is not None]
    else:
        names = [authors_parameter_name(n) for n in RECORDED_PARAMETERS]
        names = [n for n in names if n in parameters and parameters[n].grad is not None]
    _, _, renamed, dropped = SETUPS[setup]
    return {
        "losses": step["losses"],
        "total": step["total"],
        "gradients": {n: parameters[n].grad.detach().clone() for n in names},
        "draws": step["draws"],
        "proposals": step["proposals"],
        "renamed": renamed,
        "dropped": dropped,
    }


def training_curve(
    *, images_bgr: List[torch.Tensor], steps: int, lr: float, seed: int, parity_dir: str
) -> Dict:
    """``steps`` SGD steps of the authors' :data:`CURVE_MODEL` (:data:`CURVE_SETUP`) on the
    same batch: the names of the parameters it trains, and per step what
    :func:`step_record` records, before the step's update."""
    model = authors_model(model_name=CURVE_MODEL, setup=CURVE_SETUP, parity_dir=parity_dir)
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    # plain SGD (momentum 0, weight decay 0, no clipping); parameters without a gradient in a
    # step (modules the losses do not reach) are skipped by torch's SGD
    optimizer = torch.optim.SGD([p for _, p in trained], lr=lr)
    torch.manual_seed(seed)
    records = []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with recorded_draws() as draws, recorded_proposals(model) as proposals:
            losses = model.forward_train(**authors_batch(images_bgr))
        records.append(step_record(model=model, losses=losses, draws=draws, proposals=proposals))
        optimizer.step()
    return {"trained": [n for n, _ in trained], "steps": records}


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    import_authors_code(args)
    torch.use_deterministic_algorithms(True)
    # both models' outputs hold the same two images
    images_bgr = torch.load(
        os.path.join(args.parity_dir, f"{MODELS[0]}_official_outputs.pt"), weights_only=True
    )["images_bgr"]
    batch = {
        "images": list(images_bgr),
        "gt_boxes": [torch.tensor(boxes) for boxes, _ in GROUND_TRUTH],
        "gt_labels": [torch.tensor(labels) for _, labels in GROUND_TRUTH],
    }
    if args.output:
        reference = {**batch, "models": {}}
        for model_name in args.models:
            for setup in args.setups:
                if model_name not in SETUPS[setup][0]:
                    continue
                step = training_step(model_name, setup, images_bgr, args)
                reference["models"].setdefault(model_name, {})[setup] = step
                print(
                    f"{model_name} {setup}: total {step['total']:.6f}, "
                    f"{len(step['losses'])} losses, {len(step['gradients'])} gradients, "
                    f"{len(step['draws'])} draws"
                )
        torch.save(reference, args.output)
    if args.curve_output:
        run = training_curve(
            images_bgr=images_bgr,
            steps=args.curve_steps,
            lr=args.curve_lr,
            seed=args.seed,
            parity_dir=args.parity_dir,
        )
        for i, step in enumerate(run["steps"]):
            print(f"{CURVE_MODEL} step {i}: total {step['total']:.6f}")
        curve = {
            **batch,
            "model": CURVE_MODEL,
            "setup": CURVE_SETUP,
            "lr": args.curve_lr,
            "seed": args.seed,
            **run,
        }
        torch.save(curve, args.curve_output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
