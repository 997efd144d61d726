"""Export the inference network of an omniseg model (torch.export or ONNX).

The exported graph is the network only: uint8 RGB images [B, 3, H, W] (H, W fixed at export time, or
with `dynamic` any multiple of 32 from the sidecar's `dynamic.min` up; pad or resize to them) -> class
logits [B, Q, K+1] and mask logits [B, Q, H/4, W/4]. Normalisation
is inside the graph. Post-processing (which keeps a data-dependent number of segments) stays in
Python: `omniseg.export.postprocess_exported` turns the two outputs into the usual prediction dict,
so a deployment needs no omniseg model code. MP-Former exports exactly as Mask2Former: mask piloting
exists only in training. OneFormer exports one graph per task (the task token is a constant of the
graph); its text mapper, training-only, is left out.

A JSON sidecar (`<output>.json`) records the input size, output names, class names and thing ids.

Dynamic sizes: the graph is traced at `DYNAMIC_TRACE_SIZE` (or the size asked, if larger) with symbolic
height and width. Tracing fixes whatever the example size decides (a feature map of one pixel, one row
of Swin windows), which a large example keeps to facts that hold for every larger size; the smallest
size the graph accepts is then found by running it (`_smallest_accepted`) and recorded, so a deployment
knows the range instead of meeting a guard failure (torch.export) or a silently wrong graph (ONNX).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from omniseg.models.base import Segmenter, semantic_results

FORMATS = ("torch-export", "onnx")
OUTPUT_DOCS = {
    "pred_logits": "[B, Q, K+1] class logits (last = no object)",
    "pred_masks": "[B, Q, H/4, W/4] mask logits",
    "sem_seg": "[B, K, H, W] per-pixel class logits",
    "boxes": "[N, 4] detections' boxes, xyxy in input pixels (N varies with the image)",
    "labels": "[N] detections' class ids",
    "scores": "[N] detections' scores, decreasing",
    "mask_probs": "[N, 28, 28] mask probabilities inside each box (to paste: instances_from_exported)",
    "mask_logits": "[N, R, R] mask logits inside each box (to paste: instances_from_exported)",
    "stuff_logits": "[1 + S, H/4, W/4] stuff logits (channel 0: things), S = len(stuff_ids)",
}


class InferenceGraph(nn.Module):
    """uint8 images -> the model's raw outputs (`model.raw_output_names`: mask classification
    pred_logits, pred_masks of the last decoder layer; per-pixel sem_seg); nothing training-only.
    A model whose network cannot be exported is refused with its `export_refusal()` reason."""

    def __init__(self, model: Segmenter, task: str | None = None):
        super().__init__()
        reason = model.export_refusal()
        if reason:
            raise ValueError(reason)
        self.options = model.raw_forward_options(task)  # refuses a task for models that take none
        # A shallow copy without the training-only children and parameters (model.training_only: losses,
        # MP-Former's piloting, OneFormer's text mapper), so their weights stay out of the export.
        skip = set(model.training_only)
        inference = copy.copy(model)
        inference._modules = {k: v for k, v in model._modules.items() if k not in skip}
        inference._parameters = {k: v for k, v in model._parameters.items() if k not in skip}
        self.model = inference
        self.output_names = tuple(model.raw_output_names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model.forward_raw(self.model.normalize(images), **self.options)
        return tuple(outputs[name] for name in self.output_names)


DYNAMIC_TRACE_SIZE = 512
DYNAMIC_MAX_SIZE = 8192
SIZE_MULTIPLE = 32


def check_export_request(fmt: str, height: int, width: int) -> None:
    """ValueError unless `fmt` is known and the size is a multiple of the backbone's stride (32)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if height % 32 or width % 32:
        raise ValueError(f"--height/--width must be multiples of 32 (the backbone's stride; pad images to it), "
                         f"got {height}x{width}")


def export_model(model: Segmenter, output: str | os.PathLike, *, fmt: str = "torch-export",
                 height: int = 512, width: int = 512, batch: int = 1, meta=None, task: str | None = None,
                 dynamic: bool = False) -> Path:
    """Write the model's inference graph for [batch, 3, height, width] uint8 inputs; returns the file.
    `task` (OneFormer only) picks the task token baked into the graph. `dynamic`: any height and width
    that are multiples of 32 from the recorded minimum up (traced at DYNAMIC_TRACE_SIZE or larger)."""
    check_export_request(fmt, height, width)
    if model.single_image_export and batch != 1:
        raise ValueError(f"{model.describe()} exports one image per call (its number of detections varies "
                         f"with the image): use --batch 1")
    graph = InferenceGraph(model, task).eval()
    if fmt == "onnx" and importlib.util.find_spec("onnxscript") is None:  # the ONNX exporter needs it
        raise ImportError("ONNX export needs onnx and onnxscript: pip install 'omniseg[export]'")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if dynamic:
        height, width = max(height, DYNAMIC_TRACE_SIZE), max(width, DYNAMIC_TRACE_SIZE)
    example = torch.zeros((batch, 3, height, width), dtype=torch.uint8)
    dynamic_shapes = None
    if dynamic:
        top = DYNAMIC_MAX_SIZE // SIZE_MULTIPLE
        dynamic_shapes = {"images": {2: SIZE_MULTIPLE * torch.export.Dim("height_blocks", min=1, max=top),
                                     3: SIZE_MULTIPLE * torch.export.Dim("width_blocks", min=1, max=top)}}
    with torch.no_grad():
        program = torch.export.export(graph, (example,), dynamic_shapes=dynamic_shapes)
        smallest = _smallest_accepted(program, batch) if dynamic else None
        if fmt == "torch-export":
            torch.export.save(program, output)
        else:
            torch.onnx.export(program, (example,), str(output), dynamo=True, input_names=["images"],
                              output_names=list(graph.output_names), verbose=False)
    shape = [batch, 3, "H", "W"] if dynamic else [batch, 3, height, width]
    sidecar = {
        "format": fmt,
        "input": {"name": "images", "shape": shape, "dtype": "uint8", "layout": "RGB"},
        "outputs": {name: OUTPUT_DOCS.get(name, name) for name in graph.output_names},
        "task": graph.options.get("task"),
        "classes": list(meta.classes) if meta is not None else None,
        **model.export_metadata(),
    }
    if dynamic:
        sidecar["input"]["dynamic"] = {"multiple": SIZE_MULTIPLE, "min": list(smallest),
                                       "max": [DYNAMIC_MAX_SIZE, DYNAMIC_MAX_SIZE], "traced_at": [height, width]}
    Path(str(output) + ".json").write_text(json.dumps(sidecar, indent=2))
    return output


