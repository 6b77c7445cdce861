"""`turn_quantize`: find Conv/BN/ReLU and Linear patterns on the model's FX graph and make a QAT model.

Working on the traced graph (not a per-model list of layer names) is what lets any torchvision
classifier through: a Conv2d whose only user is a BatchNorm2d is fused with it, a following
ReLU/ReLU6 joins the fusion, and every feature tensor that enters a quantized layer gets exactly
one quantizer (shared by all its users, and skipped where it is already quantized, e.g. a
previous layer's output seen through Flatten or MaxPool).
"""
from __future__ import annotations

import copy
import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.nn import functional as F

from .config import FeatureScaleStatMethod, QuantConfig, ScaleUpdateMethod
from .fake_quant import FeatureQuantizer
from .modules import QuantConv2d, QuantLayer, QuantLinear

# Ops whose output lies on the same quantization grid as their input (values are only moved or
# selected), so a quantized input needs no second quantizer after them. Not Dropout: in
# training it scales the kept values by 1/(1-p), off the grid.
_GRID_PRESERVING_MODULES = (nn.Flatten, nn.MaxPool2d, nn.Identity)
_GRID_PRESERVING_FUNCTIONS = (torch.flatten, F.max_pool2d, torch.reshape)
_GRID_PRESERVING_METHODS = ("flatten", "view", "reshape", "contiguous")
_RELU_FUNCTIONS = (F.relu, torch.relu)


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _activation_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """'relu' / 'relu6' if the node is one of those activations, else None."""
    mod = _module(gm, node)
    if isinstance(mod, nn.ReLU6) or (node.op == "call_function" and node.target is F.relu6):
        return "relu6"
    if isinstance(mod, nn.Hardtanh) and mod.min_val == 0.0 and mod.max_val == 6.0:
        return "relu6"
    if isinstance(mod, nn.ReLU) or (node.op == "call_function" and node.target in _RELU_FUNCTIONS):
        return "relu"
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return "relu"
    return None


def _is_grid_preserving(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(_module(gm, node), _GRID_PRESERVING_MODULES)
    if node.op == "call_function":
        return node.target in _GRID_PRESERVING_FUNCTIONS
    return node.op == "call_method" and node.target in _GRID_PRESERVING_METHODS


def _single_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _call_counts(graph: fx.Graph) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    return counts


def _fuse_layers(gm: fx.GraphModule, config: QuantConfig) -> list[fx.Node]:
    """Replace Conv2d(+BN)(+ReLU/ReLU6) and Linear(+ReLU) nodes with QAT layer nodes."""
    calls = _call_counts(gm.graph)
    new_nodes, erased = [], set()
    for node in list(gm.graph.nodes):
        if node in erased:
            continue
        layer = _module(gm, node)
        if type(layer) not in (nn.Conv2d, nn.Linear) or calls[node.target] != 1 or len(node.args) != 1:
            continue  # a weight-shared layer or an unusual call stays float
        chain, bn = [node], None
        nxt = _single_user(node)
        if isinstance(layer, nn.Conv2d) and nxt is not None:
            cand = _module(gm, nxt)
            if (type(cand) is nn.BatchNorm2d and calls[nxt.target] == 1 and cand.track_running_stats
                    and cand.num_features == layer.out_channels):
                chain.append(nxt)
                bn = cand
        activation = None
        nxt = _single_user(chain[-1])
        if nxt is not None and (kind := _activation_kind(gm, nxt)) is not None:
            chain.append(nxt)
            activation = kind
        qat_cls = QuantConv2d if isinstance(layer, nn.Conv2d) else QuantLinear
        gm.add_submodule(node.target, qat_cls(layer, config, bn=bn, activation=activation))
        with gm.graph.inserting_after(chain[-1]):
            fused = gm.graph.call_module(node.target, args=node.args)
        chain[-1].replace_all_uses_with(fused)
        for old in reversed(chain):
            gm.graph.erase_node(old)
            erased.add(old)
        if bn is not None:  # now reached as <layer>.bn; its old path would register it twice
            gm.delete_submodule(chain[1].target)
        new_nodes.append(fused)
    return new_nodes


def _insert_input_quantizers(gm: fx.GraphModule, layer_nodes: list[fx.Node], config: QuantConfig) -> None:
    """Give every quantized layer a quantized input, reusing an existing quantizer when possible."""
    quantizer_of: dict[fx.Node, FeatureQuantizer] = {
        n: gm.get_submodule(n.target).output_quant for n in layer_nodes}
    for node in layer_nodes:
        layer: QuantLayer = gm.get_submodule(node.target)
        src = node.args[0]
        upstream = src
        while upstream not in quantizer_of and _is_grid_preserving(gm, upstream) and isinstance(upstream.args[0], fx.Node):
            upstream = upstream.args[0]
        if upstream in quantizer_of:
            layer.set_input_quant(quantizer_of[upstream])
            continue
        channels = layer.layer.in_channels if isinstance(layer, QuantConv2d) else layer.layer.in_features
        quantizer = FeatureQuantizer(config, channels, layer.channel_axis)
        name = f"{src.name}_quant"
        gm.add_submodule(name, quantizer)
        with gm.graph.inserting_after(src):
            qnode = gm.graph.call_module(name, args=(src,))
        # Every user sees the quantized tensor, as in the integer model where only it exists.
        src.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quantizer_of[qnode] = quantizer
        quantizer_of[src] = quantizer
        layer.set_input_quant(quantizer)


def turn_quantize(
    model: nn.Module,
    bits: int = 8,
    feature_bits: int = 8,
    feature_scale_stat_method: FeatureScaleStatMethod | str = "PerTensor",
    scale_update_method: ScaleUpdateMethod | str = "MovingAverage",
    momentum: float = 0.99,
    symmetric_features: bool = False,
) -> fx.GraphModule:
    """Return a QAT copy of `model`; the model passed in is left untouched.

    Every Conv2d (any groups) and Linear is quantized: weights symmetric per output channel
    with `bits`, features with `feature_bits` and a running range per tensor or per channel.
    Conv2d followed by BatchNorm2d (and ReLU/ReLU6) is fused. The result is an
    `torch.fx.GraphModule`; `.train()` gives QAT, `.eval()` the integer test phase.
    Raises ValueError on a bad setting, TypeError if the model cannot be traced by torch.fx.
    """
    config = QuantConfig(bits, feature_bits, feature_scale_stat_method, scale_update_method,
                         momentum, symmetric_features)
    training = model.training
    try:
        gm = fx.symbolic_trace(copy.deepcopy(model))
    except Exception as err:  # fx raises many types; the user needs the model name and the cause
        raise TypeError(f"turn_quantize cannot trace {type(model).__name__} with torch.fx: {err}") from err
    layer_nodes = _fuse_layers(gm, config)
    _insert_input_quantizers(gm, layer_nodes, config)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.quant_config = config  # the validated settings, for reports and exporters
    # GraphModule's deepcopy keeps only attributes listed under this meta key.
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["quant_config"] = config
    return gm.train(training)
