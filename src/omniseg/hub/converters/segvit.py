"""SegViT's official `.pth` releases (zbwxp/SegVit, MMSeg 0.24) -> omniseg's `segvit`.

Two layouts are released: the plain ViT with the ATM head (`ATMHead`: ViT-B and ViT-L on ADE20K,
COCO-Stuff-10K, PASCAL-Context) and SegViT-Shrunk (`vit_shrink` + `TPNATMHead`: ViT-L). The ViT is
MMSeg's (`mmseg_vit` maps it) with `with_cls_token=False` and bicubic position-embedding resizing.
The Shrunk head's query upsampling is a learned grid of (crop / 16)^2 queries reading the tokens entering
query downsampling, then the deep ones (omniseg's `qu_mode: grid`), followed by a single-stage ATM
decoder without input projection. What the tensors cannot say comes from the official configs: the
tapped blocks (5, 7, 11 for ViT-B; 7, 15, 23 for ViT-L), the QD block (8 of 24: a third of the depth),
ATM heads = ViT heads, mean/std 127.5 (the `jax` configs).

SegViT v2 (Shrunk++, BEiT-v2 backbones) has no released code or checkpoints, so it has no layout here.
"""

from __future__ import annotations

from pathlib import Path

from omniseg.hub import load_state_dict_file
from omniseg.hub.converters import Conversion
from omniseg.hub.converters.mmseg_vit import read_vit_layout, vit_backbone_kwargs, vit_backbone_tensors, yaml_value
from omniseg.hub.errors import CheckpointError

# The official configs' taps (configs/_base_/models/seg_vit-b16.py, configs/segvit/*vit-l*).
OFFICIAL_OUT_INDICES = {12: [5, 7, 11], 24: [7, 15, 23]}
# The official test_cfg sliding-window stride per crop size (ADE20K ViT-L 640; ViT-B and COCO-Stuff-10K 512;
# PASCAL-Context 480); other crops: two thirds of the crop, as most of them.
OFFICIAL_SLIDE_STRIDE = {640: 608, 512: 341, 480: 320}
_CROSS_ATTENTION = {"multihead_attn.q.": "cross_attn.q_proj.", "multihead_attn.k.": "cross_attn.k_proj.",
                    "multihead_attn.v.": "cross_attn.v_proj.", "multihead_attn.proj.": "cross_attn.out_proj.",
                    "linear1.": "ffn.0.", "linear2.": "ffn.3."}


def _count(sd: dict, prefix: str) -> int:
    """How many numbered children `prefix<N>.` the checkpoint has."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def _stage_count(sd: dict, prefix: str) -> int:
    """How many `<prefix>decoder_<i>` stages (1-based names) the head has."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix + "decoder_")})


def _atm_layers(sd: dict, theirs: str, ours: str, out: dict, used: set) -> None:
    """One official ATM decoder stage (TPN_Decoder of TPN_DecoderLayer) -> omniseg ATMLayers."""
    for key, value in sd.items():
        if not key.startswith(theirs):
            continue
        index, part = key[len(theirs):].split(".", 1)
        for a, b in _CROSS_ATTENTION.items():
            if part.startswith(a):
                part = b + part[len(a):]
                break
        out[f"{ours}{index}.{part}"] = value
        used.add(key)


def _copy(sd: dict, theirs: str, ours: str, out: dict, used: set) -> None:
    for key, value in sd.items():
        if key.startswith(theirs):
            out[ours + key[len(theirs):]] = value
            used.add(key)


