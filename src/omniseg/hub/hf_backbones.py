"""HF transformers ResNet / Swin weights -> timm layouts (as used by `TimmBackbone`).

Inputs are state dicts with the model prefix already stripped (keys start at `embedder.` /
`encoder.` for ResNet, `embeddings.` / `encoder.` / `hidden_states_norms.` for Swin; a leading
`resnet.` / `swin.` is accepted too). Both the on-disk names (`attention.self.query`, written by
every transformers version) and the in-memory names of transformers >= 5 (`attention.q_proj`) are
understood.
"""

from __future__ import annotations

import re

import torch

from omniseg.hub import CheckpointError

# ------------------------------------------------------------------------------------------ ResNet


def hf_resnet_config_to_timm(cfg: dict) -> tuple[str, dict]:
    """HF `ResNetConfig` dict -> (timm model name, timm kwargs) building the same network."""
    layer_type = cfg.get("layer_type", "bottleneck")
    depths = list(cfg.get("depths", [3, 4, 6, 3]))
    hidden = list(cfg.get("hidden_sizes", [256, 512, 1024, 2048]))
    if cfg.get("downsample_in_first_stage", False):
        raise CheckpointError("HF ResNet with downsample_in_first_stage=True has no timm equivalent")
    if layer_type == "bottleneck" and cfg.get("downsample_in_bottleneck", False):
        # stride in the first 1x1 conv (original MSRA ResNet); timm strides in the 3x3 like detectron2
        raise CheckpointError("HF ResNet with downsample_in_bottleneck=True has no timm equivalent")
    if cfg.get("hidden_act", "relu") != "relu":
        raise CheckpointError(f"HF ResNet activation {cfg.get('hidden_act')!r} is not supported (relu only)")
    if layer_type == "bottleneck":
        name, channels = "resnet50", [h // 4 for h in hidden]  # HF bottleneck reduction is 4
    elif layer_type == "basic":
        name, channels = "resnet18", hidden
    else:
        raise CheckpointError(f"unknown HF ResNet layer_type {layer_type!r}")
    standard = {("resnet50", (3, 4, 6, 3)): "resnet50", ("resnet50", (3, 4, 23, 3)): "resnet101",
                ("resnet18", (2, 2, 2, 2)): "resnet18", ("resnet18", (3, 4, 6, 3)): "resnet34"}
    name = standard.get((name, tuple(depths)), name)
    if int(cfg.get("embedding_size", 64)) != 64:
        raise CheckpointError(f"HF ResNet embedding_size={cfg.get('embedding_size')}: timm's stem has 64 channels")
    kwargs = {"layers": tuple(depths), "channels": tuple(channels)}
    return name, kwargs


def _strip(sd: dict, prefixes: tuple[str, ...]) -> dict:
    out = {}
    for k, v in sd.items():
        for p in prefixes:
            if k.startswith(p):
                k = k[len(p):]
                break
        out[k] = v
    return out


def convert_hf_resnet_to_timm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF ResNetBackbone / ResNetModel keys -> timm ResNet keys (identical for features_only)."""
    sd = _strip(sd, ("resnet.",))
    out = {}
    for k, v in sd.items():
        if k.startswith("pooler") or k.startswith("classifier"):
            continue
        m = re.fullmatch(r"embedder\.embedder\.(convolution|normalization)\.(.+)", k)
        if m:
            out[("conv1." if m[1] == "convolution" else "bn1.") + m[2]] = v
            continue
        m = re.fullmatch(r"encoder\.stages\.(\d+)\.layers\.(\d+)\.(.+)", k)
        if not m:
            raise CheckpointError(f"unexpected key in HF ResNet state dict: {k}")
        stage, block, rest = int(m[1]), int(m[2]), m[3]
        prefix = f"layer{stage + 1}.{block}."
        m = re.fullmatch(r"shortcut\.(convolution|normalization)\.(.+)", rest)
        if m:
            out[prefix + ("downsample.0." if m[1] == "convolution" else "downsample.1.") + m[2]] = v
            continue
        m = re.fullmatch(r"layer\.(\d+)\.(convolution|normalization)\.(.+)", rest)
        if not m:
            raise CheckpointError(f"unexpected key in HF ResNet state dict: {k}")
        idx = int(m[1]) + 1
        out[prefix + (f"conv{idx}." if m[2] == "convolution" else f"bn{idx}.") + m[3]] = v
    return out


# -------------------------------------------------------------------------------------------- Swin

_SWIN_PRESETS = {  # (embed_dim, depths, heads) -> omniseg short name
    (96, (2, 2, 6, 2), (3, 6, 12, 24)): "swin_t",
    (96, (2, 2, 18, 2), (3, 6, 12, 24)): "swin_s",
    (128, (2, 2, 18, 2), (4, 8, 16, 32)): "swin_b",
    (192, (2, 2, 18, 2), (6, 12, 24, 48)): "swin_l",
}


def hf_swin_config_to_timm(cfg: dict) -> tuple[str, dict]:
    """HF `SwinConfig` dict -> (backbone name, timm kwargs). The kwargs fully specify the network,
    and ask for `always_partition=True`: windows and shifts never shrink with the input size, as in the
    original Swin, detectron2 and HF's SwinBackbone."""
    if cfg.get("use_absolute_embeddings", False):
        raise CheckpointError("HF Swin with absolute position embeddings is not supported")
    if cfg.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"HF Swin activation {cfg.get('hidden_act')!r} is not supported (gelu only)")
    eps = float(cfg.get("layer_norm_eps", 1e-5))
    if abs(eps - 1e-5) > 1e-12:
        raise CheckpointError(f"HF Swin layer_norm_eps={eps} differs from timm's 1e-5")
    embed_dim = int(cfg.get("embed_dim", 96))
    depths = tuple(int(d) for d in cfg.get("depths", (2, 2, 6, 2)))
    heads = tuple(int(h) for h in cfg.get("num_heads", (3, 6, 12, 24)))
    name = _SWIN_PRESETS.get((embed_dim, depths, heads), "swin_tiny_patch4_window7_224")
    image_size = cfg.get("image_size", 224)
    kwargs = {
        "embed_dim": embed_dim, "depths": depths, "num_heads": heads,
        "window_size": int(cfg.get("window_size", 7)), "mlp_ratio": float(cfg.get("mlp_ratio", 4.0)),
        "qkv_bias": bool(cfg.get("qkv_bias", True)), "patch_size": int(cfg.get("patch_size", 4)),
        "img_size": tuple(image_size) if isinstance(image_size, (list, tuple)) else int(image_size),
        "always_partition": True,
    }
    return name, kwargs


