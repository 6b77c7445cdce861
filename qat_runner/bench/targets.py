"""The issue's targets, checked against a run's results (reported, never asserted in tests)."""
from __future__ import annotations


def _target(name: str, value: float, limit: float, at_most: bool) -> dict:
    met = value <= limit if at_most else value >= limit
    return {"target": name, "value": value, "limit": limit, "relation": "<=" if at_most else ">=", "met": met}


def evaluate(results: dict) -> list[dict]:
    """One entry per target and configuration, for the sections present in `results`."""
    out: list[dict] = []
    for row in results.get("training_cost", {}).get("rows", []):
        where = f"{row['image_size']}px batch {row['batch']}"
        out.append(_target(f"our QAT step / float step ({where})", row["ours_over_float"], 1.3, True))
        out.append(_target(f"our QAT step / torch.ao QAT step ({where})", row["ours_over_torch_ao"], 0.6, True))
        if "ours_over_float_memory" in row:
            out.append(_target(f"our QAT step / float step, peak memory ({where})", row["ours_over_float_memory"],
                               1.3, True))
    inference = results.get("inference", {})
    for runtime in ("onnxruntime", "openvino"):
        for row in inference.get(runtime, {}).get("rows", []):
            where = f"{runtime}, {row['image_size']}px batch {row['batch']}"
            out.append(_target(f"our int8 / onnxruntime's int8 latency ({where})", row["ours_over_ort"], 1.05, True))
            if runtime == "openvino":
                out.append(_target(f"our int8 / float latency ({where})", row["ours_over_float"], 0.75, True))
    rows = results.get("accuracy", {}).get("rows", [])
    ours8 = next((r for r in rows if r["tool"] == "ours" and r["method"] == "QAT" and r["weight_bits"] == 8), None)
    if ours8 is not None:
        for label, other in (("float", lambda r: r["method"] == "float"),
                             ("onnxruntime PTQ", lambda r: r["tool"].startswith("onnxruntime")),
                             ("torch.ao QAT", lambda r: r["tool"].startswith("torch.ao"))):
            ref = next((r for r in rows if other(r)), None)
            if ref is not None:
                out.append(_target(f"our 8-bit QAT int8 accuracy vs {label}", ours8["accuracy"], ref["accuracy"], False))
    for row in results.get("sizes", {}).get("rows", []):
        if row["artifact"] == "ours 8-bit":
            out.append(_target("our 8-bit artifact / float ONNX size", row["ratio_to_float_onnx"], 0.27, True))
        if row["artifact"] == "ours 4-bit":
            out.append(_target("our 4-bit artifact / float ONNX size", row["ratio_to_float_onnx"], 0.15, True))
    return out
