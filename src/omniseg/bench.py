"""`omniseg bench`: omniseg vs HF transformers Mask2Former, side by side in one run, identical weights.

Both sides load the same randomly initialised checkpoint (written in HF's format, read by omniseg's
converter), so the outputs must agree; the benchmark asserts it before timing. Every figure is the
median of `repeats` runs after `warmup` runs, the compared calls taken in turn so that a drifting
machine slows both sides alike (`interleaved_median_ms`). Training steps run in a fresh subprocess per side so
that peak RSS belongs to that side alone.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from omniseg.allocator import tuned_environment
from omniseg.runtime import describe, tune_process

# Backbones HF builds natively, as they appear in omniseg's presets.
HF_BACKBONES = {
    "swin_t": lambda: _swin(96, [2, 2, 6, 2], [3, 6, 12, 24]),
    "resnet50": lambda: _resnet(),
}
PRESET_BACKBONE = {"mask2former_swin_t": "swin_t", "mp_former_swin_t": "swin_t",
                   "mask2former_r50": "resnet50", "mp_former_r50": "resnet50"}


def _swin(embed_dim, depths, heads):
    from transformers import SwinConfig

    return SwinConfig(embed_dim=embed_dim, depths=depths, num_heads=heads, window_size=7, drop_path_rate=0.0,
                      out_features=["stage1", "stage2", "stage3", "stage4"])


def _resnet():
    from transformers import ResNetConfig

    return ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                        out_features=["stage1", "stage2", "stage3", "stage4"])


@dataclass
class BenchSettings:
    preset: str = "mask2former_swin_t"
    size: int = 512
    batch: int = 1
    train_batch: int = 2
    threads: int = 2
    dtype: str = "fp32"  # fp32 | bf16 (autocast)
    num_classes: int = 133
    num_queries: int = 100
    warmup: int = 2
    repeats: int = 5
    train_steps: int = 3
    train_rounds: int = 2  # fresh processes per side, the sides in turn; medians reported
    hf: bool = True
    train: bool = True
    activation_checkpointing: bool = False  # omniseg training step only
    compile: bool = False  # torch.compile omniseg's network (forward and predict rows) after the eager checks
    seed: int = 0

    def __post_init__(self):
        if self.dtype not in ("fp32", "bf16"):
            raise ValueError(f"--dtype must be fp32 or bf16, got {self.dtype!r}")


@dataclass
class BenchResult:
    settings: BenchSettings
    rows: list[tuple[str, float | None, float | None, str]] = field(default_factory=list)  # name, ours, hf, unit
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        s = self.settings
        head = (f"omniseg bench {s.preset}: {s.size}x{s.size}, batch {s.batch} (train {s.train_batch}), {s.threads} "
                f"threads, {s.dtype}{' + torch.compile' if s.compile else ''}, {s.num_classes} classes, {s.num_queries} queries, median of {s.repeats} "
                f"after {s.warmup} warm-up | torch {torch.__version__} | {platform.machine()}")
        lines = [head, "", "| measure | omniseg | HF transformers | HF / omniseg |", "|---|---|---|---|"]
        for name, ours, theirs, unit in self.rows:
            fmt = (lambda v: "-" if v is None else f"{v:.1f} {unit}" if unit != "s" else f"{v:.2f} s")
            ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
            lines.append(f"| {name} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
        return "\n".join(lines + [""] + self.notes) + "\n"


def median_ms(fn, warmup: int, repeats: int) -> float:
    """Median wall time (ms) of `repeats` calls of `fn` after `warmup` calls."""
    return interleaved_median_ms([fn], warmup, repeats)[0]


def interleaved_median_ms(fns, warmup: int, repeats: int) -> list[float | None]:
    """Median wall time (ms) of each callable (None entries give None), the calls taken in turn
    (a, b, a, b, ...) so that a machine whose speed drifts during the run (a shared VM) slows every
    side alike and the ratios stay meaningful."""
    live = [fn for fn in fns if fn is not None]
    for _ in range(warmup):
        for fn in live:
            fn()
    times = [[] for _ in live]
    for _ in range(repeats):
        for fn, record in zip(live, times):
            t0 = time.perf_counter()
            fn()
            record.append(time.perf_counter() - t0)
    medians = iter(statistics.median(t) * 1000 for t in times)
    return [None if fn is None else next(medians) for fn in fns]


def build_hf_checkpoint(settings: BenchSettings, folder: Path):
    """A random HF Mask2Former for the preset's backbone, saved to `folder`; returns the HF model."""
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation

    backbone = PRESET_BACKBONE.get(settings.preset)
    if backbone is None:
        raise ValueError(f"bench compares Mask2Former presets with HF: one of {sorted(PRESET_BACKBONE)}, "
                         f"got {settings.preset!r}")
    names = {i: f"class_{i}" for i in range(settings.num_classes)}
    config = Mask2FormerConfig(backbone_config=HF_BACKBONES[backbone](), num_labels=settings.num_classes,
                               num_queries=settings.num_queries, id2label=names,
                               label2id={v: k for k, v in names.items()})
    torch.manual_seed(settings.seed)
    model = Mask2FormerForUniversalSegmentation(config).eval()
    model.save_pretrained(folder)
    return model


