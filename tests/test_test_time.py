"""Test-time inference modes (omniseg.test_time): MMSeg's sliding-window grid and averaging, multi-scale + flip
averaging (soft-maxed logits, probabilities as they are), whole-image equivalence for the three semantic
families, refusals, and the config / CLI / Predictor wiring."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from torch.nn import functional as F

from omniseg.data.loader import collate
from omniseg.data.transforms import build_transforms
from omniseg.models.base import Segmenter, semantic_results
from omniseg.schema import ConfigError
from omniseg.test_time import (InferenceMode, predict_semantic, resize_view, slide_scores, slide_windows,
                                window_starts)


class PositionOracle(Segmenter):
    """Per-pixel scores from the pixel's colour and its position inside the input it is given: a window's
    scores at a pixel depend on where the window starts, so averaging windows has something to average,
    and the expected average follows from the formula alone."""

    tasks = ("semantic", "instance", "panoptic")

    def __init__(self, probabilities: bool = False):
        super().__init__({"arch": "position_oracle"}, num_classes=3)
        self.semantic_scores_are_probabilities = probabilities

    def losses(self, images, targets):
        raise NotImplementedError

    @staticmethod
    def scores(images: torch.Tensor) -> torch.Tensor:
        """uint8 [B,3,h,w] -> float [B,3,h,w]."""
        x = images.float() / 255
        yy = torch.arange(x.shape[-2], dtype=torch.float32)[:, None]
        xx = torch.arange(x.shape[-1], dtype=torch.float32)[None, :]
        return torch.stack([x[:, 0] + 0.03 * yy, x[:, 1] + 0.02 * xx, x[:, 2] + 0.01 * (yy + xx)], 1)

    def infer(self, images, image_sizes, output_sizes, tasks, *, return_raw=False, semantic_scores=False):
        return semantic_results(self.scores(images), image_sizes, output_sizes, tasks, return_raw, semantic_scores)


def random_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def mmseg_grid(length: int, crop: int, stride: int) -> list[tuple[int, int]]:
    """MMSeg's EncoderDecoder.slide_inference windows along one axis, transcribed from its loop."""
    grids = max(length - crop + stride - 1, 0) // stride + 1
    out = []
    for i in range(grids):
        start = i * stride
        end = min(start + crop, length)
        out.append((max(end - crop, 0), end))
    return out


def reference_slide(scores_of, image: torch.Tensor, crop, stride) -> torch.Tensor:
    """The hand-computed average: every window's scores added where it lies, divided by the count."""
    h, w = image.shape[-2:]
    total, count = None, torch.zeros((1, h, w))
    for y1, y2 in mmseg_grid(h, crop[0], stride[0]):
        for x1, x2 in mmseg_grid(w, crop[1], stride[1]):
            s = scores_of(image[None, :, y1:y2, x1:x2])[0]
            total = torch.zeros((s.shape[0], h, w)) if total is None else total
            total[:, y1:y2, x1:x2] += s
            count[:, y1:y2, x1:x2] += 1
    return total / count


@pytest.mark.parametrize("length,crop,stride", [(100, 32, 21), (64, 64, 32), (50, 64, 20), (97, 40, 40),
                                                 (512, 512, 341), (1000, 512, 341), (33, 8, 1), (65, 32, 32)])
def test_window_grid_is_mmseg_formula(length, crop, stride):
    windows = [(s, min(s + crop, length)) for s in window_starts(length, crop, stride)]
    assert windows == mmseg_grid(length, crop, stride)
    assert len(windows) == max(length - crop + stride - 1, 0) // stride + 1


def test_window_grid_matches_mmseg_slide_inference():
    """MMSeg's own EncoderDecoder.slide_inference, given an encode_decode that records its windows."""
    from helpers.mmseg_reference import mmseg

    mmseg()
    from mmseg.models.segmentors.encoder_decoder import EncoderDecoder

    image = random_image(70, 90, seed=1)
    crop, stride = (32, 48), (20, 30)
    seen = []

    def encode_decode(inputs, metas):
        seen.append(tuple(inputs.shape[-2:]))
        return PositionOracle.scores(inputs.to(torch.uint8))

    fake = SimpleNamespace(test_cfg=SimpleNamespace(stride=stride, crop_size=crop), out_channels=3,
                           encode_decode=encode_decode)
    theirs = EncoderDecoder.slide_inference(fake, image[None].float(), [{}])[0]
    ours = slide_scores(PositionOracle(), image, crop, stride, size_divisibility=32)
    assert len(seen) == len(slide_windows(70, 90, crop, stride)) == 3 * 3
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_slide_is_the_average_of_overlapping_windows():
    model = PositionOracle()
    image = random_image(75, 100, seed=2)
    for crop, stride in [((32, 32), (20, 20)), ((40, 64), (25, 30)), ((80, 48), (10, 48))]:
        ours = slide_scores(model, image, crop, stride, size_divisibility=32)
        expected = reference_slide(PositionOracle.scores, image, crop, stride)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
        whole = PositionOracle.scores(image[None])[0]
        assert not torch.allclose(ours, whole)  # windows start elsewhere: the position terms differ


