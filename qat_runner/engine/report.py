"""Which layers are quantized, with what bits: a list of rows for logs and MLflow."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from .modules import QuantLayer


@dataclass(frozen=True)
class LayerReport:
    name: str
    kind: str  # "Conv2d", "Conv2d+BatchNorm2d+relu6", "Linear", ...
    weight_bits: int | None  # None: the layer stayed float
    feature_bits: int | None
    weight_shape: tuple[int, ...]


def quantization_report(model: nn.Module) -> list[LayerReport]:
    """One row per Conv2d/Linear: quantized ones with their bits, float ones with None."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, QuantLayer):
            parts = [type(mod.layer).__name__] + (["BatchNorm2d"] if mod.bn is not None else [])
            parts += [mod.activation] if mod.activation else []
            rows.append(LayerReport(name, "+".join(parts), mod.bits, mod.output_quant.bits,
                                    tuple(mod.layer.weight.shape)))
        elif isinstance(mod, (nn.Conv2d, nn.Linear)) and not _inside_quant_layer(model, name):
            rows.append(LayerReport(name, type(mod).__name__, None, None, tuple(mod.weight.shape)))
    return rows


def _inside_quant_layer(model: nn.Module, name: str) -> bool:
    parent = name.rpartition(".")[0]
    return bool(name) and isinstance(model.get_submodule(parent), QuantLayer)


def format_report(rows: list[LayerReport]) -> str:
    """A fixed-width text table of `quantization_report` rows."""
    header = f"{'layer':40} {'kind':32} {'w bits':>6} {'f bits':>6}  shape"
    lines = [header, "-" * len(header)]
    for r in rows:
        wb = "float" if r.weight_bits is None else str(r.weight_bits)
        fb = "float" if r.feature_bits is None else str(r.feature_bits)
        lines.append(f"{r.name:40} {r.kind:32} {wb:>6} {fb:>6}  {list(r.weight_shape)}")
    return "\n".join(lines)


def report_as_dicts(rows: list[LayerReport]) -> list[dict]:
    return [asdict(r) for r in rows]
