"""`turn_quantize`: find Conv/BN/ReLU and Linear patterns on the model's FX graph and make a QAT model.

Working on the traced graph (not a per-model list of layer names) is what lets any torchvision
classifier through: a Conv2d whose only user is a BatchNorm2d is fused with it, a following
ReLU/ReLU6 joins the fusion, and every feature tensor that enters a quantized layer gets exactly
one quantizer (shared by all its users, and skipped where it is already quantized, e.g. a
previous layer's output seen through Flatten or MaxPool). Adds and average pools between
quantized tensors then become `integer_ops` modules, so that the test phase computes them as
onnxruntime's integer kernels do.
"""
from __future__ import annotations

import copy
import dataclasses
import fnmatch
import operator
import traceback
from pathlib import Path

import torch
from torch import fx, nn
from torch.fx.graph_module import _USER_PRESERVED_ATTRIBUTES_KEY
from torch.nn import functional as F

from .config import QuantConfig, QuantScheme
from .fake_quant import FeatureQuantizer
from .mnn_quant import feature_quantizer
from .integer_ops import QuantAdd, QuantAvgPool2d, QuantGlobalAvgPool
from .modules import QuantConv2d, QuantLayer, QuantLinear

# Ops whose output lies on the same quantization grid as their input (values are only moved or
# selected), so a quantized input needs no second quantizer after them. Not Dropout: in
# training it scales the kept values by 1/(1-p), off the grid.
_GRID_PRESERVING_MODULES = (nn.Flatten, nn.MaxPool2d, nn.Identity)
_GRID_PRESERVING_FUNCTIONS = (torch.flatten, F.max_pool2d, torch.reshape)
_GRID_PRESERVING_METHODS = ("flatten", "view", "reshape", "contiguous")
_RELU_FUNCTIONS = (F.relu, torch.relu)
# Between an op and the quantizer of its output, ops the int8 artifact has no float work for:
# reshapes, and Dropout (identity in the test phase, absent from the exported graph).
_RESHAPE_MODULES = (nn.Flatten, nn.Identity, nn.Dropout)
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_ADD_FUNCTIONS = (operator.add, torch.add)
_AVG_POOL_FUNCTIONS = (F.avg_pool2d, torch._C._nn.avg_pool2d)  # fx records the builtin


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


def _set_bn_momentum(gm: fx.GraphModule, momentum: float | None) -> None:
    """Every BatchNorm of the QAT model (fused or not) updates its statistics at `momentum`."""
    if momentum is None:
        return
    for module in gm.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            # what the statistics were gathered at: calibrate judges from it whether they are trained
            module.momentum_before_qat = module.momentum
            module.momentum = momentum


def quantizable_layers(gm: fx.GraphModule) -> list[str]:
    """Names (the float model's) of the Conv2d and Linear layers turn_quantize can quantize."""
    calls = _call_counts(gm.graph)
    return [node.target for node in gm.graph.nodes
            if type(_module(gm, node)) in (nn.Conv2d, nn.Linear) and calls[node.target] == 1
            and len(node.args) == 1]


def _check_layer_patterns(gm: fx.GraphModule, config: QuantConfig) -> None:
    """A `layers` pattern that matches no quantizable layer is a typo: refuse it, naming it."""
    names = quantizable_layers(gm)
    for pattern, _bits in config.layers:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            shown = ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
            raise ValueError(f"layers pattern {pattern!r} matches no quantizable layer: the model's "
                             f"Conv2d/Linear layers are {shown}")


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
        bits = config.bits_for(node.target)
        if bits is None:
            continue  # quant.layers: "float"
        layer_config = config if bits == config.bits else dataclasses.replace(config, bits=bits)
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
        gm.add_submodule(node.target, qat_cls(layer, layer_config, bn=bn, activation=activation))
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
        quantizer = feature_quantizer(config, channels, layer.channel_axis)
        name = f"{src.name}_quant"
        gm.add_submodule(name, quantizer)
        with gm.graph.inserting_after(src):
            qnode = gm.graph.call_module(name, args=(src,))
        # Every user sees the quantized tensor, as in the integer model where only it exists.
        src.replace_all_uses_with(qnode, delete_user_cb=lambda user: user is not qnode)
        quantizer_of[qnode] = quantizer
        quantizer_of[src] = quantizer
        layer.set_input_quant(quantizer)


def _on_grid(gm: fx.GraphModule) -> dict[fx.Node, FeatureQuantizer]:
    """Nodes whose output lies on a quantization grid, with that grid's quantizer."""
    found = {}
    for node in gm.graph.nodes:
        mod = _module(gm, node)
        if isinstance(mod, FeatureQuantizer):
            found[node] = mod
        elif isinstance(mod, QuantLayer):
            found[node] = mod.output_quant
    return found


