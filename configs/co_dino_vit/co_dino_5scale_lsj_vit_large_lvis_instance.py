"""Co-DINO-Inst ViT-L (EVA-02) on LVIS v1: the authors'
``co_dino_5scale_lsj_vit_large_lvis_instance.py``, their ViT-L LVIS recipe
(``co_dino_5scale_lsj_vit_large_lvis.py``: LSJ at 1536, repeat-factor sampling) with a mask branch
on the query head's boxes (RefineMask-style head, class-agnostic last stage, 112x112 masks,
MaskIoU mask scoring; ``codetr.modeling.mask_heads``; mask loss weight 1.0, MaskIoU 0.5, both x
lambda_2 x 6 decoder layers), trained on LVIS's instance masks with the authors' copy-paste
(``configs/common/data/coco_lsj_instance.py``'s settings: bitmask masks, up to 100 objects pasted
from another image). ``LVISEvaluator`` scores bbox and segm.
"""

from detectron2.config import LazyCall as L

from codetr.data.copy_paste import CopyPaste
from codetr.engine import LazyPartial
from codetr.modeling.mask_heads import build_query_mask_branch

from .co_dino_5scale_lsj_vit_large_lvis import dataloader, lr_multiplier, model, optimizer, train

model.mask_branch = LazyPartial(build_query_mask_branch)(mask_loss_weight=1.0)

# the masks and copy-paste of configs/common/data/coco_lsj_instance.py, on the LVIS LSJ mapper
dataloader.train.dataset.require_masks = "${..mapper.use_instance_mask}"
dataloader.train.mapper.use_instance_mask = True
dataloader.train.mapper.instance_mask_format = "bitmask"
dataloader.train.mapper.copy_paste = L(CopyPaste)(
    max_num_pasted=100, bbox_occluded_thr=10, mask_occluded_thr=300, selected=True
)
dataloader.evaluator.tasks = None

train.output_dir = "./output/co_dino_5scale_lsj_vit_large_lvis_instance"