def build_omniseg_checkpoint(settings: BenchSettings, folder: Path) -> Path:
    """Without transformers: the preset itself with random weights, saved as an omniseg weights file."""
    from omniseg.config import load_config, to_yaml
    from omniseg.data.meta import DatasetMeta
    from omniseg.engine.checkpoint import save_weights
    from omniseg.models.registry import build_model_from_config

    cfg = load_config(settings.preset, [f"model.num_queries={settings.num_queries}"])
    meta = DatasetMeta(classes=[f"class_{i}" for i in range(settings.num_classes)],
                       isthing=[True] * settings.num_classes, name="bench")
    torch.manual_seed(settings.seed)
    path = folder / "model.safetensors"
    save_weights(path, build_model_from_config(cfg, meta), config_yaml=to_yaml(cfg), meta=meta.to_dict())
    return path


def matmul_peak_gflops(dtype: str, size: int = 2048, repeats: int = 3) -> float:
    """This machine's GEMM throughput for `dtype` (best of `repeats` size^3 matmuls): the practical peak."""
    torch_dtype = torch.bfloat16 if dtype == "bf16" else torch.float32
    a = torch.randn(size, size).to(torch_dtype)
    b = torch.randn(size, size).to(torch_dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def counted_gflop(fn) -> float:
    """Matmul/convolution GFLOP that `fn()` runs (forward and any backward inside it), by torch's FLOP
    counter. Its module tracker needs autograd on, so `fn` brings its own no_grad where it wants one."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e9


def training_step_gflop(model, settings: BenchSettings) -> float:
    """GFLOP of one omniseg training step (losses and their backward) on the training workers' batch."""
    images, targets = _training_batch(settings)
    was_training = model.training
    model.train()
    try:
        with _autocast(settings.dtype):
            return counted_gflop(lambda: sum(model(images, targets).values()).backward())
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def flop_limit_note(name: str, gflop: float, seconds: float, peak_gflops: float) -> str:
    """How far a timed row is from the FLOP limit: achieved rate over the measured GEMM throughput,
    and the time the matmul/conv work alone needs at that throughput (no implementation beats it)."""
    achieved = gflop / seconds
    floor = gflop / peak_gflops
    return (f"{name}: {gflop:.0f} GFLOP (matmul/conv); omniseg achieves {achieved:.0f} GFLOP/s = "
            f"{100 * achieved / peak_gflops:.0f}% of the GEMM throughput; floor {_duration(floor)} "
            f"against {_duration(seconds)} measured.")


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def stored_for_backward_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while `fn` runs (each storage counted once)."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), for benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def native_bf16_matmul() -> bool:
    """Whether the CPU has bf16 matmul instructions (AMX or AVX512-BF16); without them bf16 is emulated."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def shaped_outputs(num_queries: int, num_classes: int, size: tuple[int, int], objects: int = 20, seed: int = 0):
    """Raw outputs shaped like a trained model's: `objects` (at most all) queries with a confident class and a blob-shaped
    mask (logit +8 inside, smooth edge), the rest no-object with strongly negative masks."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    objects = min(objects, num_queries)
    logits = torch.randn(num_queries, num_classes + 1, generator=g)
    logits[:, -1] += 6
    logits[torch.arange(objects), torch.randint(0, num_classes, (objects,), generator=g)] += 14
    yy, xx = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    masks = torch.full((num_queries, h, w), -10.0) + torch.randn(num_queries, h, w, generator=g)
    for q in range(objects):
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
        ry, rx = (6 + torch.rand(2, generator=g) * 30) * h / 128
        distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
        masks[q] = 8 * (1 - distance).clamp(-1.5, 1) + 0.3 * torch.randn(h, w, generator=g)
    return {"pred_logits": logits, "pred_masks": masks}


def agreement(a: dict, b: dict, task: str) -> float:
    """Fraction of output pixels on which two predictions of `task` agree (instances: mask pixels)."""
    if task == "semantic":
        return (a["semantic"] == b["semantic"]).float().mean().item()
    if task == "panoptic":
        return (a["panoptic"]["segment_map"] == b["panoptic"]["segment_map"]).float().mean().item()
    return (a["instances"]["masks"] == b["instances"]["masks"]).float().mean().item()


def _autocast(dtype: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")


def _check_against_fp32(name: str, outputs: dict, fp32: dict, tolerance: float = 0.05) -> str:
    """AssertionError unless the first prediction set's mask logits (before any masked attention, whose
    0.5 threshold flips bits under rounding with random weights) are within `tolerance` x their scale of
    fp32 eager; returns the note for the table."""
    ours, ref = outputs["aux_outputs"][0]["pred_masks"].float(), fp32["aux_outputs"][0]["pred_masks"]
    gap, scale = (ours - ref).abs().max().item(), max(ref.abs().max().item(), 1.0)
    if gap > tolerance * scale:
        raise AssertionError(f"{name} mask logits differ from fp32 eager by {gap:.3g} (scale {scale:.3g}): "
                             f"timing would be meaningless")
    final = (outputs["pred_masks"].float() - fp32["pred_masks"]).abs().max().item()
    return (f"{name} vs fp32 eager omniseg, mask logits: max |diff| {gap:.3g} for the first prediction set "
            f"(logits up to {scale:.3g}; asserted <= {tolerance:.0%} of that), {final:.3g} for the last.")


def _random_targets(batch: int, size: int, num_classes: int, generator: torch.Generator):
    """8 random boxes per image with random classes: bool masks [8, size, size] and labels [8]."""
    targets = []
    for _ in range(batch):
        masks = torch.zeros((8, size, size), dtype=torch.bool)
        for k in range(8):
            y0, x0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            h, w = torch.randint(size // 8, size // 2, (2,), generator=generator).tolist()
            masks[k, y0:y0 + h, x0:x0 + w] = True
        targets.append({"labels": torch.randint(0, num_classes, (8,), generator=generator), "masks": masks})
    return targets


def _training_batch(settings: BenchSettings):
    """The training steps' batch: random uint8 images and `_random_targets`, the same on every call."""
    g = torch.Generator().manual_seed(settings.seed)
    images = torch.randint(0, 256, (settings.train_batch, 3, settings.size, settings.size), dtype=torch.uint8,
                           generator=g)
    return images, _random_targets(settings.train_batch, settings.size, settings.num_classes, g)


def _train_worker(side: str, folder: str, settings: BenchSettings) -> tuple[float, float]:
    """One side's training steps (run in a fresh process): (median step seconds, peak RSS MiB)."""
    torch.set_num_threads(settings.threads)
    images, targets = _training_batch(settings)
    if side == "omniseg":
        from omniseg.api import load_model

        model, _, _ = load_model(folder)
        model.train()
        if settings.activation_checkpointing:
            model.set_activation_checkpointing(True)

        def loss_fn():
            return sum(model(images, targets).values())
    else:
        from transformers import Mask2FormerForUniversalSegmentation

        model = Mask2FormerForUniversalSegmentation.from_pretrained(folder)
        model.train()
        mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
        std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
        pixels = (images.float() - mean) / std
        mask_labels = [t["masks"].float() for t in targets]
        class_labels = [t["labels"] for t in targets]

        def loss_fn():
            return model(pixel_values=pixels, mask_labels=mask_labels, class_labels=class_labels).loss
    # fused AdamW on both sides: omniseg's build_optimizer and HF Trainer's default (torch >= 2.8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    times = []
    for step in range(1 + settings.train_steps):
        t0 = time.perf_counter()
        with _autocast(settings.dtype):
            loss = loss_fn()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step > 0:  # the first step pays one-off allocations
            times.append(time.perf_counter() - t0)
    return statistics.median(times), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step_in_subprocess(side: str, folder: Path, settings: BenchSettings,
                              environment: dict[str, str] | None = None) -> tuple[float, float]:
    """(median step seconds, peak RSS MiB) of `side` ("omniseg" | "hf") in a fresh process. Both sides'
    workers get the allocator settings the `omniseg` command uses (omniseg/allocator.py), from this
    process's environment updated with `environment` (e.g. {"OMNISEG_MALLOC_TUNING": "lean"})."""
    cmd = [sys.executable, "-m", "omniseg.bench", side, str(folder), json.dumps(asdict(settings))]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env=tuned_environment({**os.environ, **(environment or {})}))
    if proc.returncode != 0:
        raise RuntimeError(f"{side} training-step subprocess failed:\n{proc.stderr[-3000:]}")
    step, rss = json.loads(proc.stdout.strip().splitlines()[-1])
    return step, rss


if __name__ == "__main__":  # the training-step worker: python -m omniseg.bench SIDE FOLDER SETTINGS_JSON
    tune_process()  # the same process settings as the parent, for both sides
    _side, _folder, _settings = sys.argv[1:4]
    print(json.dumps(_train_worker(_side, _folder, BenchSettings(**json.loads(_settings)))))


def run_bench(settings: BenchSettings, progress=print) -> BenchResult:
    from omniseg.api import load_model
    from omniseg.models.maskformer.postprocess import postprocess

    torch.set_num_threads(settings.threads)
    applied = tune_process()  # as the `omniseg` command does; both sides run with it
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # HF's post-processors log a notice per call
    except ImportError:
        pass
    result = BenchResult(settings)
    s = settings
    result.notes.append("Process settings (omniseg/runtime.py), the same for both sides and in the training-step "
                        "workers: " + describe(applied) + ".")
    with tempfile.TemporaryDirectory(prefix="omniseg_bench_") as tmp:
        folder = Path(tmp)
        progress("building a random checkpoint ...")
        if s.hf:
            hf_model = build_hf_checkpoint(s, folder)
            checkpoint = folder
        else:
            hf_model = None
            checkpoint = build_omniseg_checkpoint(s, folder)
        model, _, _ = load_model(checkpoint)
        model.eval()
        params = sum(p.numel() for p in model.parameters())
        result.notes.append(f"omniseg model: {params / 1e6:.1f} M parameters; fp32 weights + gradients + AdamW "
                            f"state take {16 * params / 2**20:.0f} MiB of the training process (AdamW fused on "
                            f"both sides, as omniseg's trainer and HF's Trainer default).")
        g = torch.Generator().manual_seed(s.seed + 1)
        images = torch.randint(0, 256, (s.batch, 3, s.size, s.size), dtype=torch.uint8, generator=g)
        pixels = model.normalize(images)

        def ours_forward():
            with torch.no_grad(), _autocast(s.dtype):
                return model.forward_raw(pixels)

        def hf_forward():
            with torch.no_grad(), _autocast(s.dtype):
                return hf_model(pixel_values=pixels)

        raw = ours_forward()
        if s.dtype == "bf16":
            with torch.no_grad():
                fp32 = model.forward_raw(pixels)
            result.notes.append(_check_against_fp32("bf16 autocast", raw, fp32))
        else:
            fp32 = raw
        if hf_model is not None:
            with torch.no_grad():
                ref = hf_model(pixel_values=pixels, output_auxiliary_logits=True)
            # Set 0 (before any masked attention) must agree to fp32 rounding. Later sets can differ more:
            # masked attention thresholds sigmoid(mask) at 0.5, and random weights put many pixels within
            # rounding of it, so a few attention-mask bits flip between implementations.
            first = (fp32["aux_outputs"][0]["pred_masks"] - ref.auxiliary_logits[0]["masks_queries_logits"]).abs().max().item()
            scale = ref.auxiliary_logits[0]["masks_queries_logits"].abs().max().item()
            if first > 1e-4 * max(scale, 1.0):
                raise AssertionError(f"omniseg and HF differ by {first:.3g} already before masked attention "
                                     f"(logits up to {scale:.3g}); timing would be meaningless")
            final = max((fp32["pred_logits"] - ref.class_queries_logits).abs().max().item(),
                        (fp32["pred_masks"] - ref.masks_queries_logits).abs().max().item())
            result.notes.append(f"Outputs checked before timing (fp32): max |omniseg - HF| = {first:.1e} for the "
                                f"first prediction set, {final:.1e} for the last (attention-mask bits at the 0.5 "
                                f"threshold flip under rounding with random weights).")

        if s.compile:
            progress("torch.compile ...")
            model.compile_network()
            start = time.perf_counter()
            compiled = ours_forward()
            result.notes.append(f"torch.compile: the first compiled forward took {time.perf_counter() - start:.0f} s; "
                                f"omniseg's forward and predict rows are compiled, HF's eager. "
                                + _check_against_fp32("compiled", compiled, fp32))
        progress("forward ...")
        eager_forward = type(model).forward_raw.__get__(model)  # counted eager, also after compile_network
        gflop = counted_gflop(lambda: eager_forward(pixels))
        emulated = s.dtype == "bf16" and not native_bf16_matmul()
        gemm = 512 if emulated else 2048  # emulated bf16 runs at ~1 GFLOP/s: a 2048^3 product would take a minute
        measured_peak = matmul_peak_gflops(s.dtype, size=gemm)
        if emulated:
            result.notes.append("This CPU has no bf16 matmul instructions (no AMX / AVX512-BF16): bf16 autocast runs "
                                "emulated and is expected to be slower than fp32.")
        t_ours, t_hf = interleaved_median_ms([ours_forward, hf_forward if hf_model is not None else None],
                                             s.warmup, s.repeats)
        result.rows.append(("forward", t_ours, t_hf, "ms"))
        result.notes.append(f"FLOP limit: this machine's measured {s.dtype} GEMM throughput is {measured_peak:.1f} "
                            f"GFLOP/s ({gemm}^3 matmul); a row's floor is its matmul/conv work at that rate.")
        result.notes.append(flop_limit_note(f"Forward, batch {s.batch}", gflop, t_ours / 1000, measured_peak))

        progress("post-processing ...")
        # Random weights make every query "no object", and post-processing would then keep nothing: give
        # half of the queries a confident class so both sides do the work a trained model causes.
        logits = raw["pred_logits"][:1].float().clone()
        half = logits.shape[1] // 2
        chosen = torch.randint(0, logits.shape[2] - 1, (half,), generator=g)
        logits[0, torch.arange(half), chosen] += 12.0
        out0 = {"pred_logits": logits[0], "pred_masks": raw["pred_masks"][0].float()}
        result.notes.append(f"Post-processing inputs: the model's outputs with {half} of {logits.shape[1]} queries "
                            f"given a confident class (random weights alone keep no segment).")
        hw = (s.size, s.size)
        processor = None
        if hf_model is not None:
            from transformers import Mask2FormerImageProcessor

            processor = Mask2FormerImageProcessor(do_resize=False)
            with torch.no_grad(), _autocast(s.dtype):
                hf_out = hf_model(pixel_values=pixels[:1])
            hf_out.class_queries_logits = logits
            hf_out.masks_queries_logits = raw["pred_masks"][:1].float()
        shaped = shaped_outputs(logits.shape[1], logits.shape[2] - 1, tuple(out0["pred_masks"].shape[-2:]), seed=s.seed)
        result.notes.append("Shaped outputs: 20 queries with a confident class and a blob mask (logit +8 inside, "
                            "smooth edge), the rest no-object with negative masks, as a trained model emits.")
        for task, hf_call in (("semantic", "post_process_semantic_segmentation"),
                              ("panoptic", "post_process_panoptic_segmentation"),
                              ("instance", "post_process_instance_segmentation")):
            theirs = None
            if processor is not None:
                fn = getattr(processor, hf_call)
                theirs = (lambda fn=fn: fn(hf_out, target_sizes=[hw]))
            runs = {(inputs_name, mode): (lambda inputs=inputs, mode=mode: postprocess(
                        inputs, image_size=hw, output_size=hw, tasks=[task], thing_ids=model.thing_ids,
                        padded_size=hw, mode=mode))
                    for inputs_name, inputs in (("model outputs", out0), ("shaped outputs", shaped))
                    for mode in ("official", "fast")}
            *ours_ms, theirs_ms = interleaved_median_ms([*runs.values(), theirs], s.warmup, s.repeats)
            for ((inputs_name, mode), ms) in zip(runs, ours_ms):
                hf_ms = theirs_ms if inputs_name == "model outputs" else None
                result.rows.append((f"post-processing {task}, {mode}, {inputs_name}", ms, hf_ms, "ms"))
            for inputs_name in ("model outputs", "shaped outputs"):
                preds = {mode: runs[(inputs_name, mode)]() for mode in ("official", "fast")}
                agree = agreement(preds["official"], preds["fast"], task)
                # semantic: fast sums scores before the resize (HF's order), so labels may differ where
                # classes are close; panoptic and instance make the official decisions.
                if task != "semantic" and agree < 0.999:
                    raise AssertionError(f"fast {task} post-processing agrees with the official order on only "
                                         f"{100 * agree:.2f}% of pixels ({inputs_name})")
                note = f"fast vs official {task} ({inputs_name}): {100 * agree:.3f}% of pixels agree"
                if task == "instance":
                    gap = (preds["fast"]["instances"]["scores"] - preds["official"]["instances"]["scores"]).abs().max()
                    note += f", max |score difference| {gap:.4f}"
                result.notes.append(note + ".")

        progress("end-to-end predict ...")
        one = images[:1]

        def ours_predict(mode="official"):
            model.postprocess_mode = mode
            with _autocast(s.dtype):
                return model.predict(one, [hw], tasks=["panoptic"])

        def hf_predict():
            inputs = processor(images=[one[0].permute(1, 2, 0).numpy()], return_tensors="pt")
            with torch.no_grad(), _autocast(s.dtype):
                out = hf_model(**inputs)
            out.class_queries_logits = out.class_queries_logits.float()
            out.masks_queries_logits = out.masks_queries_logits.float()
            return processor.post_process_panoptic_segmentation(out, target_sizes=[hw])

        official, fast, theirs_predict = interleaved_median_ms(
            [ours_predict, lambda: ours_predict("fast"), hf_predict if hf_model is not None else None],
            s.warmup, s.repeats)
        model.postprocess_mode = "official"
        result.rows.append(("predict (uint8 image -> panoptic), 1 image", official, theirs_predict, "ms"))
        result.rows.append(("predict, fast post-processing", fast, theirs_predict, "ms"))
        # predict runs under no_grad, which the FLOP counter cannot enter: count its network pass (the
        # post-processing's few small products are left out)
        predict_gflop = counted_gflop(lambda: eager_forward(model.normalize(one), aux_outputs=False))
        result.notes.append(flop_limit_note("Predict (fast post-processing), 1 image", predict_gflop, fast / 1000,
                                            measured_peak))
        hf_model = None  # free it before the training subprocesses
        if s.train:
            progress("training steps (fresh processes, the sides in turn) ...")
            ours, theirs = [], []
            for _ in range(max(1, s.train_rounds)):
                ours.append(train_step_in_subprocess("omniseg", checkpoint, s))
                if s.hf:
                    theirs.append(train_step_in_subprocess("hf", folder, s))

            def median(runs, i):
                return statistics.median(r[i] for r in runs) if runs else None

            result.rows.append((f"training step, batch {s.train_batch}", median(ours, 0), median(theirs, 0), "s"))
            train_gflop = training_step_gflop(model, s)
            result.notes.append(flop_limit_note(f"Training step (forward + backward), batch {s.train_batch}",
                                                train_gflop, median(ours, 0), measured_peak))
            result.rows.append(("training peak RSS (whole process)", median(ours, 1), median(theirs, 1), "MiB"))
            result.notes.append(f"Training rows: median over {max(1, s.train_rounds)} fresh process(es) per side, "
                                f"the sides in turn; in each, the median of {s.train_steps} steps after one warm-up "
                                "step. Peak RSS varies between identical processes: "
                                + "; ".join(f"{side} {', '.join(f'{r[1]:.0f}' for r in runs)} MiB"
                                            for side, runs in (("omniseg", ours), ("HF", theirs)) if runs) + ".")
            if s.activation_checkpointing:
                result.notes.append("omniseg's training step ran with activation checkpointing (backbone stages, "
                                    "pixel-decoder and decoder layers recomputed in backward); HF's without.")
    return result
