"""turn_quantize on real architectures: torchvision mobilenet_v2 and resnet18, and a LeNet with a
Linear head. Every Conv2d/Linear is quantized, BN/ReLU(6) are fused where they follow, the QAT copy
trains and evaluates, and the model passed in is left untouched."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import fx, nn

from qat_runner.engine import FeatureQuantizer, QuantLayer, calibrate, quantization_report, turn_quantize


def build(name: str, make_lenet) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if name == "mobilenet_v2":
        return torchvision.models.mobilenet_v2(weights=None, num_classes=10), (2, 3, 64, 64)
    if name == "resnet18":
        return torchvision.models.resnet18(weights=None, num_classes=10), (2, 3, 64, 64)
    return make_lenet(), (2, 1, 8, 8)


MODELS = ["mobilenet_v2", "resnet18", "lenet"]


def weighted_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def snapshot(model: nn.Module):
    return ({n: type(m) for n, m in model.named_modules()},
            {k: v.clone() for k, v in model.state_dict().items()})


def assert_untouched(model: nn.Module, before) -> None:
    types, state = before
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert not any(isinstance(m, (QuantLayer, FeatureQuantizer)) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == state.keys()
    for k in state:
        assert torch.equal(after[k], state[k]), k


@pytest.mark.parametrize("name", MODELS)
def test_every_conv_and_linear_is_quantized(name, make_lenet):
    model, _ = build(name, make_lenet)
    gm = turn_quantize(model, bits=4, feature_bits=6)
    assert isinstance(gm, fx.GraphModule)
    rows = quantization_report(gm)
    originals = weighted_modules(model)
    assert len(rows) == len(originals)
    assert all(r.weight_bits == 4 and r.feature_bits == 6 for r in rows)
    # Same layers under the same names, with the same weight shapes.
    assert {r.name: r.weight_shape for r in rows} == {n: tuple(m.weight.shape) for n, m in originals.items()}
    quant_layers = [m for m in gm.modules() if isinstance(m, QuantLayer)]
    assert len(quant_layers) == len(originals)
    # Every quantized layer has a quantized input.
    assert all(isinstance(m.input_quant, FeatureQuantizer) for m in quant_layers)


@pytest.mark.parametrize("name", MODELS)
def test_train_backward_and_eval_forward(name, make_lenet):
    model, shape = build(name, make_lenet)
    model.train()
    before = snapshot(model)
    gm = turn_quantize(model)
    assert gm.training
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)

    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    out = gm(x)
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()
    loss = nn.functional.cross_entropy(out, torch.tensor([1, 2]))
    loss.backward()
    for m in gm.modules():
        if isinstance(m, QuantLayer):
            assert m.layer.weight.grad is not None
            assert torch.isfinite(m.layer.weight.grad).all()
    opt.step()

    gm.eval()
    with torch.no_grad():
        out_eval = gm(x)
    assert out_eval.shape == (shape[0], 10)
    assert torch.isfinite(out_eval).all()

    # The model passed in: same module types, same weights and buffers, still training.
    assert_untouched(model, before)
    assert model.training
    assert all(type(m) in (nn.Conv2d, nn.Linear) for m in weighted_modules(model).values())


def test_training_flag_is_kept(make_lenet):
    model = make_lenet().eval()
    assert not turn_quantize(model).training
    assert turn_quantize(model.train()).training


def test_calibrated_lenet_is_close_to_float(make_lenet, digits):
    """At 8 bits the integer test phase approximates the float model (after PTQ calibration)."""
    model = make_lenet().eval()
    gm = turn_quantize(model)
    batches = [digits.x_train[i:i + 100] for i in range(0, 400, 100)]
    calibrate(gm, batches, 4)
    x = digits.x_test[:200]
    with torch.no_grad():
        ref, out = model(x), gm(x)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel


def _expected_kinds_from_sequential_siblings(model: nn.Module) -> dict[str, str]:
    """For Conv2d modules inside nn.Sequential containers: 'Conv2d+BatchNorm2d' if the next
    sibling is a BatchNorm2d, plus '+relu6' / '+relu' if the one after is a ReLU6 / ReLU."""
    expected = {}
    for parent_name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        kids = list(parent.named_children())
        for i, (child_name, child) in enumerate(kids):
            if not isinstance(child, nn.Conv2d):
                continue
            kind = "Conv2d"
            nxt = kids[i + 1][1] if i + 1 < len(kids) else None
            if isinstance(nxt, nn.BatchNorm2d):
                kind += "+BatchNorm2d"
                act = kids[i + 2][1] if i + 2 < len(kids) else None
                if isinstance(act, nn.ReLU6):
                    kind += "+relu6"
                elif isinstance(act, nn.ReLU):
                    kind += "+relu"
            expected[f"{parent_name}.{child_name}" if parent_name else child_name] = kind
    return expected


def test_mobilenet_v2_bn_and_relu6_fused(make_lenet):
    model, _ = build("mobilenet_v2", make_lenet)
    rows = {r.name: r for r in quantization_report(turn_quantize(model))}
    feature_convs = [n for n, m in model.named_modules() if n.startswith("features.") and isinstance(m, nn.Conv2d)]
    assert len(feature_convs) == 52
    for n in feature_convs:
        assert "BatchNorm2d" in rows[n].kind, rows[n]
    expected = _expected_kinds_from_sequential_siblings(model)
    assert set(feature_convs) <= set(expected)
    n_relu6 = 0
    for n in feature_convs:
        assert rows[n].kind == expected[n], (n, rows[n].kind, expected[n])
        n_relu6 += expected[n].endswith("relu6")
    assert n_relu6 == 35  # 52 convs minus the 17 linear bottleneck projections
    assert rows["classifier.1"].kind == "Linear"
    # The fused BN modules are not called by the graph any more.
    gm = turn_quantize(model)
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert not any(isinstance(gm.get_submodule(t), nn.BatchNorm2d) for t in called)
    assert not any(isinstance(gm.get_submodule(t), nn.ReLU6) for t in called)


@pytest.mark.parametrize("name", MODELS)
def test_fused_modules_are_not_left_registered(name, make_lenet):
    """A BatchNorm2d fused into a QuantLayer lives there only: not also at its old path, where it
    would be listed twice in state_dict() (and in print(model), and in any exporter that walks
    the module tree)."""
    model, _ = build(name, make_lenet)
    gm = turn_quantize(model)
    leftover = [n for n, m in gm.named_modules(remove_duplicate=False)
                if isinstance(m, nn.BatchNorm2d) and not isinstance(gm.get_submodule(n.rpartition(".")[0]), QuantLayer)]
    assert not leftover, f"{len(leftover)} fused BatchNorm2d still registered at their old path, e.g. {leftover[:3]}"
    names = [n for n, _ in gm.named_modules(remove_duplicate=False)]
    assert len(names) == len({n for n, _ in gm.named_modules()})
    # Every state_dict entry is a distinct tensor.
    state = gm.state_dict(keep_vars=True)
    assert len(state) == len({id(v) for v in state.values()})


def test_resnet18_fusion_kinds(make_lenet):
    model, _ = build("resnet18", make_lenet)
    rows = {r.name: r.kind for r in quantization_report(turn_quantize(model))}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        # torchvision's BasicBlock: conv1 -> bn1 -> relu, conv2 -> bn2 -> (+ identity) -> relu;
        # downsample = Sequential(conv, bn); the stem conv1 -> bn1 -> relu.
        if name.endswith("conv1"):
            assert rows[name] == "Conv2d+BatchNorm2d+relu", name
        else:
            assert rows[name] == "Conv2d+BatchNorm2d", name
    assert rows["fc"] == "Linear"


def test_lenet_fusion_kinds(make_lenet):
    rows = {r.name: r.kind for r in quantization_report(turn_quantize(make_lenet()))}
    assert rows == {"conv1": "Conv2d+BatchNorm2d+relu", "conv2": "Conv2d+BatchNorm2d+relu6",
                    "fc1": "Linear+relu", "fc2": "Linear"}


def test_lenet_quantizers_are_shared_not_duplicated(make_lenet):
    """conv2's output quantizer is fc1's input quantizer (MaxPool/flatten keep the grid)."""
    gm = turn_quantize(make_lenet())
    conv1, conv2, fc1, fc2 = (gm.get_submodule(n) for n in ("conv1", "conv2", "fc1", "fc2"))
    assert conv2.input_quant is conv1.output_quant
    assert fc1.input_quant is conv2.output_quant
    assert fc2.input_quant is fc1.output_quant
    assert conv1.input_quant is not None and conv1.input_quant is not conv1.output_quant
    quantizers = [m for m in gm.modules() if isinstance(m, FeatureQuantizer)]
    assert len(quantizers) == 5  # the input + one per layer output


def test_weight_shared_layer_stays_float():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.fc(self.fc(x)))

    rows = {r.name: r for r in quantization_report(turn_quantize(Shared()))}
    assert rows["fc"].weight_bits is None and rows["fc"].kind == "Linear"
    assert rows["head"].weight_bits == 8


class MLPWithDropout(nn.Module):
    """Linear -> ReLU -> Dropout -> Linear: dropout rescales by 1/(1-p) in training."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.relu = nn.ReLU()
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc2(self.drop(self.relu(self.fc1(x))))