def test_slide_result_is_resized_to_the_original_and_argmaxed():
    model = PositionOracle()
    image = random_image(60, 80, seed=3)
    mode = InferenceMode.from_settings({"mode": "slide", "crop_size": 24, "stride": 16})
    pred = predict_semantic(model, image, mode, min_size_test=40, with_scores=True)
    view = resize_view(image, 40)
    assert tuple(view.shape[-2:]) == (40, 53)  # the eval transform's shorter-side resize
    expected = reference_slide(PositionOracle.scores, view, (24, 24), (16, 16))
    expected = F.interpolate(expected[None], size=(60, 80), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(pred["semantic_scores"], expected, rtol=0, atol=1e-6)
    assert torch.equal(pred["semantic"], expected.argmax(0))


def test_flip_and_scales_average_softmaxed_logits():
    model = PositionOracle()
    image = random_image(48, 64, seed=4)
    mode = InferenceMode.from_settings({"scales": [0.5, 1.0], "flip": True})
    pred = predict_semantic(model, image, mode, min_size_test=None, with_scores=True)
    views = []
    for scale in (0.5, 1.0):
        view = resize_view(image, None, scale)[None]
        assert tuple(view.shape[-2:]) == ((24, 32) if scale == 0.5 else (48, 64))
        for flip in (False, True):
            s = PositionOracle.scores(view.flip(-1) if flip else view)
            s = F.interpolate(s, size=(48, 64), mode="bilinear", align_corners=False) if scale != 1.0 else s
            views.append((s.flip(-1) if flip else s)[0].softmax(0))
    expected = torch.stack(views).mean(0)
    torch.testing.assert_close(pred["semantic_scores"], expected, rtol=0, atol=1e-6)
    assert torch.equal(pred["semantic"], expected.argmax(0))


def test_softmax_before_average_is_what_decides():
    """Two views whose mean logits and mean probabilities pick different classes: logits are soft-maxed
    before averaging; probabilities (mask classification) are averaged as they are."""
    class TwoViews(PositionOracle):
        def infer(self, images, image_sizes, output_sizes, tasks, *, return_raw=False, semantic_scores=False):
            flipped = bool(images[0, 0, 0, 0] == 7)  # the view is told apart by its first pixel
            logits = torch.tensor([0.0, 10.0, 0.0]) if not flipped else torch.tensor([0.0, -10.0, 1.0])
            # view A: class 1 surely; view B: class 2 weakly over 0 -> means: logits 1 vs probs class 1
            scores = logits.view(1, 3, 1, 1).expand(images.shape[0], 3, *images.shape[-2:]).clone()
            return semantic_results(scores, image_sizes, output_sizes, tasks, return_raw, semantic_scores)

    image = torch.zeros((3, 4, 4), dtype=torch.uint8)
    image[0, 0, -1] = 7  # after a horizontal flip it is the first pixel
    mode = InferenceMode.from_settings({"flip": True})
    logits = predict_semantic(TwoViews(), image, mode, min_size_test=None, with_scores=True)
    a, b = torch.tensor([0.0, 10.0, 0.0]).softmax(0), torch.tensor([0.0, -10.0, 1.0]).softmax(0)
    torch.testing.assert_close(logits["semantic_scores"][:, 0, 0], (a + b) / 2)
    assert int(logits["semantic"][0, 0]) == 1  # mean of raw logits would say class 2 (0.5 > 0)
    probs = predict_semantic(TwoViews(probabilities=True), image, mode, min_size_test=None, with_scores=True)
    torch.testing.assert_close(probs["semantic_scores"][:, 0, 0], torch.tensor([0.0, 0.0, 0.5]))
    assert int(probs["semantic"][0, 0]) == 2


def test_one_scale_without_flip_is_whole_inference():
    model = PositionOracle()
    image = random_image(50, 70, seed=5)
    whole = model.predict(image[None], [(50, 70)], tasks=["semantic"], semantic_scores=True)[0]
    one = InferenceMode.from_settings({"scales": [1.0], "flip": False})
    assert one.plain and one == InferenceMode()
    # the averaging path itself, with a single view, agrees with the whole image too
    single_view = InferenceMode(mode="whole", scales=(1.0,), flip=False)
    pred = predict_semantic(model, image, single_view, min_size_test=None, with_scores=True)
    assert torch.equal(pred["semantic"], whole["semantic"])
    torch.testing.assert_close(pred["semantic_scores"], whole["semantic_scores"], rtol=0, atol=0)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """A per-pixel, a mask-classification and a SegViT model, tiny and random."""
    from tiny_presets import tiny_config

    from omniseg.data.synthetic import synthetic_meta
    from omniseg.models.registry import build_model_from_config

    meta = synthetic_meta()
    out = {}
    for preset in ("pspnet_demo", "mask2former_demo", "segvit_demo"):
        cfg = tiny_config(preset, tmp_path_factory.mktemp("unused"), tmp_path_factory.mktemp("run"))
        torch.manual_seed(0)
        out[preset] = build_model_from_config(cfg, meta, with_backbone_weights=False).eval()
    return out


@pytest.mark.parametrize("preset", ["pspnet_demo", "mask2former_demo", "segvit_demo"])
def test_one_window_covering_the_image_is_whole_inference(family_models, preset):
    model = family_models[preset]
    image = random_image(80, 112, seed=6)
    for min_size_test, crop in [(None, (80, 112)), (None, (128, 128)), (64, (64, 96))]:
        mode = InferenceMode.from_settings({"mode": "slide", "crop_size": list(crop), "stride": [16, 16]})
        pred = predict_semantic(model, image, mode, min_size_test=min_size_test, size_divisibility=32,
                                with_scores=True)
        sample = build_transforms(False, min_size_test=min_size_test)({"image": image})
        batch = collate([sample], size_divisibility=32)
        whole = model.predict(batch.images, batch.image_sizes, [(80, 112)], tasks=["semantic"],
                              semantic_scores=True)[0]
        assert torch.equal(pred["semantic"], whole["semantic"]), (preset, crop)
        torch.testing.assert_close(pred["semantic_scores"], whole["semantic_scores"], rtol=0, atol=0)


def test_tta_on_a_real_model_averages_its_views(family_models):
    """mask classification under flip: the mean of the whole-image probabilities of the image and of its
    mirror (flipped back), averaged as they are."""
    model = family_models["mask2former_demo"]
    image = random_image(64, 96, seed=7)
    pred = predict_semantic(model, image, InferenceMode.from_settings({"flip": True}), min_size_test=None,
                            with_scores=True)
    views = [model.predict(im[None], [(64, 96)], tasks=["semantic"], semantic_scores=True)[0]["semantic_scores"]
             for im in (image, image.flip(-1))]
    expected = (views[0] + views[1].flip(-1)) / 2
    torch.testing.assert_close(pred["semantic_scores"], expected, rtol=0, atol=1e-6)


def test_panoptic_and_instance_are_refused_under_slide_and_tta():
    model = PositionOracle()
    image = random_image(40, 40)
    for settings in ({"mode": "slide", "crop_size": 32, "stride": 16}, {"flip": True}, {"scales": [0.5, 1.0]}):
        mode = InferenceMode.from_settings(settings)
        for task in ("panoptic", "instance"):
            with pytest.raises(ValueError, match=rf"not {task}.*omniseg predict --tile"):
                mode.check_tasks(["semantic", task])
    InferenceMode().check_tasks(["panoptic", "instance"])  # whole: every task as before
    assert predict_semantic(model, image, InferenceMode.from_settings({"flip": True}), min_size_test=None)[
        "semantic"].shape == (40, 40)


def test_settings_are_checked():
    from omniseg.config import load_config

    cfg = load_config("pspnet_demo")
    assert dict(cfg.inference) == {"mode": "whole", "crop_size": None, "stride": None, "scales": [1.0], "flip": False}
    assert InferenceMode.from_settings(cfg.inference).plain
    cfg = load_config("pspnet_demo", ["inference.mode=slide", "inference.crop_size=[48,64]", "inference.stride=32"])
    mode = InferenceMode.from_settings(cfg.inference)
    assert mode.crop_size == (48, 64) and mode.stride == (32, 32)
    with pytest.raises(ConfigError, match="inference.mode must be one of"):
        load_config("pspnet_demo", ["inference.mode=slid"])
    with pytest.raises(ConfigError, match="unknown key inference.crop"):
        load_config("pspnet_demo", ["inference.crop=4"])
    for bad, message in [({"mode": "slide", "crop_size": 32}, "needs inference.crop_size and inference.stride"),
                         ({"mode": "slide", "crop_size": 32, "stride": 40}, "larger than inference.crop_size"),
                         ({"mode": "slide", "crop_size": [32, 0], "stride": 8}, "positive"),
                         ({"mode": "slide", "crop_size": "big", "stride": 8}, "int or"),
                         ({"scales": [0.5, 0]}, "positive factors")]:
        with pytest.raises(ConfigError, match=message):
            InferenceMode.from_settings(bad)


def test_predictor_keyword_arguments(tmp_path):
    from serving import tiny_weights

    from omniseg.api import Predictor

    weights = tiny_weights(tmp_path / "m2f.safetensors")
    image = random_image(64, 80, seed=8).permute(1, 2, 0).numpy()
    whole = Predictor(weights, device="cpu", tasks=["semantic"])
    assert whole.inference.plain
    slid = Predictor(weights, device="cpu", mode="slide", crop_size=32, stride=16)
    assert slid.tasks == ["semantic"] and slid.inference.crop_size == (32, 32)
    pred = slid(image)
    expected = predict_semantic(slid.model, torch.from_numpy(image).permute(2, 0, 1), slid.inference,
                                min_size_test=slid.min_size_test)
    assert pred["height"] == 64 and torch.equal(pred["semantic"], expected["semantic"])
    one = Predictor(weights, device="cpu", mode="slide", crop_size=[64, 80], stride=8)
    assert torch.equal(one(image)["semantic"], whole(image)["semantic"])
    with pytest.raises(ValueError, match="not panoptic.*--tile"):
        Predictor(weights, device="cpu", tasks=["semantic", "panoptic"], flip=True)
    with pytest.raises(ValueError, match="choose one"):
        Predictor(weights, device="cpu", tile=32, flip=True)


def test_eval_and_predict_cli(tmp_path, synth_root):
    """omniseg eval with slide overrides / flags: overlapping windows change the result, one window that
    covers the image does not; omniseg predict writes the slide labels."""
    import numpy as np
    from PIL import Image
    from serving import tiny_weights
    from typer.testing import CliRunner

    from omniseg import outputs
    from omniseg.api import Predictor
    from omniseg.cli import app

    weights = tiny_weights(tmp_path / "psp.safetensors", "pspnet_demo")
    data = [f"data.val.root={synth_root}", "data.val.format=synthetic", "data.val.preset=null"]

    def run_eval(*args):
        out = tmp_path / f"m{len(list(tmp_path.glob('m*.json')))}.json"
        result = CliRunner().invoke(app, ["eval", "-w", str(weights), "--task", "semantic", "-o", str(out),
                                          *args, *data])
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())["semantic"]

    whole = run_eval()
    slide = run_eval("inference.mode=slide", "inference.crop_size=32", "inference.stride=16")
    covering = run_eval("inference.mode=slide", "inference.crop_size=64", "inference.stride=64")
    flags = run_eval("--slide", "32,16")
    assert covering == whole
    assert slide != whole and flags == slide
    tta = run_eval("--tta-scales", "0.75,1.0", "--flip")
    assert tta != whole and all(0 <= v <= 100 for k, v in tta.items() if k in ("mIoU", "pAcc"))

    refused = CliRunner().invoke(app, ["eval", "-w", str(tiny_weights(tmp_path / "m2f.safetensors")), "--slide",
                                       "32,16", *data])
    assert refused.exit_code == 2 and "not panoptic" in refused.output and "--tile" in refused.output

    folder = tmp_path / "images"
    folder.mkdir()
    Image.fromarray(random_image(64, 96, seed=9).permute(1, 2, 0).numpy()).save(folder / "a.png")
    result = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(folder), "-o", str(tmp_path / "out"),
                                      "--num-workers", "0", "--no-overlay", "inference.mode=slide",
                                      "inference.crop_size=32", "inference.stride=[16,24]"])
    assert result.exit_code == 0, result.output
    predictor = Predictor(weights, device="cpu", mode="slide", crop_size=32, stride=[16, 24])
    labels = outputs.semantic_to_dataset_ids(predictor(folder / "a.png")["semantic"], predictor.meta)
    assert np.array_equal(np.array(Image.open(tmp_path / "out" / "semantic" / "a.png")), labels)
    bad = CliRunner().invoke(app, ["predict", "-w", str(weights), "-i", str(folder), "-o", str(tmp_path / "x"),
                                   "data.min_size_test=32"])
    assert bad.exit_code == 2 and "inference.mode" in bad.output
