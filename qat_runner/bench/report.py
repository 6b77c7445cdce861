"""The benchmark's results as markdown: one table per section, then the targets."""
from __future__ import annotations


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _x(v: float) -> str:
    return f"{v:.2f}x"


def _ms(v: float) -> str:
    return f"{v:.2f}" if v < 100 else f"{v:.0f}"


def _bytes(v: int) -> str:
    return f"{v / 1e6:.2f} MB"


_LABELS = {"float": "float", "ours_qat": "ours QAT", "torch_ao_qat": "torch.ao QAT", "nncf_qat": "NNCF QAT",
           "brevitas_qat": "Brevitas QAT"}
_SHORT = {"ours_qat": "ours", "torch_ao_qat": "torch.ao", "nncf_qat": "NNCF", "brevitas_qat": "Brevitas"}
_PEER_LABELS = {"nncf": "NNCF", "brevitas": "Brevitas"}
DASH = "\u2014"


def _get(row: dict, key: str, fmt) -> str:
    return fmt(row[key]) if key in row else DASH


def _unavailable_lines(what: dict[str, str], labels: dict[str, str] | None = None) -> list[str]:
    labels = labels or {}
    return [f"{labels.get(name, name)}: {reason if reason.startswith('unavailable') else 'unavailable: ' + reason}"
            for name, reason in what.items()]


def training_cost(section: dict) -> str:
    rows_in = section["rows"]
    names = [n for n in _LABELS if any(f"{n}_s" in r for r in rows_in)]
    others = [n for n in names if n != "float"]
    rows = [[f"{r['image_size']}x{r['image_size']}", str(r["batch"]),
             *[_get(r, f"{n}_s", lambda v: f"{v * 1e3:.0f}") for n in names],
             *[_get(r, f"{n.removesuffix('_qat')}_over_float", _x) for n in others],
             _x(r["ours_over_torch_ao"])] for r in rows_in]
    device = section.get("device", "cpu")
    text = f"### 1. Training cost (MobileNetV2, one SGD step, median ms, {device})\n\n" + _table(
        ["input", "batch", *[_LABELS[n] for n in names], *[f"{_SHORT[n]}/float" for n in others], "ours/torch.ao"],
        rows)
    if any("peak_step_mb" in r for r in rows_in):
        mem_names = [n for n in _LABELS if any(n in r.get("peak_step_mb", {}) for r in rows_in)]
        mem_others = [n for n in mem_names if n != "float"]
        mem_rows = [[f"{r['image_size']}x{r['image_size']}", str(r["batch"]),
                     *[f"{r['peak_step_mb'][n]:.0f}" if n in r.get("peak_step_mb", {}) else DASH for n in mem_names],
                     *[_x(r["memory_over_float"][n]) if n in r.get("memory_over_float", {}) else DASH
                       for n in mem_others]] for r in rows_in]
        text += (f"\n\nPeak memory of one step above the model and optimizer state (MB): "
                 f"{section.get('memory', '')}\n\n"
                 + _table(["input", "batch", *[_LABELS[n] for n in mem_names],
                           *[f"{_SHORT[n]}/float" for n in mem_others]], mem_rows))
    missing = _unavailable_lines(section.get("unavailable", {}), _LABELS)
    if missing:
        text += "\n\n" + "\n".join(f"- {line}" for line in missing)
    for p in section.get("profile", []):
        total = p["total_ms"]
        ops = [[o["op"], f"{o['float_ms']:.1f}", f"{o['ours_qat_ms']:.1f}", f"{o['extra_ms']:+.1f}"]
               for o in p["top_ops_ours_minus_float_ms"][:8]]
        text += (f"\n\nProfile {p['image_size']}x{p['image_size']} batch {p['batch']} (torch.profiler self CPU ms "
                 f"per step: float {total['float']:.0f}, ours {total['ours_qat']:.0f}):\n\n"
                 + _table(["op", "float", "ours QAT", "extra"], ops))
    return text


