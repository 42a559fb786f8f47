"""
Training settings read by ``codetr.engine.LazyConfigTrainer`` (and ``train_net.py``),
defaulting to the authors' 1x COCO recipe: 12 epochs of 7393 iterations at a total batch of
16, a checkpoint and an evaluation after every epoch, global gradient-norm clipping at 0.1.
"""

from detectron2.config import LazyCall as L

from codetr.engine import default_device

from .schedule import COCO_ITERS_PER_EPOCH

train = dict(
    output_dir="./output",
    # Model weights to start from (ignored by --resume when output_dir has a checkpoint).
    init_checkpoint="",
    # init_checkpoint must fill at least this share of the model's tensors (0: at least one),
    # and, when it holds backbone weights only, this share of the backbone's tensors.
    init_checkpoint_min_loaded=dict(model=0.0, backbone=0.5),
    max_iter=12 * COCO_ITERS_PER_EPOCH,
    # Automatic mixed precision; precision "auto" is float16 on CUDA, bfloat16 on CPU.
    amp=dict(enabled=False, precision="auto"),
    # Autocast at inference: evaluation (also during training) and LazyPredictor / demo.py.
    # Independent of `amp`; see README "Speed" for its speed and accuracy on CPU.
    inference_amp=dict(enabled=False, precision="auto"),
    # Keyword arguments of DistributedDataParallel (when there are several processes).
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    # PeriodicCheckpointer: max_to_keep=None keeps every checkpoint, as the authors do.
    checkpointer=dict(period=COCO_ITERS_PER_EPOCH, max_to_keep=None),
    eval_period=COCO_ITERS_PER_EPOCH,
    log_period=50,
    # "cuda" when a GPU is visible, else "cpu"; decided when the config is used.
    device=L(default_device)(),
    # >= 0: reproducible runs and exact resume; < 0: a random seed.
    seed=0,
    clip_grad=dict(enabled=True, max_norm=0.1, norm_type=2.0),
    # An exponential moving average (EMA) of the weights (codetr/engine/ema.py), updated after
    # every iteration t with the decay decay * (1 - exp(-(t + 1) / warmup_iters)) (`decay` when
    # warmup_iters=0). Checkpoints hold it as "model_ema" next to the raw weights ("model");
    # evaluation (also with --eval-only) then uses it. The authors train ViT-L Co-DINO with
    # enabled=True, decay=0.9999, warmup_iters=2000 (mmdet's ExpMomentumEMAHook, momentum=1e-4).
    model_ema=dict(enabled=False, decay=0.9999, warmup_iters=2000),
    # Unreadable training images are skipped with a warning; the run stops once more than this
    # fraction of the training set has been skipped.
    max_skipped_image_fraction=0.01,
)