def _quantizer_upstream(gm: fx.GraphModule, arg, on_grid: dict) -> FeatureQuantizer | None:
    """The quantizer whose grid `arg` lies on (through grid-preserving ops), or None."""
    while isinstance(arg, fx.Node) and arg not in on_grid and _is_grid_preserving(gm, arg) and arg.args:
        arg = arg.args[0]
    return on_grid.get(arg) if isinstance(arg, fx.Node) else None


def _quantizer_downstream(gm: fx.GraphModule, node: fx.Node) -> FeatureQuantizer | None:
    """The quantizer that `node`'s output reaches through reshapes only, or None."""
    while (user := _single_user(node)) is not None:
        mod = _module(gm, user)
        if isinstance(mod, FeatureQuantizer):
            return mod
        reshape = (isinstance(mod, _RESHAPE_MODULES)
                   or (user.op == "call_function" and user.target in _RESHAPE_FUNCTIONS)
                   or (user.op == "call_method" and user.target in _GRID_PRESERVING_METHODS))
        if not reshape or user.args[0] is not node:
            return None
        node = user
    return None


def _arg(node: fx.Node, index: int, name: str, default=None):
    return node.args[index] if len(node.args) > index else node.kwargs.get(name, default)


def _integer_add(gm: fx.GraphModule, node: fx.Node, on_grid: dict) -> tuple[nn.Module, tuple] | None:
    """A QuantAdd for `a + b` of two quantized tensors whose sum (or its ReLU) is quantized."""
    is_add = ((node.op == "call_function" and node.target in _ADD_FUNCTIONS)
              or (node.op == "call_method" and node.target == "add"))
    if not is_add or len(node.args) != 2 or node.kwargs:
        return None  # in-place adds, alpha=...: left as they are
    a, b = (_quantizer_upstream(gm, arg, on_grid) for arg in node.args)
    if a is None or b is None:
        return None
    user = _single_user(node)
    if user is not None and _activation_kind(gm, user) == "relu" and (after := _single_user(user)) is not None:
        out, relu = _module(gm, after), True
    else:
        out, relu = (_module(gm, user) if user is not None else None), False
    if not isinstance(out, FeatureQuantizer):
        return None
    return QuantAdd(a, b, out, relu_between=relu), tuple(node.args)


def _integer_avg_pool(gm: fx.GraphModule, node: fx.Node, on_grid: dict) -> tuple[nn.Module, tuple] | None:
    """A QuantAvgPool2d for a floor-mode average pool of a quantized tensor, quantized after."""
    mod = _module(gm, node)
    if type(mod) is nn.AvgPool2d:
        kernel, stride, padding = mod.kernel_size, mod.stride, mod.padding
        ceil_mode, include_pad, divisor = mod.ceil_mode, mod.count_include_pad, mod.divisor_override
    elif node.op == "call_function" and node.target in _AVG_POOL_FUNCTIONS:
        kernel, stride, padding = _arg(node, 1, "kernel_size"), _arg(node, 2, "stride"), _arg(node, 3, "padding", 0)
        ceil_mode, include_pad = _arg(node, 4, "ceil_mode", False), _arg(node, 5, "count_include_pad", True)
        divisor = _arg(node, 6, "divisor_override")
    else:
        return None
    if ceil_mode or divisor is not None or any(isinstance(v, fx.Node) for v in (kernel, stride, padding)):
        return None
    x = _quantizer_upstream(gm, node.args[0], on_grid)
    out = _quantizer_downstream(gm, node)
    if x is None or out is None:
        return None
    return QuantAvgPool2d(x, out, kernel, stride, padding, bool(include_pad)), (node.args[0],)


def _global_pool_kind(gm: fx.GraphModule, node: fx.Node) -> tuple[str, tuple[int, int]] | None:
    """('adaptive', dims) or ('mean', dims) if `node` averages over H and W to 1x1, else None."""
    mod = _module(gm, node)
    if type(mod) is nn.AdaptiveAvgPool2d:
        return ("adaptive", (2, 3)) if mod.output_size in (1, (1, 1)) else None
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return ("adaptive", (2, 3)) if _arg(node, 1, "output_size") in (1, (1, 1), [1, 1]) else None
    is_mean = ((node.op == "call_function" and node.target is torch.mean)
               or (node.op == "call_method" and node.target == "mean"))
    if not is_mean or set(node.kwargs) - {"dim", "keepdim"} or len(node.args) > 3:
        return None
    dims, keepdim = _arg(node, 1, "dim"), _arg(node, 2, "keepdim", False)
    if keepdim is True and isinstance(dims, (tuple, list)) and tuple(dims) in ((2, 3), (-2, -1)):
        return "mean", tuple(dims)
    return None


