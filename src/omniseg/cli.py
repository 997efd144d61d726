"""`omniseg` command line: train, eval, predict, demo, models, data."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from omniseg.tasks import TASKS
from omniseg.hub.converters import SOURCES as CONVERT_SOURCES

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Universal image segmentation (MaskFormer, Mask2Former, ...) in pure PyTorch.")
data_app = typer.Typer(no_args_is_help=True, help="Datasets: generate the synthetic set, check a dataset.")
app.add_typer(data_app, name="data")


@app.callback()
def _runtime() -> None:
    """Before any command runs (not for the bare --help, which should not pay for importing torch): the
    process settings of omniseg/runtime.py. `main` has tuned malloc already, before any allocation."""
    from omniseg.runtime import tune_process

    tune_process()


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


SLIDE_HELP = ("sliding-window inference (semantic), MMSeg's slide mode: CROP,STRIDE in px on the test-resized "
              "image, each N or HxW (e.g. 512,341 or 512x1024,341x683); = inference.mode=slide "
              "inference.crop_size=.. inference.stride=..")
TTA_SCALES_HELP = "test-time augmentation (semantic): factors of the test resize, e.g. 0.5,0.75,1.0 (inference.scales)"
FLIP_HELP = "test-time augmentation (semantic): also every scale flipped horizontally (inference.flip=true)"


def _inference_overrides(slide: Optional[str], tta_scales: Optional[str], flip: bool) -> list[str]:
    """--slide / --tta-scales / --flip as `inference.*` overrides."""
    def size(text: str) -> str:
        parts = text.lower().split("x")
        if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
            _fail(f"--slide: {text!r} is not N or HxW")
        return f"[{parts[0]},{parts[-1]}]"

    out = []
    if slide is not None:
        pieces = slide.split(",")
        if len(pieces) != 2:
            _fail(f"--slide takes CROP,STRIDE (e.g. 512,341), got {slide!r}")
        out += ["inference.mode=slide", f"inference.crop_size={size(pieces[0])}", f"inference.stride={size(pieces[1])}"]
    if tta_scales is not None:
        try:
            scales = [float(v) for v in tta_scales.split(",")]
        except ValueError:
            _fail(f"--tta-scales takes factors like 0.5,0.75,1.0, got {tta_scales!r}")
        out.append(f"inference.scales=[{','.join(repr(v) for v in scales)}]")
    if flip:
        out.append("inference.flip=true")
    return out


@app.command()
def train(config: str = typer.Argument(..., help="preset name (see `omniseg models`) or YAML file"),
          overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides, e.g. train.max_iters=1000"),
          resume: bool = typer.Option(False, "--resume", help="continue the run in train.output_dir exactly where it stopped")):
    """Train a model. `--resume` continues a run; `train.weights=FILE` instead initialises a new run."""
    from omniseg.config import load_config
    from omniseg.engine.trainer import train as run

    cfg = load_config(config, overrides)
    metrics = run(cfg, resume=resume)
    typer.echo(json.dumps(metrics, indent=2))


@app.command("train-continual")
def train_continual(config: str = typer.Argument(..., help="preset name or YAML file of a SegViT model"),
                    overrides: Optional[List[str]] = typer.Argument(
                        None, help="e.g. model.continual.steps=[4,1,1] model.continual.freeze=false")):
    """Class-incremental training: one run per step of model.continual.steps under train.output_dir/step<t>,
    each initialised from the previous step; prints old / new / all mIoU per step and the forgetting."""
    from omniseg.config import load_config
    from omniseg.engine.continual import format_report, train_continual as run

    cfg = load_config(config, overrides)
    try:
        report = run(cfg)
    except ValueError as e:
        _fail(str(e))
    typer.echo(format_report(report))
    typer.echo(f"report: {Path(cfg.train.output_dir) / 'continual.json'}")


@app.command("eval")
def eval_cmd(weights: Optional[str] = typer.Option(None, "--weights", "-w",
                                                   help="omniseg .safetensors or HF checkpoint folder to evaluate"),
             predictions: Optional[Path] = typer.Option(None, "--predictions", "-p",
                                                        help="saved predictions to score instead of a model: a folder "
                                                             "`omniseg predict` wrote, label PNGs, a COCO panoptic or "
                                                             "results JSON"),
             config: Optional[str] = typer.Option(None, "--config", "-c", "--dataset",
                                                  help="config whose data.val is the ground truth (default with "
                                                       "--weights: the one stored in the weights, whose network and "
                                                       "test settings are used either way)"),
             overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides, e.g. data.val.root=DIR"),
             tasks: Optional[List[str]] = typer.Option(None, "--task", help="semantic / panoptic / instance (repeatable)"),
             max_images: Optional[int] = typer.Option(None, help="evaluate only the first N images (--weights)"),
             bbox: bool = typer.Option(False, "--bbox", help="also box AP (bbox_AP, ...) for instances"),
             output: Optional[Path] = typer.Option(None, "--output", "-o", help="write metrics JSON here"),
             slide: Optional[str] = typer.Option(None, "--slide", help=SLIDE_HELP),
             tta_scales: Optional[str] = typer.Option(None, "--tta-scales", help=TTA_SCALES_HELP),
             flip: bool = typer.Option(False, "--flip", help=FLIP_HELP),
             consistency: bool = typer.Option(False, "--consistency",
                                              help="also layer consistency (mIoU-Li, Util per decoder layer)"),
             figure: Optional[Path] = typer.Option(None, "--figure",
                                                   help="with --consistency: PNG of the first image's masks layer by layer")):
    """Evaluate weights, or score saved predictions, on the validation split: PQ/SQ/RQ, mIoU/pAcc, mask AP
    (and layer consistency). --slide, --tta-scales and --flip (or inference.* overrides) choose MMSeg's
    sliding-window and multi-scale + flip inference for semantic results."""
    from omniseg.config import apply_overrides, load_config, replace_section
    from omniseg.data.build import build_datasets
    from omniseg.engine.checkpoint import stored_config
    from omniseg.runtime import resolve_device

    if (weights is None) == (predictions is None):
        _fail("give either --weights (evaluate a model) or --predictions (score saved predictions)")
    bad = [t for t in tasks or () if t not in TASKS]
    if bad:
        _fail(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    if predictions is not None:
        from omniseg.evaluation.offline import evaluate_predictions

        if config is None:
            _fail("--predictions needs --config (or --dataset): the preset or YAML whose data.val is the ground truth")
        if consistency or figure:
            _fail("--consistency needs a model (--weights)")
        if slide or tta_scales or flip:
            _fail("--slide / --tta-scales / --flip choose how a model predicts: they need --weights")
        cfg = load_config(config, overrides)
        datasets, meta = build_datasets(cfg, splits=("val",))
        results = evaluate_predictions(predictions, datasets["val"], meta, tasks=list(tasks) if tasks else None,
                                       boundary_f=cfg.eval_boundary_f, bbox=bbox)
    else:
        from omniseg.api import load_model
        from omniseg.engine.evaluate import evaluate

        device = resolve_device("auto")
        base = load_config(config) if config else None
        if base is not None and stored_config(weights):
            # the network and its test settings are the weights' own; the config names the ground truth
            model, cfg, meta = load_model(weights, device=device)
            cfg = replace_section(cfg, "data.val", base.data.val)
        else:
            model, cfg, meta = load_model(weights, device=device, config=base)
        overrides = [*(overrides or []), *_inference_overrides(slide, tta_scales, flip)]
        cfg = apply_overrides(cfg, overrides, source=f"the config of {weights}")
        datasets, _ = build_datasets(cfg, splits=("val",))
        try:
            results = evaluate(model, datasets["val"], cfg, meta, tasks=tasks or None, max_images=max_images,
                               device=device, bbox=bbox)
        except ValueError as e:
            _fail(str(e))
        if consistency:
            from omniseg.evaluation.consistency import evaluate_consistency

            results["consistency"] = evaluate_consistency(model, datasets["val"], cfg, max_images=max_images,
                                                          device=device, figure=str(figure) if figure else None)
        elif figure:
            _fail("--figure needs --consistency")
    text = json.dumps(results, indent=2, default=float)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
    typer.echo(text)


@app.command()
def predict(weights: str = typer.Option(..., "--weights", "-w"),
            input: Path = typer.Option(..., "--input", "-i", help="an image or a folder of images"),
            output: Path = typer.Option(..., "--output", "-o"),
            tasks: Optional[List[str]] = typer.Option(None, "--task", help="semantic / panoptic / instance (repeatable)"),
            overlay: bool = typer.Option(True, help="also write overlay PNGs"),
            score_threshold: float = typer.Option(0.5, help="instance score threshold for overlays"),
            batch_size: int = typer.Option(1, "--batch-size", help="images per forward pass"),
            num_workers: int = typer.Option(2, "--num-workers", help="processes reading and resizing images"),
            skip_existing: bool = typer.Option(False, "--skip-existing", help="leave images whose outputs are "
                                               "already complete (restart an interrupted run)"),
            yolo: bool = typer.Option(False, "--yolo", help="also the instances as YOLO-seg label files (yolo/)"),
            labelme: bool = typer.Option(False, "--labelme", help="also the instances as LabelMe JSON (labelme/)"),
            device: str = typer.Option("auto", help="auto | cpu | cuda"),
            fast: bool = typer.Option(False, "--fast", help="fast post-processing: the official decisions "
                                      "without full-resolution mask stacks (see docs/results.md)"),
            tile: Optional[int] = typer.Option(None, "--tile", help="predict tile by tile, tiles of this many px "
                                               "at the image's own resolution (images of any size)"),
            overlap: Optional[int] = typer.Option(None, "--overlap", help="least overlap of neighbouring tiles, px "
                                                  "(default: a quarter of --tile)"),
            image_ids: Optional[Path] = typer.Option(None, "--image-ids",
                                                     help="COCO JSON whose image ids the results should use "
                                                          "(default: 0, 1, ... in file-name order)"),
            slide: Optional[str] = typer.Option(None, "--slide", help=SLIDE_HELP),
            tta_scales: Optional[str] = typer.Option(None, "--tta-scales", help=TTA_SCALES_HELP),
            flip: bool = typer.Option(False, "--flip", help=FLIP_HELP),
            overrides: Optional[List[str]] = typer.Argument(
                None, help="inference.* overrides of the weights' settings, e.g. inference.mode=slide "
                           "inference.crop_size=512 inference.stride=341")):
    """Predict a folder of any size: semantic label PNGs (dataset ids), COCO panoptic PNG+JSON, COCO instance
    JSON, overlays, written image by image and restartable with --skip-existing. --tile predicts huge images
    (aerial, microscopy) tile by tile, joining objects cut by tile borders. --slide, --tta-scales and --flip
    (or inference.* overrides) choose MMSeg's sliding-window and multi-scale + flip inference (semantic)."""
    from tqdm.auto import tqdm

    from omniseg.api import Predictor
    from omniseg.data.errors import DataError
    from omniseg.engine.predict import list_images, predict_folder, read_image_ids

    try:
        files = list_images(input)
        ids = read_image_ids(image_ids) if image_ids else None
    except DataError as e:
        _fail(str(e))
    bad = [t for t in tasks or () if t not in TASKS]
    if bad:
        _fail(f"unknown task(s) {bad}; choose from {', '.join(TASKS)}")
    if batch_size < 1 or num_workers < 0:
        _fail("--batch-size must be at least 1 and --num-workers at least 0")
    if overlap is not None and tile is None:
        _fail("--overlap applies to tiled prediction: give --tile too")
    import yaml

    inference = {}
    for item in [*(overrides or []), *_inference_overrides(slide, tta_scales, flip)]:
        key, sep, value = item.partition("=")
        name = key[len("inference."):]
        if not sep or not key.startswith("inference.") or name not in ("mode", "crop_size", "stride", "scales", "flip"):
            _fail(f"omniseg predict takes inference.mode / crop_size / stride / scales / flip overrides, got {item!r}")
        inference[name] = yaml.safe_load(value)
    try:  # default tasks: every task the model predicts (semantic under slide / test-time augmentation)
        predictor = Predictor(weights, device=device, tasks=list(tasks) if tasks else None,
                              postprocess="fast" if fast else None, tile=tile, overlap=overlap, **inference)
    except ValueError as e:
        _fail(str(e))
    polygon_formats = [name for name, wanted in (("yolo", yolo), ("labelme", labelme)) if wanted]
    if polygon_formats and "instance" not in predictor.tasks:
        _fail("--yolo / --labelme write instances: the instance task must be predicted")
    report = predict_folder(predictor, files, output, tasks=predictor.tasks, overlay=overlay,
                            score_threshold=score_threshold, batch_size=batch_size, num_workers=num_workers,
                            image_ids=ids, skip_existing=skip_existing, polygon_formats=polygon_formats,
                            progress=lambda it: tqdm(it, desc="predict", unit="img", mininterval=1.0))
    typer.echo(report.summary(output))
    if report.failed:
        _fail(f"{len(report.failed)} image(s) could not be read, e.g. {report.failed[0]}")


