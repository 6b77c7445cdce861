"""The benchmark runs end to end in its smallest setting and writes every section with finite
numbers. No timing thresholds here: speed goals are measured by the benchmark, never asserted."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from qat_runner.bench import SECTIONS, peers, preset, run_benchmark
from qat_runner.bench import __main__ as bench_main
from qat_runner.bench.accuracy import OURS_BN_FROZEN
from qat_runner.bench.float_checkpoint import train_float
from qat_runner.bench import gpu_check
from qat_runner.bench.__main__ import parse_args
from qat_runner.bench.run import non_finite
from qat_runner.bench.settings import FloatRecipe
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
    # the peak-memory subprocesses are covered by the fast test below
    settings = preset("tiny", openvino=openvino_unavailable() is None, memory=False)
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
    assert ("QAT", OURS_BN_FROZEN, 8) in accuracy
    for row in accuracy.values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["bytes"] > 0
        if row["method"] == "QAT":  # one run per seed, the row's accuracy their mean
            assert len(row["accuracy_per_seed"]) == len(settings.qat_recipe.seeds)
            assert row["accuracy"] == pytest.approx(sum(row["accuracy_per_seed"]) / len(row["accuracy_per_seed"]))

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
    results = {"training_cost": {"rows": [
                   {"image_size": 32, "batch": 32, "ours_over_float": 1.2, "ours_over_torch_ao": 0.7},
                   {"image_size": 224, "batch": 8, "ours_over_float": 1.2, "ours_over_torch_ao": 0.5,
                    "ours_qat_s": 1.0, "brevitas_qat_s": 2.0}]},
               "accuracy": {"rows": [
                   {"method": "QAT", "tool": "ours", "weight_bits": 8, "accuracy": 0.85},
                   {"method": "QAT", "tool": "ours, BatchNorm frozen (quant.bn_freeze_step=0)", "weight_bits": 8,
                    "accuracy": 0.87},
                   {"method": "QAT", "tool": "Brevitas", "weight_bits": 8, "accuracy": 0.86}]},
               "sizes": {"rows": [{"artifact": "ours 8-bit", "ratio_to_float_onnx": 0.26}]}}
    met = {t["target"]: t["met"] for t in evaluate(results)}
    assert met == {"our QAT step / float step (32px batch 32)": True,  # goal 1.25 there
                   "our QAT step / float step (224px batch 8)": False,  # goal 1.15 there
                   "our QAT step / torch.ao QAT step (224px batch 8)": True,
                   "our QAT step / Brevitas QAT step (224px batch 8)": True,
                   "our 8-bit QAT int8 accuracy vs Brevitas QAT": False,
                   "our 8-bit QAT, BatchNorm frozen (quant.bn_freeze_step=0) int8 accuracy vs Brevitas QAT": True,
                   "our 8-bit artifact / float ONNX size": True}
    assert non_finite({"a": [1.0, {"b": float("nan")}], "c": float("inf")}) == [".a[1].b", ".c"]


def test_cli_arguments():
    args = parse_args(["--quick", "--sections", "sizes", "accuracy", "--skip-openvino"])
    assert (args.mode, args.sections, args.skip_openvino) == ("quick", ["sizes", "accuracy"], True)
    assert parse_args([]).mode == "full" and parse_args([]).device == "cpu"
    assert parse_args([]).peers == ["nncf", "brevitas"] and parse_args(["--peers"]).peers == []
    assert parse_args(["--device", "cuda", "--no-memory"]).no_memory
    with pytest.raises(ValueError, match="mode"):
        preset("huge")
    with pytest.raises(ValueError, match="sections"):
        preset("quick", sections=("speed",))


def test_peers_and_memory_ratio_in_the_tiny_training_cost(tmp_path):
    """NNCF and Brevitas appear in section 1 with figures (installed: `bench` extra) or with
    "unavailable: <reason>" naming the package (the test extra does not install them); our QAT
    step's peak memory comes with its ratio to the float step's."""
    out = tmp_path / "bench.json"
    settings = preset("tiny", sections=("training_cost",), profile=False)
    run_benchmark(settings, out, command="pytest", cache_dir=tmp_path / "cache")
    results = json.loads(out.read_text())
    section = results["training_cost"]
    row = section["rows"][0]

    for peer in peers.PEERS:
        name = f"{peer}_qat"
        reason = section["unavailable"].get(name)
        if importlib.util.find_spec(peer) is None:
            assert reason == f"unavailable: {peer} is not installed (pip install 'qat_runner[bench]')"
        if reason is None:  # installed and ran: timed next to float
            assert name in section["contenders"] and row[f"{name}_s"] > 0 and row[f"{peer}_over_float"] > 0
        else:
            assert reason.startswith(f"unavailable: {peer} ") and f"{name}_s" not in row
    markdown = out.with_suffix(".md").read_text()
    assert "NNCF QAT" in markdown and "Brevitas QAT" in markdown

    ratio = row["ours_over_float_memory"]
    assert math.isfinite(ratio) and ratio > 0
    assert row["peak_step_mb"]["float"] > 0 and row["peak_step_mb"]["ours_qat"] > 0
    assert row["memory_over_float"]["ours_qat"] == ratio
    assert "Peak memory of one step" in markdown
    assert any(t["target"].startswith("our QAT step / float step, peak memory") for t in results["targets"])


def test_missing_peer_is_reported_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # `import nncf` fails as when it is not installed
    peers._import.cache_clear()
    try:
        assert peers.unavailable("nncf") == "unavailable: nncf is not installed (pip install 'qat_runner[bench]')"
    finally:
        peers._import.cache_clear()
    reason = peers.failure("brevitas", "take a QAT step", RuntimeError("boom\nmore"))
    assert reason.startswith("unavailable: brevitas ") and reason.endswith("take a QAT step with torch "
                                                                         f"{torch.__version__}: RuntimeError: boom")


def test_device_cuda_without_cuda_fails_first_with_one_line(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(bench_main, "run_benchmark", lambda *a, **k: pytest.fail("work started"))
    assert bench_main.main(["--device", "cuda", "--mode", "tiny"]) != 0
    err = capsys.readouterr().err
    assert err == "--device cuda: no CUDA device is available here; use --device cpu\n"
    with pytest.raises(RuntimeError, match="no CUDA device"):
        run_benchmark(preset("tiny", device="cuda"), "unused.json")
    assert gpu_check.main([]) == 2  # the prepared GPU script stops the same way
    assert capsys.readouterr().err == "--device cuda: no CUDA device is available here; use --device cpu\n"
    with pytest.raises(ValueError, match="device"):
        preset("tiny", device="tpu")


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino: the bench extra")
def test_openvino_and_nncf_telemetry_stay_off(tmp_path):
    """`import openvino` alone starts OpenVINO's usage telemetry (and nncf NNCF's); the bench's
    imports go through telemetry.disable(). Checked in a child with its own HOME (where a client
    would write ~/intel) and CI=true as a safety net: the stubs must be in place regardless."""
    code = ("from qat_runner.bench import runtimes, telemetry\n"
            "runtimes.openvino_version()\n"
            "import openvino.tools.ovc.telemetry_utils as t\n"
            "assert t.tm.__name__ == 'openvino.tools.ovc.telemetry_stub', t.tm\n"
            "import importlib.util\n"
            "if importlib.util.find_spec('nncf'):\n"
            "    from qat_runner.bench import peers\n"
            "    assert peers.unavailable('nncf') is None\n"
            "    import nncf.telemetry.wrapper as w\n"
            "    assert type(w.telemetry).__name__ == 'MagicMock', w.telemetry\n")
    env = {**os.environ, "HOME": str(tmp_path), "CI": "true"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "intel").exists()


@pytest.mark.skipif(not (Path(__file__).resolve().parents[2] / ".git").exists(), reason="needs a git checkout")
def test_compare_engines_times_this_engine_against_a_revision(tmp_path):
    """The side-by-side script takes an engine from git history (here HEAD's) and times it next
    to this checkout's and the float step, on a tiny shape."""
    from qat_runner.bench import compare_engines
    old = compare_engines.load_engine("HEAD", tmp_path)
    assert old.__name__ == "engine_HEAD" and callable(old.turn_quantize)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        (row,) = compare_engines.time_steps(old, [(32, 2)], rounds=1, config={})
    finally:
        torch.set_num_threads(threads)
    assert row["float_ms"] > 0 and row["new_ms"] > 0 and row["old_ms"] > 0 and row["old_over_float"] > 0


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_float_recipe_anneals_the_lr_to_zero_or_keeps_it(schedule):
    """The bench's float checkpoint is trained to convergence: a cosine ends at lr 0."""
    recipe = replace(FloatRecipe(), steps=3, batch_size=8, train_images=64, lr=0.02, lr_schedule=schedule)
    _, info = train_float(recipe)
    assert info["final_lr"] == (pytest.approx(0.0, abs=1e-12) if schedule == "cosine" else 0.02)
    assert math.isfinite(info["final_loss"])


def test_float_recipe_refuses_an_unknown_lr_schedule():
    with pytest.raises(ValueError, match=r"lr_schedule='step' is not accepted: use one of cosine, constant"):
        FloatRecipe(lr_schedule="step")