def _inputs_on_grid(gm: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Run gm on x and return, per quantized layer, the largest distance of its input (in units
    of its input quantizer's step) from the integer grid, or inf if outside the integer range."""
    seen: dict[str, float] = {}
    handles = []
    for name, m in gm.named_modules():
        if isinstance(m, QuantLayer):
            def hook(mod, args, name=name):
                q, inp = mod.input_quant, args[0].detach()
                if q.per_channel and q.channel_axis == 1 and inp.dim() == 2 and inp.shape[1] != q.scale.numel():
                    inp = inp.reshape(inp.shape[0], q.scale.numel(), -1)  # conv features, flattened
                axis = q.channel_axis % inp.dim()
                view = [1] * inp.dim()
                view[axis] = -1
                scale = q.scale.reshape(view) if q.per_channel else q.scale
                zp = q.zero_point.reshape(view) if q.per_channel else q.zero_point
                levels = inp / scale + zp
                dist = (levels - levels.round()).abs().max().item()
                if levels.round().min() < q.quant_min or levels.round().max() > q.quant_max:
                    dist = float("inf")
                seen[name] = dist
            handles.append(m.register_forward_pre_hook(hook))
    try:
        gm(x)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name,stat", [("mobilenet_v2", "PerTensor"), ("resnet18", "PerTensor"),
                                       ("lenet", "PerTensor"), ("lenet", "PerChannel"),
                                       ("mlp_dropout", "PerTensor")])