_SWIN_BLOCK_RENAMES = [  # (HF suffix, timm suffix); on-disk and transformers-5 spellings
    ("layernorm_before.", "norm1."),
    ("layernorm_after.", "norm2."),
    ("attention.self.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.relative_position_bias.relative_position_bias_table", "attn.relative_position_bias_table"),
    ("attention.output.dense.", "attn.proj."),
    ("attention.o_proj.", "attn.proj."),
    ("intermediate.dense.", "mlp.fc1."),
    ("mlp.fc1.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
    ("mlp.fc2.", "mlp.fc2."),
]
_SWIN_QKV = {"attention.self.query.": 0, "attention.self.key.": 1, "attention.self.value.": 2,
             "attention.q_proj.": 0, "attention.k_proj.": 1, "attention.v_proj.": 2}


def convert_hf_swin_to_timm(sd: dict[str, torch.Tensor], *, features_only: bool = True) -> dict[str, torch.Tensor]:
    """HF SwinModel / SwinBackbone keys -> timm SwinTransformer keys.

    q/k/v are packed into timm's `qkv`; HF's patch merging at the end of stage i becomes timm's
    downsample at the start of stage i+1 (the 2x2 concatenation order is the same in both);
    `relative_position_index` buffers and the classification `layernorm` are dropped. With
    `features_only` stages are named `layers_i` (timm's FeatureListNet), else `layers.i`.
    The backbone's per-stage output norms are not timm weights: see `hf_swin_output_norms`.
    """
    sd = _strip(sd, ("swin.",))
    stage_fmt = "layers_{}." if features_only else "layers.{}."
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    for k, v in sd.items():
        if k.startswith(("hidden_states_norms.", "layernorm.", "pooler", "classifier")):
            continue
        if k.endswith(("relative_position_index", "attn_mask")):
            continue
        if k.startswith("embeddings."):
            rest = k[len("embeddings."):]
            if rest.startswith("patch_embeddings.projection."):
                out["patch_embed.proj." + rest[len("patch_embeddings.projection."):]] = v
            elif rest.startswith("norm."):
                out["patch_embed." + rest] = v
            else:
                raise CheckpointError(f"unsupported HF Swin embedding weight {k} (absolute position embeddings?)")
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.downsample\.(.+)", k)
        if m:
            out[stage_fmt.format(int(m[1]) + 1) + "downsample." + m[2]] = v
            continue
        m = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)", k)
        if not m:
            raise CheckpointError(f"unexpected key in HF Swin state dict: {k}")
        prefix = stage_fmt.format(int(m[1])) + f"blocks.{m[2]}."
        rest = m[3]
        for hf_name, index in _SWIN_QKV.items():
            if rest.startswith(hf_name):
                qkv.setdefault(prefix + "attn.qkv." + rest[len(hf_name):], {})[index] = v
                break
        else:
            for hf_name, timm_name in _SWIN_BLOCK_RENAMES:
                if rest.startswith(hf_name):
                    out[prefix + timm_name + rest[len(hf_name):]] = v
                    break
            else:
                raise CheckpointError(f"unexpected key in HF Swin state dict: {k}")
    for key, parts in qkv.items():
        if sorted(parts) != [0, 1, 2]:
            raise CheckpointError(f"incomplete query/key/value weights for {key}")
        out[key] = torch.cat([parts[0], parts[1], parts[2]], 0)
    return out


def hf_swin_output_norms(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF SwinBackbone `hidden_states_norms.stageN.*` -> `TimmBackbone.out_norms` keys `res{N+1}.*`."""
    out = {}
    for k, v in sd.items():
        m = re.fullmatch(r"hidden_states_norms\.stage(\d+)\.(.+)", k)
        if m:
            out[f"res{int(m[1]) + 1}.{m[2]}"] = v
    return out