def convert(source: Path, preset=None) -> Conversion:
    """A SegViT release (plain ATM or Shrunk TPN head, told apart by `decode_head.atm.*`) -> `segvit`, the
    config following the checkpoint: ViT size and pre-training grid, taps, ATM width / heads / layers,
    Shrunk QD block and query grid. Only the loss's class-weight buffers are left out."""
    sd = load_state_dict_file(source)
    if "backbone.patch_embed.projection.weight" not in sd:
        raise CheckpointError(f"{source}: not a SegViT checkpoint (no MMSeg ViT backbone: "
                              f"backbone.patch_embed.projection.weight)")
    shrunk = "decode_head.atm.q.weight" in sd
    head = "decode_head.atm." if shrunk else "decode_head."
    if head + "q.weight" not in sd or head + "class_embed.weight" not in sd:
        raise CheckpointError(f"{source}: not a SegViT ATM head (no {head}q.weight / {head}class_embed.weight)")
    layout = read_vit_layout(sd, source)
    if layout.final_norm:
        raise CheckpointError(f"{source}: SegViT's ViT has final_norm=False, but the checkpoint has backbone.ln1")
    num_classes, dim = (int(d) for d in sd[head + "q.weight"].shape)
    if tuple(sd[head + "class_embed.weight"].shape) != (num_classes + 1, dim):
        raise CheckpointError(f"{source}: {head}class_embed.weight {tuple(sd[head + 'class_embed.weight'].shape)} "
                              f"is not ({num_classes + 1}, {dim})")
    out, used = vit_backbone_tensors(sd, "backbone.", "backbone.body.")
    name, kwargs = vit_backbone_kwargs(layout, keep_cls_token=False)
    overrides = [f"model.backbone={name}", f"model.hidden_dim={dim}", f"model.nheads={layout.num_heads}",
                 "model.upsample_mask_logits=true", "model.pixel_mean=[127.5,127.5,127.5]",
                 "model.pixel_std=[127.5,127.5,127.5]", "model.continual.steps=null", "model.continual.step=null",
                 f"data.min_size_test={layout.img_size}"]  # the official test scale: the crop (PASCAL-Context: 520)
    overrides += [f"model.backbone_kwargs.{k}={yaml_value(v)}" for k, v in kwargs.items()]
    _copy(sd, head + "q.", "decoders.0.class_tokens.", out, used)
    _copy(sd, head + "class_embed.", "decoders.0.class_head.", out, used)
    if shrunk:
        stages = _stage_count(sd, "decode_head.")
        if stages != 2 or _stage_count(sd, head) != 1 or any(k.startswith(head + "input_proj_") for k in sd):
            raise CheckpointError(f"{source}: a Shrunk TPN head reads 2 stages (found {stages}) into a single-stage "
                                  f"ATM head without input projection")
        qu_layers = _count(sd, "decode_head.decoder_1.layers.")
        grid = int(round(sd["decode_head.q.weight"].shape[0] ** 0.5))
        if grid * grid != sd["decode_head.q.weight"].shape[0]:
            raise CheckpointError(f"{source}: {sd['decode_head.q.weight'].shape[0]} TPN queries are not a square grid")
        _copy(sd, "decode_head.q.", "qu.queries.", out, used)
        for i in (1, 2):
            _copy(sd, f"decode_head.input_proj_{i}.", f"qu.input_proj.{i - 1}.0.", out, used)
            _copy(sd, f"decode_head.proj_norm_{i}.", f"qu.input_proj.{i - 1}.1.", out, used)
            # both sides are nn.TransformerDecoderLayer: the names inside match
            _copy(sd, f"decode_head.decoder_{i}.layers.", f"qu.stages.{i - 1}.", out, used)
        dec_layers = _count(sd, head + "decoder_1.layers.")
        _atm_layers(sd, head + "decoder_1.layers.", "decoders.0.layers.0.", out, used)
        qd_index = layout.depth // 3  # the official shrink_idx 8 of 24 blocks
        crop = grid * layout.patch_size
        overrides += ["model.shrink=shrunk", f"model.qd_index={qd_index}", "model.qu_mode=grid",
                      f"model.qu_grid={grid}", f"model.qu_layers={qu_layers}", f"model.dec_layers={dec_layers}",
                      # the taps the Shrunk head reads are fixed by QD; the plain taps are unused
                      f"model.vit_out_indices=[{qd_index - 1},{layout.depth - 1}]",
                      # the learned queries cover one crop: the official test_cfg slides crop-sized windows
                      "inference.mode=slide", f"inference.crop_size={crop}",
                      f"inference.stride={OFFICIAL_SLIDE_STRIDE.get(crop, crop * 2 // 3)}"]
    else:
        stages = _stage_count(sd, head)
        taps = OFFICIAL_OUT_INDICES.get(layout.depth) or [layout.depth * (i + 1) // stages - 1 for i in range(stages)]
        if len(taps) != stages:
            raise CheckpointError(f"{source}: an ATM head with {stages} stages on a {layout.depth}-block ViT; the "
                                  f"official configs tap {len(taps)} blocks ({taps})")
        dec_layers = _count(sd, head + "decoder_1.layers.")
        for i in range(1, stages + 1):
            _copy(sd, f"{head}input_proj_{i}.", f"decoders.0.input_proj.{i - 1}.0.", out, used)
            _copy(sd, f"{head}proj_norm_{i}.", f"decoders.0.input_proj.{i - 1}.1.", out, used)
            _atm_layers(sd, f"{head}decoder_{i}.layers.", f"decoders.0.layers.{i - 1}.", out, used)
        overrides += ["model.shrink=null", f"model.vit_out_indices={yaml_value(taps)}",
                      f"model.dec_layers={dec_layers}"]
    ignored = {}
    for key, value in sd.items():
        if key in used:
            continue
        if key.endswith("loss_decode.criterion.empty_weight"):
            ignored[key] = "the ATM loss's class weights (a training buffer; omniseg's are model.loss.eos_coef)"
        else:
            out[key] = value  # left for the unmapped-tensor check to report
    return Conversion(out, overrides, num_classes, ignored)