@app.command()
def export(weights: str = typer.Option(..., "--weights", "-w", help="omniseg .safetensors or HF checkpoint folder"),
           output: Path = typer.Option(..., "--output", "-o", help="file to write (.pt2 for torch-export, .onnx)"),
           fmt: str = typer.Option("torch-export", "--format", "-f", help="torch-export | onnx"),
           height: int = typer.Option(512, help="input height (multiple of 32)"),
           width: int = typer.Option(512, help="input width (multiple of 32)"),
           batch: int = typer.Option(1, help="batch size of the exported graph"),
           task: Optional[str] = typer.Option(None, "--task", help="OneFormer: the task the graph predicts "
                                              "(semantic / instance / panoptic; default model.test.task)"),
           dynamic: bool = typer.Option(False, "--dynamic", help="any height and width (multiples of 32, from "
                                        "the minimum the sidecar records up to 8192) instead of --height/--width")):
    """Export the inference network (uint8 images -> class and mask logits) for deployment."""
    from omniseg.api import load_model
    from omniseg.export import check_export_request, export_model

    try:
        check_export_request(fmt, height, width)
    except ValueError as e:
        _fail(str(e))
    if task is not None and task not in TASKS:
        _fail(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    model, _, meta = load_model(weights)
    try:
        path = export_model(model, output, fmt=fmt, height=height, width=width, batch=batch, meta=meta, task=task,
                            dynamic=dynamic)
    except ValueError as e:
        _fail(str(e))
    if dynamic:
        sizes = json.loads(Path(f"{path}.json").read_text())["input"]["dynamic"]
        shape = (f"{batch}, 3, H, W] for H, W multiples of {sizes['multiple']}, H >= {sizes['min'][0]}, "
                 f"W >= {sizes['min'][1]}, up to {sizes['max'][0]}")
    else:
        shape = f"{batch}, 3, {height}, {width}]"
    typer.echo(f"wrote {path} and {path}.json (input uint8 [{shape})")


@app.command()
def convert(source: Path = typer.Argument(..., help="the released checkpoint (.pth / .pkl / .safetensors, or an "
                                         "HF folder)"),
            fmt: str = typer.Option(..., "--from", help="its layout: " + "; ".join(
                f"{name}: {what}" for name, (_, what) in CONVERT_SOURCES.items())),
            preset: str = typer.Option(..., "--preset", help="the omniseg preset it becomes (e.g. maskrcnn_r50); the "
                                       "config follows the checkpoint where the two differ"),
            output: Path = typer.Option(..., "--output", "-o", help="omniseg weights file to write (.safetensors)"),
            classes: Optional[str] = typer.Option(None, "--classes", help="coco | coco_panoptic | ade20k | cityscapes, "
                                                  "or a file with one class name per line"),
            allow_missing: bool = typer.Option(False, "--allow-missing", help="write even with unmapped checkpoint "
                                               "tensors or uninitialised model tensors"),
            overrides: Optional[List[str]] = typer.Argument(None, help="dotted config overrides applied last, for "
                                                            "what the file cannot tell (e.g. model.output_stride=32)")):
    """Convert a released checkpoint into an omniseg weights file (config and classes inside)."""
    from omniseg.hub.convert import convert as run_conversion
    from omniseg.hub.errors import CheckpointError

    try:
        report = run_conversion(source, fmt, preset, output, classes=classes, allow_missing=allow_missing,
                                overrides=overrides or ())
    except (CheckpointError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"mapped {report['mapped']} tensors; config follows the checkpoint: {' '.join(report['overrides'])}")
    if report["ignored"]:
        typer.echo(f"ignored {len(report['ignored'])}: {sorted(set(report['ignored'].values()))}")
    if report["initialised"]:
        typer.echo(f"initialised {len(report['initialised'])} training-only tensors the checkpoint lacks")
    if report["unmapped"] or report["missing"]:
        typer.echo(f"unmapped {report['unmapped'][:8]}, missing {report['missing'][:8]} (--allow-missing)")
    typer.echo(f"wrote {output}")


@app.command()
def bench(preset: str = typer.Argument("mask2former_swin_t", help="mask2former_swin_t | mask2former_r50 (and mp_former_*)"),
          size: int = typer.Option(512, help="square input size"),
          batch: int = typer.Option(1, help="inference batch"),
          train_batch: int = typer.Option(2, help="training-step batch"),
          threads: int = typer.Option(2, help="torch threads"),
          dtype: str = typer.Option("fp32", help="fp32 | bf16 (autocast)"),
          num_classes: int = typer.Option(133),
          num_queries: int = typer.Option(100),
          warmup: int = typer.Option(2),
          repeats: int = typer.Option(5),
          train_steps: int = typer.Option(3, help="timed training steps per side"),
          train_rounds: int = typer.Option(2, help="fresh training processes per side, the sides in turn"),
          hf: bool = typer.Option(True, help="compare with HF transformers (when installed)"),
          train: bool = typer.Option(True, help="also time training steps and peak memory"),
          activation_checkpointing: bool = typer.Option(False, help="omniseg's training step with activation "
                                                        "checkpointing (model.activation_checkpointing)"),
          compile_network: bool = typer.Option(False, "--compile", help="torch.compile omniseg's network "
                                               "(minutes on a CPU) and time the compiled forward and predict"),
          output: Optional[Path] = typer.Option(None, "--output", "-o", help="also write the table (markdown) here")):
    """Speed and memory of omniseg vs HF transformers Mask2Former, same weights, one table."""
    from omniseg.bench import BenchSettings, run_bench

    if hf:
        if importlib.util.find_spec("transformers") is None:
            typer.echo("transformers is not installed: omniseg only (pip install transformers to compare)")
            hf = False
    try:
        settings = BenchSettings(preset=preset, size=size, batch=batch, train_batch=train_batch, threads=threads,
                                 dtype=dtype, num_classes=num_classes, num_queries=num_queries, warmup=warmup,
                                 repeats=repeats, train_steps=train_steps, train_rounds=train_rounds, hf=hf,
                                 train=train,
                                 activation_checkpointing=activation_checkpointing, compile=compile_network)
        table = run_bench(settings, progress=lambda msg: typer.echo(msg, err=True)).table()
    except ValueError as e:
        _fail(str(e))
    typer.echo(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)


@app.command()
def serve(weights: str = typer.Option(..., "--weights", "-w", help="omniseg .safetensors or HF checkpoint folder"),
          host: str = typer.Option("127.0.0.1", help="interface to bind (0.0.0.0: every interface)"),
          port: int = typer.Option(8000),
          device: str = typer.Option("auto", help="auto | cpu | cuda"),
          max_batch: int = typer.Option(8, "--max-batch", help="requests of the same size batched together"),
          max_upload_mb: float = typer.Option(50.0, "--max-upload-mb", help="largest accepted upload"),
          max_wait_ms: float = typer.Option(5.0, "--max-wait-ms", help="how long a request waits for others "
                                            "to share its batch")):
    """Serve a web page (/) and a JSON API (/v1/predict, /v1/model) for a trained model."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        _fail("omniseg serve needs its extra: pip install 'omniseg[serve]' (fastapi, uvicorn, python-multipart)")
    import uvicorn

    from omniseg.api import Predictor
    from omniseg.serve.app import create_app

    from omniseg.hub import CheckpointError

    if max_batch < 1:
        _fail("--max-batch must be at least 1")
    try:
        predictor = Predictor(weights, device=device)
    except (ValueError, CheckpointError, FileNotFoundError) as e:
        _fail(str(e))
    app_ = create_app(predictor, name=Path(weights).name, max_batch=max_batch, max_wait_s=max_wait_ms / 1000,
                      max_upload_bytes=int(max_upload_mb * (1 << 20)))
    typer.echo(f"omniseg serve: {predictor.model.describe()} from {weights} on http://{host}:{port}/", err=True)
    uvicorn.run(app_, host=host, port=port, log_level="warning")


@app.command()
def demo(output: Path = typer.Option(Path("runs/demo"), "--output", "-o"),
         preset: str = typer.Option("mp_former_demo", help="the preset to train"),
         overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides")):
    """Generate the synthetic dataset, train the demo model on it, evaluate, and write overlays + curves."""
    from omniseg.demo import run_demo

    run_demo(output, preset=preset, overrides=list(overrides or []))


@app.command()
def models():
    """List the named presets: family, backbone and network of each (from the family registry)."""
    from omegaconf import OmegaConf

    from omniseg.config import list_presets, load_config
    from omniseg.models.registry import family_of

    rows = []
    for name in list_presets():
        settings = OmegaConf.to_object(load_config(name).model)
        arch, details = family_of(settings.arch).describe(settings)
        rows.append((name, arch, settings.backbone, details))
    header = ("preset", "arch", "backbone", "network")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@app.command("recipe")
def show_recipe(preset: str = typer.Argument(..., help="a full-size preset (see `omniseg models`)")):
    """Print a full-size preset's official recipe: each setting, the preset's value, the official value, the
    official file, and why the two differ where they do (src/omniseg/official_recipes/, docs/recipes.md)."""
    from omniseg.recipes import check_recipe, load_recipe

    try:
        recipe = load_recipe(preset)
    except FileNotFoundError as e:
        _fail(str(e))
    typer.echo(f"{recipe.preset}: {recipe.headline}\nofficial config: {recipe.official}\n")
    rows = [("setting", "preset", "official", "source")] + [
        (r.key, str(r.value) + (" (differs)" if r.deviates else ""), str(r.official), r.source) for r in recipe.rows]
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(4)]
    for r in rows:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    deviations = [r for r in recipe.rows if r.deviates]
    if deviations:
        typer.echo("\nwhy the preset differs:")
        for r in deviations:
            typer.echo(f"  {r.key}: {r.why}")
    for note in recipe.notes:
        typer.echo(f"note: {note}")
    problems = check_recipe(recipe)
    if problems:
        _fail(f"{preset} no longer matches its table: " + "; ".join(problems))


@app.command("config")
def show_config(config: str = typer.Argument(..., help="preset name or YAML file"),
                overrides: Optional[List[str]] = typer.Argument(None, help="dotted overrides")):
    """Print the whole resolved config of a preset or YAML file (every setting, defaults included)."""
    from omegaconf import OmegaConf

    from omniseg.config import load_config

    typer.echo(OmegaConf.to_yaml(load_config(config, overrides)).rstrip())


@data_app.command("synth")
def data_synth(out: Path = typer.Option(..., "--out", "-o"), num_train: int = 600, num_val: int = 100,
               image_size: int = 128, seed: int = 0):
    """Write the built-in synthetic dataset (COCO panoptic + COCO instance + semantic PNGs)."""
    from omniseg.data.synthetic import generate

    path = generate(out, num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    typer.echo(f"synthetic dataset in {path}")


@data_app.command("check")
def data_check(config: str = typer.Argument(...), overrides: Optional[List[str]] = typer.Argument(None),
               split: str = typer.Option("train")):
    """Load a config's dataset, read every sample, and print the class <-> id mapping and counts."""
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets, describe_dataset

    cfg = load_config(config, overrides)
    datasets, _ = build_datasets(cfg, splits=(split,))
    typer.echo(describe_dataset(datasets[split]))


pssl_app = typer.Typer(no_args_is_help=True, help="PSSL pre-training data (arXiv 2207.03335): instance crops -> "
                                                   "classifier ensemble -> SmoothGrad pseudo labels.")
app.add_typer(pssl_app, name="pssl")


def _pssl_errors():
    """Bad input in the PSSL steps -> one red line naming the file, as the other commands do."""
    from contextlib import contextmanager

    from omniseg.hub import CheckpointError

    @contextmanager
    def guard():
        try:
            yield
        except (ValueError, CheckpointError) as e:  # DataError is a ValueError
            _fail(str(e))

    return guard()


def _device(name: str) -> str:
    from omniseg.runtime import resolve_device

    return str(resolve_device(name))


@pssl_app.command("crops")
def pssl_crops(root: Path = typer.Argument(..., help="dataset folder: synthetic, COCO panoptic or COCO instance"),
               out: Path = typer.Option(..., "--out", "-o", help="classification folder to write: OUT/<class>/*.png"),
               fmt: str = typer.Option("auto", "--format", help="auto | synthetic | coco_panoptic | coco_instance"),
               split: str = typer.Option("train", help="the dataset split to crop"),
               size: int = typer.Option(64, help="side of the square crops in pixels"),
               margin: float = typer.Option(0.5, help="context: crop side = longer box side x (1 + margin)"),
               min_area: int = typer.Option(32, help="skip instances with fewer visible pixels"),
               overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `pssl crops` output")):
    """Crop every non-crowd thing instance into a classification folder (one sub-folder per class)."""
    from tqdm.auto import tqdm

    from omniseg.pssl import make_crops

    with _pssl_errors():
        report = make_crops(root, out, split=split, fmt=fmt, size=size, margin=margin, min_area=min_area,
                            overwrite=overwrite, progress=lambda it: tqdm(it, desc="crops", mininterval=1.0))
    typer.echo(report.summary())


@pssl_app.command("classifier")
def pssl_classifier(folder: Path = typer.Argument(..., help="classification folder FOLDER/<class>/<images>"),
                    out: Path = typer.Option(..., "--out", "-o", help=".safetensors file, or a folder for "
                                             "classifier.safetensors (+ .json with classes and accuracy)"),
                    arch: str = typer.Option("resnet18", help="timm architecture (trained from scratch)"),
                    iters: int = typer.Option(500, help="training steps"),
                    batch: int = typer.Option(32),
                    lr: float = typer.Option(1e-3, help="AdamW peak learning rate"),
                    seed: int = typer.Option(0, help="initialisation + sampling + augmentation; one seed per "
                                             "ensemble member"),
                    image_size: int = typer.Option(64, help="square input size"),
                    timm_kwargs: Optional[str] = typer.Option(None, help='JSON for timm.create_model, e.g. '
                                                              '\'{"channels": [32, 64, 128, 256]}\' (narrow resnet)'),
                    val_fraction: float = typer.Option(0.1, help="held out per class for the accuracy report"),
                    schedule: str = typer.Option("cosine", help="cosine | poly"),
                    device: str = typer.Option("auto", help="auto | cpu | cuda")):
    """Train one classifier on a folder; run it with several --seed values for an ensemble."""
    from tqdm.auto import tqdm

    from omniseg.pssl import train_classifier

    kwargs = None
    if timm_kwargs:
        try:
            kwargs = json.loads(timm_kwargs)
        except ValueError as e:
            _fail(f"--timm-kwargs is not valid JSON ({e})")
        if not isinstance(kwargs, dict):
            _fail("--timm-kwargs must be a JSON object")
    with _pssl_errors(), tqdm(total=iters, desc=f"classifier seed {seed}", mininterval=1.0) as bar:
        def progress(step: int, loss: float) -> None:
            bar.update(1)
            if step % 10 == 0:
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        path = train_classifier(folder, out=out, arch=arch, iters=iters, batch=batch, lr=lr, seed=seed,
                                image_size=image_size, timm_kwargs=kwargs, val_fraction=val_fraction,
                                schedule=schedule, device=_device(device), progress=progress)
    info = json.loads(path.with_suffix(".json").read_text())
    losses = info["losses"]
    k = min(10, len(losses))
    acc = (f"held-out accuracy {100 * info['val_accuracy']:.1f}% on {info['val_images']} images"
           if info["val_accuracy"] is not None else "no held-out images (--val-fraction 0 or tiny classes)")
    typer.echo(f"wrote {path} ({arch}, {info['num_classes']} classes, {info['train_images']} training images); "
               f"loss {sum(losses[:k]) / k:.3f} (first {k} steps) -> {sum(losses[-k:]) / k:.3f} (last {k}); {acc}")


@pssl_app.command("labels")
def pssl_labels(folder: Path = typer.Argument(..., help="classification folder FOLDER/<class>/<images>"),
                classifiers: List[Path] = typer.Option(..., "--classifier", "-c", help="classifier weights "
                                                       "(repeatable: the ensemble)"),
                out: Path = typer.Option(..., "--out", "-o", help="dataset to write (semantic_folder layout)"),
                arch: Optional[str] = typer.Option(None, help="timm architecture of plain timm checkpoints "
                                                   "(files without an omniseg .json)"),
                image_size: Optional[int] = typer.Option(None, help="input size for plain timm checkpoints "
                                                         "(default: timm's for --arch)"),
                n_samples: int = typer.Option(16, help="SmoothGrad noisy copies per image (0: plain gradient)"),
                noise: float = typer.Option(0.15, help="SmoothGrad noise std as a fraction of the input range"),
                val_fraction: float = typer.Option(0.1, help="fraction of each class written to the val split"),
                seed: int = typer.Option(0, help="split and SmoothGrad noise"),
                batch: int = typer.Option(8, help="images per saliency batch"),
                preset: str = typer.Option("pspnet_demo", help="preset named in the printed train command"),
                device: str = typer.Option("auto", help="auto | cpu | cuda"),
                overwrite: bool = typer.Option(False, "--overwrite", help="replace an earlier `pssl labels` output")):
    """Write the pseudo-label dataset (top saliency decile = class, rest background) and print the
    `omniseg train` command that pre-trains on it."""
    from tqdm.auto import tqdm

    from omniseg.pssl import load_classifier, write_pseudo_labels

    dev = _device(device)
    with _pssl_errors():
        models = [load_classifier(c, arch=arch, image_size=image_size, device=dev) for c in classifiers]
        report = write_pseudo_labels(folder, models, out, n_samples=n_samples, noise=noise,
                                     val_fraction=val_fraction, seed=seed, batch=batch, device=dev, preset=preset,
                                     overwrite=overwrite, progress=lambda it: tqdm(it, desc="labels", mininterval=1.0))
    typer.echo(f"wrote {report.images['train']} train + {report.images['val']} val pseudo labels to {out} "
               f"({report.num_classes} classes, background id {report.background_id}, "
               f"{100 * report.foreground_fraction:.1f}% foreground pixels); details in {out / 'pssl.json'}")
    typer.echo("pre-train with:")
    typer.echo("  " + report.command_line())


def main() -> None:
    from omniseg.allocator import tune_malloc

    tune_malloc()  # freed tensor memory is reused, not page-faulted in again: see omniseg/allocator.py
    try:
        app()
    except Exception as e:  # user-facing errors without a wall of traceback
        from omniseg.data.errors import DataError
        from omniseg.hub import CheckpointError

        from omniseg.schema import ConfigError

        if isinstance(e, (DataError, CheckpointError, ConfigError, FileNotFoundError)):
            typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