def _smallest_accepted(program, batch: int) -> tuple[int, int]:
    """The smallest height and width (multiples of 32) that the exported program's guards accept, each side
    probed upwards from 32 with the other at the trace size (a refused size fails at a guard, cheaply)."""
    module = program.module()
    found = []
    for side in (0, 1):
        size = SIZE_MULTIPLE
        while size < DYNAMIC_TRACE_SIZE:
            probe = [DYNAMIC_TRACE_SIZE, DYNAMIC_TRACE_SIZE]
            probe[side] = size
            try:
                module(torch.zeros((batch, 3, *probe), dtype=torch.uint8))
                break
            except (AssertionError, RuntimeError, ValueError):  # a guard of the graph refused the size
                size += SIZE_MULTIPLE
        found.append(size)
    return found[0], found[1]


def load_exported(path: str | os.PathLike):
    """A callable images -> the exported outputs (see the sidecar) for a torch-export (.pt2) or ONNX file."""
    path = Path(path)
    sidecar = Path(str(path) + ".json")
    if not sidecar.is_file():
        raise FileNotFoundError(f"{sidecar}: missing; `omniseg export` writes it next to the exported file")
    names = list(json.loads(sidecar.read_text())["outputs"])
    if path.suffix == ".onnx":
        import numpy as np
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = session.run(names, {"images": np.ascontiguousarray(images.numpy())})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run
    module = torch.export.load(path).module()
    return lambda images: tuple(module(images))


def postprocess_exported(pred_logits: torch.Tensor, pred_masks: torch.Tensor, sidecar: dict,
                         image_sizes: Sequence[tuple[int, int]],
                         tasks: Sequence[str] = ("semantic", "panoptic", "instance"),
                         mode: str = "official") -> list[dict]:
    """The exported outputs -> omniseg prediction dicts (same as `model.predict`), per image.

    `image_sizes[i]` is the (h, w) of image i's content inside the padded input; `mode` as in `postprocess`.
    The padded input's size is the sidecar's, or for a dynamic-size graph four times the mask logits' size.
    """
    from omniseg.models.maskformer.postprocess import postprocess

    if "dynamic" in sidecar["input"]:
        padded = (4 * pred_masks.shape[-2], 4 * pred_masks.shape[-1])
    else:
        padded = tuple(sidecar["input"]["shape"][-2:])
    return [
        postprocess({"pred_logits": pred_logits[i].float(), "pred_masks": pred_masks[i].float()},
                    image_size=tuple(size), output_size=tuple(size), tasks=list(tasks),
                    thing_ids=sidecar["thing_ids"], padded_size=padded,
                    object_mask_threshold=sidecar["object_mask_threshold"],
                    overlap_threshold=sidecar["overlap_threshold"], topk=sidecar["topk"], mode=mode)
        for i, size in enumerate(image_sizes)
    ]


def semantic_from_exported(sem_seg: torch.Tensor, image_sizes: Sequence[tuple[int, int]],
                           output_sizes: Sequence[tuple[int, int]] | None = None) -> list[dict]:
    """A per-pixel model's exported logits [B, K, Hp, Wp] -> [{"semantic": int64 [H, W]}] per image, as
    `model.predict` gives them (the same code: crop image i's (h, w) content, resize, argmax)."""
    return semantic_results(sem_seg, image_sizes, output_sizes)


def instances_from_exported(outputs: dict, sidecar: dict, image_size: tuple[int, int],
                            output_size: tuple[int, int] | None = None) -> dict:
    """A detector's exported outputs for one image ({name: tensor} as the sidecar lists them) -> the
    "instances" of `model.predict` at `output_size` (default: `image_size`, the image's (h, w) inside the
    input): boxes scaled, the masks in their boxes pasted and thresholded as the family does (Mask R-CNN /
    PANet: torchvision's paste; BlendMask: its bilinear paste), the same code as eager prediction."""
    output_size = output_size or image_size
    if sidecar.get("instance_masks") == "rcnn":
        from omniseg.models.rcnn.model import paste_detections as paste
    elif sidecar.get("instance_masks") == "blendmask":
        from omniseg.models.blendmask.model import paste_instances as paste
    else:
        raise ValueError("the sidecar describes no detector outputs (instance_masks: rcnn | blendmask)")
    return paste(outputs, tuple(image_size), tuple(output_size), sidecar["mask_threshold"])
