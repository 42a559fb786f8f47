"""
Toy Co-DINO-Inst: ``co_dino_toy.py`` (same data, seed, schedule, auxiliary heads and positive
queries) with the authors' Co-DINO-Inst mask branch on the query head's boxes at the toy width
(64-channel RefineMask-style head, the authors' four stages to 112 x 112, a 256-wide MaskIoU
head, 128 sampled boxes per image), trained on the toy shapes' exact polygon masks. It is
evaluated as bbox and segm.

    python train_net.py --config-file configs/toy/co_dino_inst_toy.py
"""

from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import build_query_mask_branch

from .co_dino_toy import dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = LazyPartial(build_query_mask_branch)(
    conv_dim=64, mask_iou_fc_dim=256, batch_size_per_image=128, mask_loss_weight=1.33
)
dataloader.train.mapper.use_instance_mask = True
dataloader.train.dataset.require_masks = "${..mapper.use_instance_mask}"
dataloader.evaluator.tasks = None

train.output_dir = "./output/toy/co_dino_inst"
