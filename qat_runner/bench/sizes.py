"""Section 4: what each tool ships, in bytes, against the float ONNX of the same model.

Ours at every bit width are PTQ-calibrated exports (training changes values, not the size);
torch.ao's int8 model is measured as the state_dict it is saved as, next to the float
state_dict of the same model for a like-for-like ratio. NNCF's and Brevitas's ONNX as their
exporters write them (NNCF's QDQ keeps float weights; Brevitas's QCDQ stores int8 ones).
"""
from __future__ import annotations

from . import contenders, peers
from .settings import BenchSettings
from .workspace import Workspace


def run(settings: BenchSettings, ws: Workspace) -> dict:
    size = ws.train_size
    float_bytes = ws.float_onnx(size).stat().st_size
    rows = [{"artifact": "float ONNX", "format": "onnx", "weight_bits": 32, "bytes": float_bytes}]
    for bits in settings.size_bits:
        rows.append({"artifact": f"ours {bits}-bit", "format": "onnx (int4-packed)" if bits <= 4 else "onnx",
                     "weight_bits": bits, "bytes": ws.ours_ptq(bits, size)[1].stat().st_size})
    rows.append({"artifact": "onnxruntime quantize_static", "format": "onnx", "weight_bits": 8,
                 "bytes": ws.ort_int8(size).stat().st_size})
    for peer in settings.peers:
        path = ws.peer_int8(peer, size)
        if path is not None:
            rows.append({"artifact": f"{peers.LABELS[peer]} int8", "format": peers.ARTIFACT_FORMAT[peer],
                         "weight_bits": 8, "bytes": path.stat().st_size})
    float_state_bytes = contenders.state_dict_bytes(ws.float_model())
    rows.append({"artifact": "float state_dict", "format": "torch.save", "weight_bits": 32,
                 "bytes": float_state_bytes})
    ao_int8 = contenders.torch_ao_convert(ws.torch_ao_calibrated())
    rows.append({"artifact": "torch.ao int8 state_dict", "format": "torch.save", "weight_bits": 8,
                 "bytes": contenders.state_dict_bytes(ao_int8)})
    for row in rows:
        row["ratio_to_float_onnx"] = row["bytes"] / float_bytes
    for row in rows[-2:]:
        row["ratio_to_float_state_dict"] = row["bytes"] / float_state_bytes
    return {"model": "mobilenet_v2", "image_size": size, "rows": rows,
            "unavailable": {peers.LABELS[p]: ws.unavailable[p] for p in settings.peers if p in ws.unavailable}}
