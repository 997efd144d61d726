"""Every preset shrunk to a model that trains and predicts in seconds on 64 px images: one rule per family
(TINY) and one per kind of backbone. Used by the contract test and the server's per-family test."""

from __future__ import annotations

from omniseg.config import load_config
from omniseg.models.registry import family_of

# Per family: overrides that shrink any of its presets to seconds on 64 px images. Keys the family does
# not declare would fail loudly (checked configs), so a renamed setting shows up here.
TINY = {
    "maskformer": ["model.hidden_dim=32", "model.conv_dim=32", "model.mask_dim=32", "model.nheads=2",
                   "model.dim_feedforward=64", "model.enc_layers=1", "model.enc_dim_feedforward=64",
                   "model.num_queries=8", "model.dec_layers=2", "model.loss.train_num_points=256",
                   "model.test.object_mask_threshold=0.2"],
    "per_pixel": ["model.head_width=32", "model.jpu_width=16", "model.shape_width=16", "model.aspp_rates=[1,2,3]"],
    "segvit": ["model.hidden_dim=32", "model.nheads=2", "model.dec_layers=1", "model.qu_layers=1",
               "model.qu_grid=16"],  # grid queries: 16 x 16 patches of 8 px, the synthetic images' 128 px
    "rcnn": ["model.fpn_dim=32", "model.rpn.anchor_sizes=[8,16,32,64,128]", "model.rpn.batch_size_per_image=64",
             "model.rpn.pre_nms_topk_train=300", "model.rpn.post_nms_topk_train=100", "model.rpn.pre_nms_topk_test=200",
             "model.rpn.post_nms_topk_test=50", "model.roi.batch_size_per_image=64", "model.roi.box_head_dim=64",
             "model.roi.mask_head_dim=32", "model.test.score_thresh=0.0"],
    "blendmask": ["model.fpn_channels=32", "model.blendmask.basis_channels=16", "model.blendmask.bottom_resolution=16",
                  "model.blendmask.test.score_threshold=0.0"],
}
TINY["oneformer"] = TINY["maskformer"] + [
    "model.oneformer.n_ctx=2", "model.oneformer.text_width=32", "model.oneformer.text_layers=1",
    "model.oneformer.text_vocab_size=32", "model.oneformer.text_context_length=8"]


def _tiny_backbone(cfg) -> list[str]:
    """The preset's kind of backbone (ResNet, Swin or ViT), at a few channels and blocks."""
    name = str(cfg.model.backbone)
    if name.startswith("vit"):
        if cfg.model.arch == "segvit":
            return ["model.backbone=vit_tiny_patch16_224", "model.vit_out_indices=[1,2,3]", "model.qd_index=1",
                    "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2}"]
        return ["model.backbone=vit_tiny_patch16_224",
                "model.backbone_kwargs={patch_size: 8, embed_dim: 32, depth: 4, num_heads: 2, out_indices: [0,1,2,3]}"]
    if "swin" in name:
        return ["model.backbone=swin_t", "model.backbone_norm=bn",
                "model.backbone_kwargs={embed_dim: 16, depths: [2, 2, 2, 2], num_heads: [1, 1, 2, 2]}"]
    return ["model.backbone=resnet18", "model.backbone_norm=bn",
            "model.backbone_kwargs={layers: [1, 1, 1, 1], channels: [16, 32, 64, 64]}"]


def tiny_config(preset: str, synth_root, out_dir):
    cfg = load_config(preset)
    family = family_of(cfg.model.arch).name
    assert family in TINY, f"family {family}: add its tiny sizes to TINY in {__file__}"
    # The recipes' resizes (800 px short sides, MMSeg's 2048 x 512) and test windows are full-size: tiny runs
    # jitter 64 px crops out of the 128 px synthetic images and predict them whole.
    data = [f"data.root={synth_root}", "data.train_resize=scale_jitter", "data.crop_size=64",
            "data.scale_range=[0.8,1.2]", "data.cat_max_ratio=1.0", "data.batch_size=2", "data.num_workers=0",
            "data.min_size_test=null", "data.max_size_test=null", "inference.mode=whole",
            "train.amp=none", f"train.output_dir={out_dir}"]  # (the COCO recipes' fp16 is slow on CPUs)
    for split in ("train", "val"):
        data += [f"data.{split}.format=synthetic", f"data.{split}.root={synth_root}", f"data.{split}.preset=null"]
    extra = []
    if family == "rcnn" and cfg.model.roi.head_norm == "gn":  # PANet's fused fc branch: mask_head_dim / 2 channels
        extra.append("model.roi.mask_head_dim=64")            # in GroupNorm's 32 groups
    return load_config(preset, [*_tiny_backbone(cfg), *TINY[family], *data, *extra])
