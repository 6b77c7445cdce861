"""The benchmark runs end to end in its smallest setting and writes every section with finite
numbers. No timing thresholds here: speed goals are measured by the benchmark, never asserted."""
from __future__ import annotations

import json
import math

import pytest

from qat_runner.bench import SECTIONS, preset, run_benchmark
from qat_runner.bench.__main__ import parse_args
from qat_runner.bench.run import non_finite
from qat_runner.bench.runtimes import openvino_unavailable
from qat_runner.bench.targets import evaluate
from qat_runner.bench.timing import alternate


def numbers(value):
    """Every number in a JSON-like value (bools excluded)."""
    if isinstance(value, dict):
        return [n for v in value.values() for n in numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in numbers(v)]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    return []


@pytest.mark.slow
def test_tiny_benchmark_writes_every_section_with_finite_numbers(tmp_path):
    out = tmp_path / "bench.json"
    settings = preset("tiny", openvino=openvino_unavailable() is None)
    run_benchmark(settings, out, command="pytest", cache_dir=tmp_path / "cache")

    results = json.loads(out.read_text())
    assert set(SECTIONS) <= set(results)
    assert all(math.isfinite(n) for n in numbers(results))

    cost = results["training_cost"]["rows"]
    assert len(cost) == len(settings.train_shapes)
    for row in cost:
        for key in ("float_s", "ours_qat_s", "torch_ao_qat_s", "ours_over_float", "ours_over_torch_ao"):
            assert row[key] > 0

    inference = results["inference"]
    runtimes = ["onnxruntime"] + (["openvino"] if settings.openvino else [])
    for runtime in runtimes:
        rows = inference[runtime]["rows"]
        assert len(rows) == len(settings.infer_sizes) * len(settings.infer_batches)
        for row in rows:
            for key in ("float_ms", "ours_int8_ms", "ort_int8_ms", "ours_over_float", "ours_over_ort"):
                assert row[key] > 0
    if not settings.openvino:
        assert inference["openvino"]["skipped"]

    accuracy = {(r["method"], r["tool"], r["weight_bits"]): r for r in results["accuracy"]["rows"]}
    assert ("float", "torchvision", 32) in accuracy
    assert ("QAT", "ours", 8) in accuracy and ("PTQ", "onnxruntime quantize_static", 8) in accuracy
    assert any(tool.startswith("torch.ao") for _, tool, _ in accuracy)
    for row in accuracy.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["bytes"] > 0

    sizes = {r["artifact"]: r for r in results["sizes"]["rows"]}
    for bits in settings.size_bits:
        assert sizes[f"ours {bits}-bit"]["bytes"] < sizes["float ONNX"]["bytes"]
    assert sizes["torch.ao int8 state_dict"]["bytes"] > 0

    assert results["targets"] and all(isinstance(t["met"], bool) for t in results["targets"])
    meta = results["meta"]
    assert meta["machine"]["cores"] >= 1 and meta["machine"]["threads"]["onnxruntime_intra_op"] == settings.threads
    assert meta["machine"]["versions"]["torch"] and meta["machine"]["command"] == "pytest"
    markdown = out.with_suffix(".md").read_text()
    assert "Training cost" in markdown and "Accuracy" in markdown and "Targets" in markdown


def test_alternate_rotates_and_takes_medians():
    calls = []
    timings = alternate({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warmup, then rotating starts
    assert set(timings) == {"a", "b"} and all(len(t.samples) == 3 for t in timings.values())
    with pytest.raises(ValueError, match="rounds"):
        alternate({"a": lambda: None}, rounds=0)


def test_targets_and_non_finite_check():
    results = {"training_cost": {"rows": [{"image_size": 32, "batch": 32, "ours_over_float": 1.2,
                                           "ours_over_torch_ao": 0.7}]},
               "sizes": {"rows": [{"artifact": "ours 8-bit", "ratio_to_float_onnx": 0.26}]}}
    met = {t["target"]: t["met"] for t in evaluate(results)}
    assert met == {"our QAT step / float step (32px batch 32)": True,
                   "our QAT step / torch.ao QAT step (32px batch 32)": False,
                   "our 8-bit artifact / float ONNX size": True}
    assert non_finite({"a": [1.0, {"b": float("nan")}], "c": float("inf")}) == [".a[1].b", ".c"]


def test_cli_arguments():
    args = parse_args(["--quick", "--sections", "sizes", "accuracy", "--skip-openvino"])
    assert (args.mode, args.sections, args.skip_openvino) == ("quick", ["sizes", "accuracy"], True)
    assert parse_args([]).mode == "full"
    with pytest.raises(ValueError, match="mode"):
        preset("huge")
    with pytest.raises(ValueError, match="sections"):
        preset("quick", sections=("speed",))
