"""Section 2: latency of the float ONNX, our int8 artifact, onnxruntime's own int8 artifact and the
peers' ONNX (NNCF, Brevitas: optional) of the same float model, in onnxruntime and (optional
extra) in OpenVINO. The int8 files are PTQ-calibrated: a QAT artifact has the same graph."""
from __future__ import annotations

import logging

from . import fashion, peers, runtimes
from .settings import BenchSettings
from .timing import alternate
from .workspace import Workspace

log = logging.getLogger(__name__)

FILES = ("float", "ours_int8", "ort_int8")  # always there; then f"{peer}_int8" per available peer


def _row(runtime: str, size: int, batch: int, ms: dict[str, float]) -> dict:
    row = {"runtime": runtime, "image_size": size, "batch": batch,
           **{f"{name}_ms": value for name, value in ms.items()},
           "ours_over_float": ms["ours_int8"] / ms["float"],
           "ort_over_float": ms["ort_int8"] / ms["float"],
           "ours_over_ort": ms["ours_int8"] / ms["ort_int8"]}
    for peer in peers.PEERS:
        if f"{peer}_int8" in ms:
            row[f"{peer}_over_float"] = ms[f"{peer}_int8"] / ms["float"]
            row[f"ours_over_{peer}"] = ms["ours_int8"] / ms[f"{peer}_int8"]
    return row


def _time(runners: dict, x, settings: BenchSettings) -> dict[str, float]:
    calls = {name: (lambda run=run: run(x)) for name, run in runners.items()}
    timings = alternate(calls, settings.infer_rounds, settings.infer_warmup, settings.min_sample_s)
    return {name: t.median_s * 1e3 for name, t in timings.items()}


def _runners(make, files: dict, runtime: str, unavailable: dict[str, str]) -> dict:
    """One runner per file; a peer's file the runtime cannot load or run is reported, not timed."""
    out = {}
    for name, path in files.items():
        peer = name.removesuffix("_int8")
        if peer in unavailable:
            continue
        try:
            out[name] = make(path)
        except Exception as err:
            if peer not in peers.PEERS:
                raise
            unavailable[peer] = peers.failure(peer, f"load its ONNX in {runtime}", err)
            log.warning("%s", unavailable[peer])
    return out


def _checked(runners: dict, x, runtime: str, unavailable: dict[str, str]) -> dict:
    for name in list(runners):
        peer = name.removesuffix("_int8")
        if peer not in peers.PEERS:
            continue
        try:
            runners[name](x)
        except Exception as err:
            unavailable[peer] = peers.failure(peer, f"run its ONNX in {runtime}", err)
            log.warning("%s", unavailable[peer])
            del runners[name]
    return runners


def run(settings: BenchSettings, ws: Workspace) -> dict:
    files = {size: {"float": ws.float_onnx(size), "ours_int8": ws.ours_ptq(8, size)[1],
                    "ort_int8": ws.ort_int8(size)} for size in settings.infer_sizes}
    for peer in settings.peers:
        for size in settings.infer_sizes:
            path = ws.peer_int8(peer, size)
            if path is not None:
                files[size][f"{peer}_int8"] = path
    for size in settings.infer_sizes:  # a peer that failed at one size is left out at all
        files[size] = {k: v for k, v in files[size].items() if k.removesuffix("_int8") not in ws.unavailable}
    inputs = {(size, batch): fashion.load("test", size, max(settings.infer_batches)).x[:batch].numpy()
              for size in settings.infer_sizes for batch in settings.infer_batches}

    ort_missing: dict[str, str] = {}
    ort_rows = []
    for size in settings.infer_sizes:
        runners = _runners(lambda p: runtimes.ort_runner(p, settings.threads), files[size], "onnxruntime",
                           ort_missing)
        for batch in settings.infer_batches:
            x = inputs[size, batch]
            ort_rows.append(_row("onnxruntime", size, batch,
                                 _time(_checked(runners, x, "onnxruntime", ort_missing), x, settings)))
    result = {"onnxruntime": {"session_options": runtimes.ORT_OPTIONS, "rows": ort_rows},
              "our_artifact": "8-bit weights, 8-bit features, PTQ-calibrated (a QAT artifact has the same graph)",
              "peer_artifacts": {p: peers.ARTIFACT_FORMAT[p] + ", calibrated (a QAT artifact has the same graph)"
                                 for p in settings.peers},
              "unavailable": {p: ws.unavailable[p] for p in settings.peers if p in ws.unavailable},
              "files": {str(size): {k: str(v) for k, v in f.items()} for size, f in files.items()}}
    if ort_missing:
        result["onnxruntime"]["unavailable"] = ort_missing

    reason = None if settings.openvino else "disabled (--skip-openvino)"
    reason = reason or runtimes.openvino_unavailable()
    if reason is not None:
        result["openvino"] = {"skipped": reason}
        return result
    ov_missing: dict[str, str] = {}
    ov_rows = []
    for size in settings.infer_sizes:
        for batch in settings.infer_batches:
            x = inputs[size, batch]
            runners = _runners(lambda p: runtimes.openvino_runner(p, settings.threads, x.shape), files[size],
                               "OpenVINO", ov_missing)
            ov_rows.append(_row("openvino", size, batch, _time(_checked(runners, x, "OpenVINO", ov_missing),
                                                                 x, settings)))
    result["openvino"] = {"version": runtimes.openvino_version(), "config": runtimes.OPENVINO_CONFIG,
                          "rows": ov_rows}
    if ov_missing:
        result["openvino"]["unavailable"] = ov_missing
    return result