def inference(section: dict) -> str:
    parts = ["### 2. Inference latency (MobileNetV2, median ms per batch)"]
    for runtime in ("onnxruntime", "openvino"):
        sub = section.get(runtime, {})
        if "skipped" in sub:
            parts.append(f"{runtime}: skipped ({sub['skipped']})")
            continue
        rows_in = sub.get("rows", [])
        present = [p for p in _PEER_LABELS if any(f"{p}_int8_ms" in r for r in rows_in)]
        rows = [[runtime, f"{r['image_size']}x{r['image_size']}", str(r["batch"]), _ms(r["float_ms"]),
                 _ms(r["ours_int8_ms"]), _ms(r["ort_int8_ms"]),
                 *[_get(r, f"{p}_int8_ms", _ms) for p in present],
                 _x(r["ours_over_float"]), _x(r["ort_over_float"]),
                 *[_get(r, f"{p}_over_float", _x) for p in present], _x(r["ours_over_ort"])] for r in rows_in]
        parts.append(_table(["runtime", "input", "batch", "float", "ours int8", "onnxruntime int8",
                             *[f"{_PEER_LABELS[p]} int8" for p in present],
                             "ours/float", "onnxruntime int8/float", *[f"{_PEER_LABELS[p]}/float" for p in present],
                             "ours/onnxruntime int8"], rows))
        missing = _unavailable_lines(sub.get("unavailable", {}), _PEER_LABELS)
        if missing:
            parts.append("\n".join(f"- {runtime}, {line}" for line in missing))
    missing = _unavailable_lines(section.get("unavailable", {}), _PEER_LABELS)
    if missing:
        parts.append("\n".join(f"- {line}" for line in missing))
    return "\n\n".join(parts)


def accuracy(section: dict) -> str:
    rows = [[r["method"], r["tool"], str(r["weight_bits"]), f"{r['accuracy']:.2%}",
             " / ".join(f"{a:.2%}" for a in r.get("accuracy_per_seed", [])),
             f"{r['delta_to_float'] * 100:+.2f} pt", _bytes(r["bytes"]), r["scored_in"],
             f"{r['qat_train_seconds']:.0f} s" if "qat_train_seconds" in r else ""] for r in section["rows"]]
    q = section["qat_recipe"]
    seeds = ", ".join(str(seed) for seed in q["seeds"])
    f = section["float_recipe"]
    head = (f"### 3. Accuracy (Fashion-MNIST {section['image_size']}x{section['image_size']}, "
            f"{section['test_images']} test images; QAT: batch {q['batch_size']}, {q['steps']} iterations, "
            f"SGD lr {q['lr']:g} momentum {q['momentum']:g}, one run per seed ({seeds}), mean accuracy; float: "
            f"{f['steps']} steps from scratch, lr {f['lr']:g} {f.get('lr_schedule', 'constant')})")
    text = head + "\n\n" + _table(["method", "tool", "weight bits", "accuracy", "per seed", "vs float", "size",
                                   "scored in", "QAT wall time (median)"], rows)
    missing = _unavailable_lines(section.get("unavailable", {}))
    return text + ("\n\n" + "\n".join(f"- QAT, {line}" for line in missing) if missing else "")


def sizes(section: dict) -> str:
    rows = [[r["artifact"], r["format"], _bytes(r["bytes"]), f"{r['ratio_to_float_onnx']:.1%}",
             f"{r['ratio_to_float_state_dict']:.1%}" if "ratio_to_float_state_dict" in r else ""]
            for r in section["rows"]]
    text = "### 4. Sizes (MobileNetV2, 10 classes)\n\n" + _table(
        ["artifact", "format", "size", "of float ONNX", "of float state_dict"], rows)
    missing = _unavailable_lines(section.get("unavailable", {}))
    return text + ("\n\n" + "\n".join(f"- {line}" for line in missing) if missing else "")


def targets(items: list[dict]) -> str:
    rows = [[t["target"], f"{t['value']:.4g}", f"{t['relation']} {t['limit']:.4g}", "met" if t["met"] else "MISSED"]
            for t in items]
    return "### Targets\n\n" + _table(["target", "measured", "goal", ""], rows)


RENDERERS = {"training_cost": training_cost, "inference": inference, "accuracy": accuracy, "sizes": sizes}


def markdown(results: dict) -> str:
    m = results["meta"]
    machine = m["machine"]
    parts = [f"## qat_runner benchmark ({m['mode']})",
             f"{machine['cpu']}, {machine['cores']} cores, {machine['threads']['torch']} threads; torch "
             f"{machine['versions']['torch']}, onnxruntime {machine['versions']['onnxruntime']}, openvino "
             f"{machine['versions']['openvino'] or 'not installed'}, nncf "
             f"{machine['versions'].get('nncf') or 'not installed'}, brevitas "
             f"{machine['versions'].get('brevitas') or 'not installed'}"
             + (f"; training on {machine['gpu']}" if machine.get("gpu") else "")
             + f". `{machine['command']}` ({m['seconds']:.0f} s). "
             f"{machine['note'].capitalize()}. 1-minute load average at each section's start/end: "
             + ", ".join(f"{k} {v[0]:.1f}/{v[1]:.1f}" for k, v in m.get("load_average", {}).items()) + "."]
    parts += [RENDERERS[name](results[name]) for name in RENDERERS if name in results]
    if results.get("targets"):
        parts.append(targets(results["targets"]))
    return "\n\n".join(parts) + "\n"
