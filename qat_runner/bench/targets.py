"""The issue's targets, checked against a run's results (reported, never asserted in tests)."""
from __future__ import annotations


def _target(name: str, value: float, limit: float, at_most: bool) -> dict:
    met = value <= limit if at_most else value >= limit
    return {"target": name, "value": value, "limit": limit, "relation": "<=" if at_most else ">=", "met": met}


# Issue 11's goals for our QAT step / the float step, per (image size, batch); 1.3 elsewhere.
STEP_RATIO_LIMITS = {(224, 8): 1.15, (32, 32): 1.25}
PEER_STEPS = {"nncf_qat_s": "NNCF", "brevitas_qat_s": "Brevitas"}
PEER_TOOLS = ("torch.ao", "NNCF", "Brevitas")


def evaluate(results: dict) -> list[dict]:
    """One entry per target and configuration, for the sections present in `results`."""
    out: list[dict] = []
    for row in results.get("training_cost", {}).get("rows", []):
        shape = (row["image_size"], row["batch"])
        where = f"{shape[0]}px batch {shape[1]}"
        out.append(_target(f"our QAT step / float step ({where})", row["ours_over_float"],
                           STEP_RATIO_LIMITS.get(shape, 1.3), True))
        if shape[0] == 224:
            out.append(_target(f"our QAT step / torch.ao QAT step ({where})", row["ours_over_torch_ao"], 0.6, True))
        for key, peer in PEER_STEPS.items():
            if key in row:
                out.append(_target(f"our QAT step / {peer} QAT step ({where})", row["ours_qat_s"] / row[key], 1.0, True))
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
    others = [("float", lambda r: r["method"] == "float"),
              ("onnxruntime PTQ", lambda r: r["tool"].startswith("onnxruntime"))]
    others += [(f"{tool} QAT", lambda r, tool=tool: r["method"] == "QAT" and r["tool"].startswith(tool))
               for tool in PEER_TOOLS]
    for ours in (r for r in rows if r["tool"].startswith("ours") and r["method"] == "QAT" and r["weight_bits"] == 8):
        name = "our 8-bit QAT" + ("" if ours["tool"] == "ours" else ours["tool"].removeprefix("ours"))
        for label, other in others:
            ref = next((r for r in rows if other(r)), None)
            if ref is not None:
                out.append(_target(f"{name} int8 accuracy vs {label}", ours["accuracy"], ref["accuracy"], False))
    for row in results.get("sizes", {}).get("rows", []):
        if row["artifact"] == "ours 8-bit":
            out.append(_target("our 8-bit artifact / float ONNX size", row["ratio_to_float_onnx"], 0.27, True))
        if row["artifact"] == "ours 4-bit":
            out.append(_target("our 4-bit artifact / float ONNX size", row["ratio_to_float_onnx"], 0.15, True))
    return out
