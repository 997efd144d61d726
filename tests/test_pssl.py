"""PSSL pseudo labels: folder reader, crops, classifiers, SmoothGrad, deciles, label writer, CLI."""

from __future__ import annotations

import json
import math
import shlex
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from typer.testing import CliRunner

from omniseg.cli import app
from omniseg.data.build import build_dataset
from omniseg.data.errors import DataError
from omniseg.pssl import (Classifier, ClassificationFolder, decile_map, ensemble_saliency, load_classifier,
                          make_crops, pseudo_label, smoothgrad, split_indices, train_classifier, train_command,
                          write_pseudo_labels)

TINY_RESNET = {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 32]}
runner = CliRunner()


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def easy_folder(tmp_path_factory):
    """Two classes a tiny CNN separates in seconds: a blue or a red square on grey noise."""
    root = tmp_path_factory.mktemp("easy") / "folder"
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (20, 40, 220)), ("red", (220, 30, 30))):
        for i in range(12):
            img = np.clip(rng.normal(128, 40, (32, 32, 3)), 0, 255)
            y, x = rng.integers(4, 20, 2)
            img[y:y + 10, x:x + 10] = colour
            _write_png(root / name / f"{i:02d}.png", img)
    return root


@pytest.fixture(scope="module")
def synth_small(tmp_path_factory):
    from omniseg.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("pssl_synth") / "data", num_train=8, num_val=2, image_size=64, seed=3)


# ------------------------------------------------------------------------------------------------
# Classification folder


def test_folder_classes_sorted_and_items_labelled(tmp_path):
    for name, n in (("zebra", 2), ("apple", 3), ("mango", 1)):
        for i in range(n):
            _write_png(tmp_path / name / f"{i}.png", np.full((8, 8, 3), 10 * i))
    (tmp_path / ".cache").mkdir()  # hidden folders are not classes
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    ds = ClassificationFolder(tmp_path)
    assert ds.classes == ["apple", "mango", "zebra"]
    assert ds.class_counts() == [3, 1, 2]
    assert len(ds) == 6
    image, label = ds[3]
    assert label == 1 and image.dtype == torch.uint8 and tuple(image.shape) == (3, 8, 8)
    assert [it.path.parent.name for it in ds.items] == ["apple"] * 3 + ["mango"] + ["zebra"] * 2