def test_every_quantized_layer_sees_a_quantized_input(name, stat, mode, make_lenet):
    """What enters a quantized layer is on its input quantizer's integer grid, in training as in
    the test phase: otherwise the trained model is not the integer model that ships."""
    if name == "mlp_dropout":
        torch.manual_seed(0)
        model, shape = MLPWithDropout(), (32, 12)
    else:
        model, shape = build(name, make_lenet)
    gm = turn_quantize(model, feature_scale_stat_method=stat)
    g = torch.Generator().manual_seed(2)
    gm.train()
    gm(torch.randn(shape, generator=g))  # sets the ranges
    getattr(gm, mode)()
    dist = _inputs_on_grid(gm, torch.randn(shape, generator=g))
    assert len(dist) == len(weighted_modules(model))
    off = {k: v for k, v in dist.items() if not v < 1e-2}
    assert not off, f"inputs off the quantization grid (in steps): {off}"


def test_state_dict_round_trip_and_deepcopy(make_lenet, digits):
    """A calibrated QAT model's state restores into a fresh turn_quantize copy of the same model,
    and a deep copy keeps the quantizers shared between layers."""
    import copy

    model = make_lenet()
    gm = turn_quantize(model)
    calibrate(gm, [digits.x_train[:200]], 1)
    x = digits.x_test[:50]
    with torch.no_grad():
        expected = gm(x)

    fresh = turn_quantize(model)
    fresh.load_state_dict(gm.state_dict())
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)

    dup = copy.deepcopy(gm)
    assert dup.conv2.input_quant is dup.conv1.output_quant
    assert dup.conv2.input_quant is not gm.conv1.output_quant
    with torch.no_grad():
        assert torch.equal(dup(x), expected)