def _integer_global_pool(gm: fx.GraphModule, node: fx.Node, on_grid: dict) -> tuple[nn.Module, tuple] | None:
    """A QuantGlobalAvgPool for a mean over H, W of a quantized tensor, quantized after."""
    kind = _global_pool_kind(gm, node)
    if kind is None:
        return None
    x = _quantizer_upstream(gm, node.args[0], on_grid)
    out = _quantizer_downstream(gm, node)
    if x is None or out is None:
        return None
    return QuantGlobalAvgPool(x, out, how=kind[0], dims=kind[1]), (node.args[0],)


def _replace_integer_ops(gm: fx.GraphModule) -> None:
    """Put `integer_ops` modules where onnxruntime will run an integer add or average pool."""
    on_grid = _on_grid(gm)
    for node in list(gm.graph.nodes):
        found = (_integer_add(gm, node, on_grid) or _integer_avg_pool(gm, node, on_grid)
                 or _integer_global_pool(gm, node, on_grid))
        if found is None:
            continue
        module, args = found
        name = f"{node.name}_int"
        while hasattr(gm, name):
            name += "_"
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, args=args)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)


def _failing_layer(model: nn.Module, err: Exception) -> tuple[str, nn.Module, traceback.FrameSummary] | None:
    """The innermost layer of `model` whose forward was running when tracing failed, and the line."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    tb = err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if id(owner) in names:
            line = traceback.extract_tb(tb, limit=1)[0]
            found = (names[id(owner)] or "(the model itself)", owner, line)
        tb = tb.tb_next
    return found


def trace_error_message(model: nn.Module, err: Exception) -> str:
    """One line: which layer (by `named_modules()` name) and source line torch.fx could not trace."""
    cause = (str(err).strip().splitlines() or [type(err).__name__])[0]
    where = _failing_layer(model, err)
    if where is None:
        return f"turn_quantize cannot trace {type(model).__name__} with torch.fx: {cause}"
    name, layer, line = where
    return (f"turn_quantize cannot trace {type(model).__name__} with torch.fx: layer {name!r} "
            f"({type(layer).__name__}.{line.name}, {Path(line.filename).name}:{line.lineno}: "
            f"`{(line.line or '').strip()}`): {cause}")


def _trace(model: nn.Module) -> fx.GraphModule:
    """torch.fx's graph of `model`; a TypeError naming the layer and line where tracing fails."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types; the user needs the layer, the line and the cause
        raise TypeError(trace_error_message(model, err)) from err


def check_quantizable(model: nn.Module, config: QuantConfig) -> None:
    """What `turn_quantize(model, config)` would refuse about the model, without building the QAT
    model: TypeError if torch.fx cannot trace it, ValueError for a `layers` pattern matching no layer."""
    _check_layer_patterns(_trace(model), config)  # tracing leaves the model as it is


def turn_quantize(model: nn.Module, config: QuantConfig | None = None, **settings: object) -> fx.GraphModule:
    """Return a QAT copy of `model` quantized by `config`; the model passed in is left untouched.

    `config` is the one place the settings and their defaults live (`QuantConfig`); keyword
    arguments are a convenience for a config built from them: `turn_quantize(model, bits=4)`.
    Every Conv2d (any groups) and Linear is quantized: weights symmetric per output channel
    with `bits`, features with `feature_bits` and a running range per tensor or per channel.
    Conv2d followed by BatchNorm2d (and ReLU/ReLU6) is fused. Adds and average pools whose
    inputs and output are quantized compute, in the test phase, what onnxruntime's integer
    kernels compute (`integer_ops`). The result is an `torch.fx.GraphModule`; `.train()` gives
    QAT, `.eval()` the integer test phase.
    Raises ValueError on a bad setting, TypeError if the model cannot be traced by torch.fx.
    """
    if config is not None and settings:
        raise ValueError(f"give either config or keyword settings, not both (got {', '.join(settings)})")
    if config is None:
        config = QuantConfig(**settings)  # a misspelt setting is a TypeError naming it
    elif not isinstance(config, QuantConfig):
        raise TypeError(f"config={config!r} is not accepted: use a QuantConfig")
    training = model.training
    gm = _trace(copy.deepcopy(model))
    _check_layer_patterns(gm, config)
    layer_nodes = _fuse_layers(gm, config)
    _insert_input_quantizers(gm, layer_nodes, config)
    if layer_nodes:  # the first layer to run fake-quantizes all weights (QuantLayer.set_weights_ahead)
        gm.get_submodule(layer_nodes[0].target).set_weights_ahead([gm.get_submodule(n.target) for n in layer_nodes])
    if config.scheme is QuantScheme.default:  # MNN runs adds and pools in float
        _replace_integer_ops(gm)
    _set_bn_momentum(gm, config.bn_momentum)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    gm.quant_config = config  # the validated settings, for reports and exporters
    # GraphModule's deepcopy keeps only attributes listed under this meta key.
    gm.meta.setdefault(_USER_PRESERVED_ATTRIBUTES_KEY, {})["quant_config"] = config
    return gm.train(training)