def test_folder_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(DataError) as e:
        ClassificationFolder(tmp_path / "missing")
    assert e.value.path == str(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no class folders") as e:
        ClassificationFolder(empty)
    assert e.value.path == str(empty)

    root = tmp_path / "root"
    _write_png(root / "cat" / "a.png", np.zeros((4, 4, 3)))
    (root / "dog").mkdir()
    (root / "dog" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="'dog' holds no images") as e:
        ClassificationFolder(root)
    assert e.value.path == str(root / "dog")

    bad = root / "dog" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ds = ClassificationFolder(root)
    with pytest.raises(DataError, match="cannot read image") as e:
        ds[ds.items.index(next(it for it in ds.items if it.path == bad))]
    assert e.value.path == str(bad)


def test_split_is_stratified_and_deterministic():
    labels = [0] * 20 + [1] * 10 + [2] * 1
    train, val = split_indices(labels, 0.1, seed=0)
    assert sorted(train + val) == list(range(31))
    assert Counter(labels[i] for i in val) == {0: 2, 1: 1}  # one image alone stays in train
    assert split_indices(labels, 0.1, seed=0) == (train, val)
    assert split_indices(labels, 0.1, seed=1) != (train, val)
    assert split_indices(labels, 0.0) == (list(range(31)), [])


# ------------------------------------------------------------------------------------------------
# SmoothGrad


class PixelLinear(nn.Module):
    """logit_k = sum over (c, y, x) of W[k, c, y, x] * input[c, y, x]: gradient = W, everywhere."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, x):
        return torch.einsum("bchw,kchw->bk", x, self.weight)


def _three_pixel_model(h=6, w=5):
    weight = torch.zeros(2, 3, h, w)
    weight[0, 0, 2, 3], weight[0, 2, 2, 3] = 2.0, -5.0  # pixel (2,3): channel max of |w| = 5
    weight[0, 1, 4, 1] = 4.0                             # pixel (4,1): 4
    weight[0, 2, 0, 0] = -1.0                            # pixel (0,0): 1
    weight[1, 1, 5, 4] = 3.0                             # class 1: a single pixel
    expected = torch.zeros(2, h, w)
    expected[0, 2, 3], expected[0, 4, 1], expected[0, 0, 0] = 5 / 5, 4 / 5, 1 / 5
    expected[1, 5, 4] = 1.0
    return PixelLinear(weight), expected


def test_smoothgrad_of_a_linear_model_is_its_weight_map():
    model, expected = _three_pixel_model()
    images = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0)) * 255
    plain = smoothgrad(model, images, [0, 1], n_samples=0)
    assert torch.allclose(plain, expected, atol=1e-6)
    assert (plain[0] > 0).sum() == 3 and (plain[1] > 0).sum() == 1  # nothing outside the used pixels
    # Noise does not change the gradient of a linear function: SmoothGrad = gradient exactly.
    noisy = smoothgrad(model, images, torch.tensor([0, 1]), n_samples=8, noise=0.3,
                       generator=torch.Generator().manual_seed(1))
    assert torch.allclose(noisy, expected, atol=1e-6)
    # Same class for both images: same map, independent of the image content.
    both = smoothgrad(model, images, [0, 0], n_samples=2)
    assert torch.allclose(both[1], expected[0], atol=1e-6)


def test_smoothgrad_noise_is_seeded_and_restores_training_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    model.train()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 255
    a = smoothgrad(model, images, [1, 2], n_samples=4, generator=torch.Generator().manual_seed(5))
    b = smoothgrad(model, images, [1, 2], n_samples=4, generator=torch.Generator().manual_seed(5))
    c = smoothgrad(model, images, [1, 2], n_samples=4, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert model.training
    assert a.shape == (2, 8, 8) and float(a.min()) >= 0 and torch.allclose(a.flatten(1).amax(1), torch.ones(2))
    # Eval mode inside: an image's map does not depend on the other images of the batch.
    alone = smoothgrad(model, images[:1], [1], n_samples=0)
    assert torch.allclose(alone[0], smoothgrad(model, images, [1, 2], n_samples=0)[0], atol=1e-5)


def test_ensemble_is_the_mean_of_normalised_maps_at_each_image_size():
    model, expected = _three_pixel_model()
    weight2 = torch.zeros(2, 3, 6, 5)
    weight2[0, 0, 1, 1] = 100.0  # a much larger gradient: normalisation keeps it from dominating
    model2 = PixelLinear(weight2)
    images = torch.rand(1, 3, 6, 5) * 255
    ens = ensemble_saliency([model, model2], images, [0], n_samples=0)
    want = expected[0].clone()
    want[1, 1] += 1.0
    assert torch.allclose(ens[0], want / 2, atol=1e-6)
    # Classifiers see their own input size; maps come back at each image's size.
    clf = Classifier(PixelLinear(torch.ones(1, 3, 8, 8)), "linear", 1, image_size=8)
    maps = ensemble_saliency([clf], [torch.rand(3, 16, 12) * 255, torch.rand(3, 8, 8) * 255], [0, 0], n_samples=0)
    assert [tuple(m.shape) for m in maps] == [(16, 12), (8, 8)]
    assert torch.allclose(maps[1], torch.ones(8, 8))


# ------------------------------------------------------------------------------------------------
# Deciles


def test_deciles_of_a_ramp():
    ramp = torch.arange(100, dtype=torch.float32).view(10, 10)
    dec = decile_map(ramp)
    assert dec.dtype == torch.int64
    assert torch.equal(dec, (ramp // 10).long())  # row r is decile r
    assert torch.equal(torch.bincount(dec.flatten(), minlength=10), torch.full((10,), 10))
    # Per image: a batch of a scaled ramp and a shuffled ramp.
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).float().view(10, 10)
    both = decile_map(torch.stack([ramp * 1e-3, perm]))
    assert torch.equal(both[0], dec) and torch.equal(both[1], (perm // 10).long())
    # N not divisible by 10: exactly N - ceil(0.9 N) pixels in the top decile.
    odd = decile_map(torch.linspace(0, 1, 91).view(7, 13))
    assert int((odd == 9).sum()) == 91 - math.ceil(0.9 * 91) == 9
    assert int((odd == 0).sum()) == math.ceil(0.1 * 91)


def test_deciles_ties_share_the_lower_decile():
    assert torch.equal(decile_map(torch.zeros(1, 4, 5)), torch.zeros(1, 4, 5, dtype=torch.int64))
    sal = torch.zeros(10, 10)
    sal[0, :5] = 1.0  # 5% of the pixels carry all the saliency
    dec = decile_map(sal)
    assert int((dec == 9).sum()) == 5 and int((dec == 0).sum()) == 95


# ------------------------------------------------------------------------------------------------
# Pseudo labels


def _ramp_classifier(size=20):
    """Class 0 is explained by the bottom rows, class 1 by the top rows (saliency = ramp)."""
    ramp = torch.arange(size * size, dtype=torch.float32).view(size, size) + 1
    weight = torch.stack([ramp.expand(3, size, size), ramp.flip(0).expand(3, size, size)])
    return Classifier(PixelLinear(weight.clone()), "ramp", 2, image_size=size, classes=["a", "b"])


def test_pseudo_label_top_decile_is_the_class_rest_background():
    dec = torch.tensor([[9, 0], [5, 9]])
    assert pseudo_label(dec, 3, 7).tolist() == [[3, 7], [7, 3]]


def test_label_writer_output_reads_as_semantic_folder(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "folder"
    for name in ("a", "b"):
        for i in range(5):
            _write_png(folder / name / f"img{i}.png", rng.integers(0, 255, (20, 20, 3)))
    report = write_pseudo_labels(folder, [_ramp_classifier()], tmp_path / "out", n_samples=3, val_fraction=0.2)
    assert report.classes == ["a", "b", "background"] and report.background_id == 2
    assert report.images == {"train": 8, "val": 2}
    info = json.loads((tmp_path / "out" / "pssl.json").read_text())
    assert info["class_weights"] == [1.0, 1.0, 0.1] and info["num_classes"] == 3 and info["background_id"] == 2
    assert info["images_per_class"] == {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}}
    assert info["pixels_per_class"] == {"a": 5 * 40, "b": 5 * 40, "background": 10 * 360}
    assert info["foreground_fraction"] == pytest.approx(0.1)

    want = {"a": np.full((20, 20), 2), "b": np.full((20, 20), 2)}
    want["a"][18:] = 0  # the 40 most salient pixels of a 20x20 ramp: the last two rows
    want["b"][:2] = 1
    raw = np.array(Image.open(tmp_path / "out" / "labels" / "train" / "a" / "img0.png"))
    assert raw.dtype == np.uint8
    for split, n in (("train", 8), ("val", 2)):
        ds = build_dataset(info["data"][split], split)
        assert ds.meta.classes == ["a", "b", "background"] and ds.meta.num_classes == 3 and len(ds) == n
        for i in range(len(ds)):
            s = ds[i]
            cls = Path(s["file_name"]).parent.name
            assert s["sem_seg"].tolist() == want[cls].tolist()
            assert torch.equal(s["image"], torch.from_numpy(np.array(Image.open(
                folder / cls / Path(s["file_name"]).name))).permute(2, 0, 1))


def test_label_writer_refuses_foreign_output_and_is_deterministic(tmp_path, easy_folder):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    clf = _ramp_classifier(8)
    clf.classes = ["blue", "red"]
    with pytest.raises(DataError, match="not empty"):
        write_pseudo_labels(easy_folder, [clf], foreign)
    with pytest.raises(DataError, match="refusing"):
        write_pseudo_labels(easy_folder, [clf], foreign, overwrite=True)
    assert (foreign / "keep.txt").exists()
    write_pseudo_labels(easy_folder, [clf], tmp_path / "o1", n_samples=2)
    write_pseudo_labels(easy_folder, [clf], tmp_path / "o1", n_samples=2, overwrite=True)
    write_pseudo_labels(easy_folder, [clf], tmp_path / "o2", n_samples=2)
    files = sorted(p.relative_to(tmp_path / "o1") for p in (tmp_path / "o1" / "labels").rglob("*.png"))
    assert len(files) == 24
    assert all((tmp_path / "o1" / f).read_bytes() == (tmp_path / "o2" / f).read_bytes() for f in files)
    wrong = _ramp_classifier(8)  # classes a, b: not the folder's
    with pytest.raises(ValueError, match="not among the classifier"):
        write_pseudo_labels(easy_folder, [wrong], tmp_path / "o3")


def test_more_than_254_classes_get_16_bit_labels(tmp_path):
    folder = tmp_path / "folder"
    k = 300
    for c in range(k):
        _write_png(folder / f"c{c:03d}" / "x.png", np.full((8, 8, 3), c % 256))
    weight = torch.rand(k, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    clf = Classifier(PixelLinear(weight), "linear", k, image_size=8)  # no class names: output i = folder class i
    report = write_pseudo_labels(folder, [clf], tmp_path / "out", n_samples=0, val_fraction=0.0)
    assert report.ignore_index == 65535 and report.images == {"train": k, "val": 0}
    assert "data.val.split=train" in report.command and "data.train.ignore_index=65535" in report.command
    info = json.loads((tmp_path / "out" / "pssl.json").read_text())
    assert info["label_bits"] == 16 and info["background_id"] == k
    ds = build_dataset(info["data"]["train"], "train")
    assert ds.meta.num_classes == k + 1 and ds.meta.classes[-1] == "background"
    s = ds[299]
    top = weight[299].abs().amax(0).flatten().argsort()[-6:]  # 64 - ceil(57.6) = 6 most salient pixels
    want = torch.full((64,), k)
    want[top] = 299
    assert s["sem_seg"].flatten().tolist() == want.tolist()


def test_train_command_parses_into_the_dataset(tmp_path):
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets

    root = tmp_path / "ds"
    classes = ["big, red car", "dog: husky", "background"]
    for split in ("train", "val"):
        _write_png(root / "images" / split / "x" / "0.png", np.zeros((4, 4, 3)))
        _write_png(root / "labels" / split / "x" / "0.png", np.array([[0, 1, 2, 2]] * 4))
    args = train_command(root, classes, [1.0, 1.0, 0.1], preset="pspnet_demo")
    assert args[:3] == ["omniseg", "train", "pspnet_demo"]
    assert "model.loss.class_weights=[1.0,1.0,0.1]" in args
    cfg = load_config(args[2], shlex.split(" ".join(shlex.quote(a) for a in args))[3:])
    assert list(cfg.model.loss.class_weights) == [1.0, 1.0, 0.1]
    datasets, meta = build_datasets(cfg)
    assert meta.classes == classes and datasets["val"][0]["sem_seg"][0].tolist() == [0, 1, 2, 2]


# ------------------------------------------------------------------------------------------------
# Crops


def test_crops_one_folder_per_present_thing_class(synth_small, tmp_path):
    min_area = 150
    anns = json.loads((synth_small / "annotations" / "instances_train.json").read_text())
    names = {c["id"]: c["name"] for c in anns["categories"]}
    kept = Counter(names[a["category_id"]] for a in anns["annotations"] if a["area"] >= min_area)
    small = sum(a["area"] < min_area for a in anns["annotations"])
    assert small > 0 and len(kept) >= 2  # the test exercises both paths

    report = make_crops(synth_small, tmp_path / "crops", size=40, min_area=min_area)
    assert report.per_class == dict(kept) and report.written == sum(kept.values())
    assert report.skipped_small == small and report.skipped_crowd == 0
    folders = sorted(p.name for p in (tmp_path / "crops").iterdir() if p.is_dir())
    assert folders == sorted(kept)
    for name, n in kept.items():
        files = sorted((tmp_path / "crops" / name).glob("*.png"))
        assert len(files) == n
        assert all(Image.open(f).size == (40, 40) and Image.open(f).mode == "RGB" for f in files)
    assert ClassificationFolder(tmp_path / "crops").classes == sorted(kept)
    # Deterministic, and the COCO-instance reading of the same data gives the same crops.
    cfg = {"format": "coco_instance", "root": str(synth_small), "image_dir": "{split}/images",
           "json": "annotations/instances_{split}.json"}
    make_crops(cfg, tmp_path / "crops2", size=40, min_area=min_area)
    for f in (tmp_path / "crops").rglob("*.png"):
        assert np.array_equal(np.array(Image.open(f)), np.array(Image.open(tmp_path / "crops2" / f.relative_to(
            tmp_path / "crops"))))


def test_crops_errors(tmp_path):
    with pytest.raises(DataError, match="cannot tell the dataset format"):
        make_crops(tmp_path, tmp_path / "out")
    with pytest.raises(DataError, match="not a finished synthetic dataset"):
        make_crops(tmp_path, tmp_path / "out", fmt="synthetic")
    with pytest.raises(ValueError, match="instance annotations"):
        make_crops({"format": "semantic_folder", "root": str(tmp_path)}, tmp_path / "out")


def test_square_window_keeps_context_inside_the_image():
    from omniseg.pssl.crops import square_window

    assert square_window((10, 10, 19, 19), 0.5, 64, 64) == (8, 8, 15)  # 10 px box -> 15 px, centred
    assert square_window((0, 0, 9, 3), 0.5, 64, 64) == (0, 0, 15)      # shifted inside, not padded
    assert square_window((0, 0, 59, 9), 0.5, 20, 64) == (-22, 0, 64)  # taller than the image: centred


# ------------------------------------------------------------------------------------------------
# Classifiers


def test_tiny_classifier_learns_and_reloads(easy_folder, tmp_path, single_thread):
    path = train_classifier(easy_folder, out=tmp_path / "clf.safetensors", iters=60, batch=8, lr=1e-2,
                            image_size=32, timm_kwargs=TINY_RESNET, seed=0)
    info = json.loads(path.with_suffix(".json").read_text())
    losses = info["losses"]
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert info["val_images"] == 2 and info["train_images"] == 22 and info["val_accuracy"] == 1.0
    clf = load_classifier(path)
    assert clf.classes == ["blue", "red"] and clf.image_size == 32 and not clf.model.training
    folder = ClassificationFolder(easy_folder)
    _, val = folder.split(0.1)
    from omniseg.pssl.classifier import normalize, resize

    x = torch.stack([resize(folder[i][0], 32) for i in val])
    pred = clf.model(normalize(x, clf.mean, clf.std)).argmax(1).tolist()
    assert pred == [folder.items[i].label for i in val]
    # Another seed is another ensemble member.
    other = train_classifier(easy_folder, out=tmp_path / "seed1", iters=2, batch=4, image_size=32,
                             timm_kwargs=TINY_RESNET, seed=1)
    assert other == tmp_path / "seed1" / "classifier.safetensors"
    assert not torch.equal(load_classifier(other).model.fc.weight, clf.model.fc.weight)


def test_load_plain_timm_checkpoint(tmp_path):
    import timm

    from omniseg.hub import CheckpointError

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=5, **TINY_RESNET).eval()
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(CheckpointError, match="--arch"):
        load_classifier(tmp_path / "timm.pth")
    clf = load_classifier(tmp_path / "timm.pth", arch="resnet18", timm_kwargs=TINY_RESNET)
    assert clf.num_classes == 5 and clf.image_size == 224 and clf.classes is None
    assert clf.mean == pytest.approx((123.675, 116.28, 103.53))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(clf.model(x), model(x), atol=1e-6)
    assert clf.class_ids_for(["a", "b"]) == [0, 1]
    with pytest.raises(ValueError, match="only 5 outputs"):
        clf.class_ids_for(list("abcdef"))
    with pytest.raises(CheckpointError, match="no such"):
        load_classifier(tmp_path / "missing.pth", arch="resnet18")


# ------------------------------------------------------------------------------------------------
# CLI end to end


def test_cli_crops_classifiers_labels(synth_small, tmp_path, single_thread):
    crops, labels = tmp_path / "crops", tmp_path / "labels"
    result = runner.invoke(app, ["pssl", "crops", str(synth_small), "--out", str(crops), "--size", "32"])
    assert result.exit_code == 0, result.output
    assert "crops in" in result.output and "skipped" in result.output
    classes = ClassificationFolder(crops).classes
    result = runner.invoke(app, ["pssl", "crops", str(synth_small), "--out", str(crops)])
    assert result.exit_code == 2 and "not empty" in result.output

    members = []
    for seed in (0, 1):
        out = tmp_path / f"clf{seed}"
        result = runner.invoke(app, ["pssl", "classifier", str(crops), "--out", str(out), "--iters", "4",
                                     "--batch", "8", "--image-size", "32", "--seed", str(seed),
                                     "--timm-kwargs", json.dumps(TINY_RESNET)])
        assert result.exit_code == 0, result.output
        assert "held-out accuracy" in result.output
        members += ["--classifier", str(out / "classifier.safetensors")]
    result = runner.invoke(app, ["pssl", "classifier", str(crops), "--out", str(tmp_path / "x"),
                                 "--timm-kwargs", "{not json"])
    assert result.exit_code == 2 and "not valid JSON" in result.output

    result = runner.invoke(app, ["pssl", "labels", str(crops), *members, "--out", str(labels), "--n-samples", "2"])
    assert result.exit_code == 0, result.output
    k = len(classes)
    weights = "[" + ",".join(["1.0"] * k + ["0.1"]) + "]"
    command = result.output.strip().splitlines()[-1].strip()
    assert command.startswith("omniseg train pspnet_demo ") and f"model.loss.class_weights={weights}" in command
    info = json.loads((labels / "pssl.json").read_text())
    assert info["train_command"] == command and info["classes"] == classes + ["background"]
    assert sum(info["images"].values()) == len(ClassificationFolder(crops))
    ds = build_dataset(info["data"]["train"], "train")
    assert ds.meta.num_classes == k + 1
    sem = ds[0]["sem_seg"]
    own = classes.index(Path(ds[0]["file_name"]).parent.name)
    assert set(sem.unique().tolist()) == {own, k}
    assert int((sem == own).sum()) == sem.numel() - math.ceil(0.9 * sem.numel())  # distinct saliency values

    result = runner.invoke(app, ["pssl", "labels", str(crops), "--classifier", str(tmp_path / "none.pth"),
                                 "--out", str(tmp_path / "l2")])
    assert result.exit_code == 2 and "no such classifier weights file" in result.output
