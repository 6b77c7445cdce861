"""Section 2: latency of the float ONNX, our int8 artifact and onnxruntime's own int8 artifact
of the same float model, in onnxruntime and (optional extra) in OpenVINO."""
from __future__ import annotations

from . import fashion, runtimes
from .settings import BenchSettings
from .timing import alternate
from .workspace import Workspace

FILES = ("float", "ours_int8", "ort_int8")


def _row(runtime: str, size: int, batch: int, ms: dict[str, float]) -> dict:
    return {"runtime": runtime, "image_size": size, "batch": batch,
            **{f"{name}_ms": ms[name] for name in FILES},
            "ours_over_float": ms["ours_int8"] / ms["float"],
            "ort_over_float": ms["ort_int8"] / ms["float"],
            "ours_over_ort": ms["ours_int8"] / ms["ort_int8"]}


def _time(runners: dict, x, settings: BenchSettings) -> dict[str, float]:
    calls = {name: (lambda run=run: run(x)) for name, run in runners.items()}
    timings = alternate(calls, settings.infer_rounds, settings.infer_warmup, settings.min_sample_s)
    return {name: t.median_s * 1e3 for name, t in timings.items()}


def run(settings: BenchSettings, ws: Workspace) -> dict:
    files = {size: {"float": ws.float_onnx(size), "ours_int8": ws.ours_ptq(8, size)[1],
                    "ort_int8": ws.ort_int8(size)} for size in settings.infer_sizes}
    inputs = {(size, batch): fashion.load("test", size, max(settings.infer_batches)).x[:batch].numpy()
              for size in settings.infer_sizes for batch in settings.infer_batches}

    ort_rows = []
    for size in settings.infer_sizes:
        runners = {name: runtimes.ort_runner(path, settings.threads) for name, path in files[size].items()}
        for batch in settings.infer_batches:
            ort_rows.append(_row("onnxruntime", size, batch, _time(runners, inputs[size, batch], settings)))
    result = {"onnxruntime": {"session_options": runtimes.ORT_OPTIONS, "rows": ort_rows},
              "our_artifact": "8-bit weights, 8-bit features, PTQ-calibrated (a QAT artifact has the same graph)",
              "files": {str(size): {k: str(v) for k, v in f.items()} for size, f in files.items()}}

    reason = None if settings.openvino else "disabled (--skip-openvino)"
    reason = reason or runtimes.openvino_unavailable()
    if reason is not None:
        result["openvino"] = {"skipped": reason}
        return result
    ov_rows = []
    for size in settings.infer_sizes:
        for batch in settings.infer_batches:
            x = inputs[size, batch]
            runners = {name: runtimes.openvino_runner(path, settings.threads, x.shape)
                       for name, path in files[size].items()}
            ov_rows.append(_row("openvino", size, batch, _time(runners, x, settings)))
    result["openvino"] = {"version": runtimes.openvino_version(), "config": runtimes.OPENVINO_CONFIG,
                          "rows": ov_rows}
    return result
