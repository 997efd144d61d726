"""`omniseg bench`: both sides run on the same weights (checked), and the table reports every measure."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from omniseg.bench import BenchSettings, run_bench
from omniseg.cli import app

SMALL = dict(preset="mask2former_r50", size=64, num_classes=5, num_queries=10, warmup=0, repeats=1, threads=1)


def test_bench_against_hf_same_outputs_and_full_table():
    pytest.importorskip("transformers", reason="HF transformers is a test extra")
    result = run_bench(BenchSettings(**SMALL, train_steps=1), progress=lambda _: None)
    names = [r[0] for r in result.rows]
    post = [f"post-processing {task}, {mode}, {inputs}" for task in ("semantic", "panoptic", "instance")
            for inputs in ("model outputs", "shaped outputs") for mode in ("official", "fast")]
    assert names == ["forward", *post, "predict (uint8 image -> panoptic), 1 image", "predict, fast post-processing",
                     "training step, batch 2", "training peak RSS (whole process)"]
    for name, ours, theirs, _ in result.rows:
        assert ours > 0, name
        assert (theirs is None) == ("shaped outputs" in name), name  # HF is timed on the model's outputs
    agreement = [n for n in result.notes if n.startswith("fast vs official")]
    assert len(agreement) == 6  # asserted >= 99.9% inside the bench for panoptic and instance
    assert any(n.startswith("Outputs checked before timing (fp32): max |omniseg - HF|") for n in result.notes)
    rounds = next(n for n in result.notes if n.startswith("Training rows: median over 2 fresh process(es)"))
    assert rounds.count("MiB") == 2 and "omniseg" in rounds and "HF" in rounds
    table = result.table()
    assert "| forward |" in table and "measured fp32 GEMM throughput" in table
    limits = [n for n in result.notes if "GFLOP (matmul/conv); omniseg achieves" in n]
    assert [n.split(":")[0] for n in limits] == ["Forward, batch 1", "Predict (fast post-processing), 1 image",
                                                 "Training step (forward + backward), batch 2"]


def test_bench_without_hf_and_cli_errors(tmp_path):
    result = run_bench(BenchSettings(**SMALL, hf=False, train=False), progress=lambda _: None)
    assert [r[2] for r in result.rows] == [None] * 15 and all(r[1] > 0 for r in result.rows)
    runner = CliRunner()
    bad = runner.invoke(app, ["bench", "maskformer_r50", "--size", "64"])
    assert bad.exit_code == 2 and "Mask2Former presets" in bad.output
    bad = runner.invoke(app, ["bench", "--dtype", "fp8"])
    assert bad.exit_code == 2 and "fp32 or bf16" in bad.output


def test_bench_bf16_is_checked_against_fp32_eager():
    result = run_bench(BenchSettings(**SMALL, hf=False, train=False, dtype="bf16"), progress=lambda _: None)
    note = next(n for n in result.notes if n.startswith("bf16 autocast vs fp32 eager omniseg"))
    assert "asserted <= 5%" in note


def test_check_against_fp32_rejects_a_wrong_result():
    import torch

    from omniseg.bench import _check_against_fp32

    fp32 = {"pred_masks": torch.ones(1, 2, 4, 4), "aux_outputs": [{"pred_masks": torch.full((1, 2, 4, 4), 4.0)}]}
    close = {"pred_masks": torch.ones(1, 2, 4, 4), "aux_outputs": [{"pred_masks": torch.full((1, 2, 4, 4), 4.1)}]}
    assert "max |diff| 0.1" in _check_against_fp32("x", close, fp32)
    far = {"pred_masks": torch.ones(1, 2, 4, 4), "aux_outputs": [{"pred_masks": torch.full((1, 2, 4, 4), 4.5)}]}
    with pytest.raises(AssertionError, match="differ from fp32 eager by 0.5"):
        _check_against_fp32("x", far, fp32)


def test_compile_network_matches_eager_and_leaves_training_eager(synth_root):
    import torch

    from conftest import TINY_MODEL
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets
    from omniseg.models.registry import build_model_from_config

    cfg = load_config("mask2former_demo", [*TINY_MODEL, f"data.train.root={synth_root}", f"data.val.root={synth_root}"])
    _, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        eager = model.forward_raw(x)
        model.compile_network()
        compiled = model.forward_raw(x)
    torch.testing.assert_close(compiled["pred_masks"], eager["pred_masks"], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(compiled["pred_logits"], eager["pred_logits"], atol=1e-4, rtol=1e-4)
    assert "forward_raw" in vars(model)  # the compiled wrapper shadows the method
    outputs, _ = model.training_outputs(x, [])  # training stays eager
    assert outputs["pred_masks"].shape == eager["pred_masks"].shape


def test_interleaved_timing_takes_the_calls_in_turn():
    from omniseg.bench import interleaved_median_ms

    calls = []
    medians = interleaved_median_ms([lambda: calls.append("a"), None, lambda: calls.append("b")], warmup=1, repeats=2)
    assert calls == ["a", "b"] * 3
    assert medians[1] is None and medians[0] >= 0 and medians[2] >= 0


def test_flop_limit_notes_count_the_backward(synth_root):
    """The training step's counted work is forward + backward: about 3x the same batch's forward (each
    matmul's backward is two matmuls; the first layer needs no input gradient, the criterion's matching
    adds a little), and the floor is that work at the given throughput."""
    import torch

    from conftest import TINY_MODEL
    from omniseg.bench import _training_batch, counted_gflop, flop_limit_note, training_step_gflop
    from omniseg.config import load_config
    from omniseg.data.build import build_datasets
    from omniseg.models.registry import build_model_from_config

    cfg = load_config("mask2former_demo", [*TINY_MODEL, f"data.train.root={synth_root}", f"data.val.root={synth_root}"])
    _, meta = build_datasets(cfg, splits=("val",))
    torch.manual_seed(0)
    model = build_model_from_config(cfg, meta).eval()
    settings = BenchSettings(size=64, num_classes=len(meta.classes), train_batch=2)
    images, _ = _training_batch(settings)
    forward = counted_gflop(lambda: model.forward_raw(model.normalize(images)))
    step = training_step_gflop(model, settings)
    assert 2.5 < step / forward < 3.2
    assert not model.training and all(p.grad is None for p in model.parameters())  # left as found
    note = flop_limit_note("Training step", 800.0, 4.0, 320.0)
    assert note == ("Training step: 800 GFLOP (matmul/conv); omniseg achieves 200 GFLOP/s = 62% of the GEMM "
                    "throughput; floor 2.50 s against 4.00 s measured.")
    assert flop_limit_note("Forward", 133.0, 0.5, 350.0).endswith("floor 380 ms against 500 ms measured.")
