"""8- and 4-bit weights (bitsandbytes) for the benchmark's memory rows (the paper's Tables 6 and 16).

The builder's ``--load-8bit`` / ``--load-4bit`` (:func:`llava.model.builder.load_pretrained_model`) hand transformers
a ``BitsAndBytesConfig`` and it quantizes every linear layer of the checkpoint it loads except the output embedding
(``lm_head``): the language model's and the projector's, not the vision tower's (the tower is loaded on its own from
``mm_vision_tower``, in full precision). The benchmark builds its models from random weights, not from a checkpoint,
so :func:`quantize_model` makes the same replacement on a built model, module for module, from the same
``BitsAndBytesConfig`` (its thresholds, 4-bit type and compute dtype are the builder's; a test holds the two equal).
bitsandbytes (0.50.2 tested) runs both on a CPU, with its CPU kernels, and on CUDA; its 8-bit matmul casts fp32
inputs to fp16 (it says so on every call; the bench's command silences that one message). Its CPU kernels are not
what a GPU runs: on a CPU the quantized rows' memory is the measurement, their times are not the GPU's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

QUANT_MODES = ("8bit", "4bit")
# bitsandbytes 0.50's CPU 4-bit matmul packs weights in blocks: it fails (with a reshape error) unless a layer's
# input width is a multiple of 64 and its output width of 32. LLaVA's real widths are; a --scale may not be.
CPU_4BIT_MULTIPLES = (64, 32)
# The output embedding stays in full precision, as transformers leaves it (its modules_to_not_convert).
KEPT_IN_FULL_PRECISION = ("lm_head",)


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError("8/4-bit weights need bitsandbytes: pip install 'llava-visionzip[quant]'") from err
    return bitsandbytes


def bnb_config(mode: str) -> Any:
    """The ``BitsAndBytesConfig`` of ``mode`` ("8bit" or "4bit"), as the builder's flags make it."""
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")
    _bitsandbytes()
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=mode == "8bit", load_in_4bit=mode == "4bit")


def quantized_linear(linear: nn.Linear, config: Any, device: torch.device) -> nn.Module:
    """``linear``'s weights in a bitsandbytes layer on ``device`` (quantized when moved there), bias kept."""
    bnb = _bitsandbytes()
    bias = linear.bias is not None
    weight = linear.weight.data
    if config.load_in_8bit:
        has_fp16 = config.llm_int8_has_fp16_weight
        layer = bnb.nn.Linear8bitLt(
            linear.in_features, linear.out_features, bias, has_fp16_weights=has_fp16,
            threshold=config.llm_int8_threshold,
        )  # fmt: skip
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=has_fp16)
    else:
        _check_cpu_4bit(linear, device)
        options = {
            "compress_statistics": config.bnb_4bit_use_double_quant, "quant_type": config.bnb_4bit_quant_type,
            "quant_storage": config.bnb_4bit_quant_storage,
        }  # fmt: skip
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias, config.bnb_4bit_compute_dtype, **options
        )  # fmt: skip
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, module=layer, **options)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return layer.train(linear.training).to(device)  # bitsandbytes' layers compute differently in training mode


def _check_cpu_4bit(linear: nn.Linear, device: torch.device) -> None:
    inputs, outputs = CPU_4BIT_MULTIPLES
    if device.type == "cpu" and (linear.in_features % inputs or linear.out_features % outputs):
        raise ValueError(
            f"4-bit weights on a CPU need input widths that are multiples of {inputs} and output widths of "
            f"{outputs} (bitsandbytes' CPU kernel); got a {linear.in_features} -> {linear.out_features} layer "
            "(with llava.bench: another --scale, e.g. 0.125 for LLaVA-NeXT-13B)"
        )


def quantize_model(model: nn.Module, mode: str, skip: tuple[nn.Module, ...] = ()) -> list[str]:
    """Replace, in place, every ``nn.Linear`` of ``model`` by its ``mode`` bitsandbytes layer, except ``lm_head`` and
    those inside the modules of ``skip`` (the vision tower). Returns the names of the replaced layers."""
    config = bnb_config(mode)
    skipped = {id(module) for root in skip for module in root.modules()}
    names = []
    for name, module in model.named_modules():
        kept = id(module) in skipped or name.split(".")[-1] in KEPT_IN_FULL_PRECISION
        if isinstance(module, nn.Linear) and not kept:
            names.append(name)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, quantized_linear(linear, config, linear.weight.device))
    return names


# bitsandbytes' stored sizes: 8-bit: 1 byte a weight and a float32 scale per output row; 4-bit: half a byte a weight,
# a float32 absmax per block of 64 weights and a 16-entry float32 code per layer (its defaults, as loaded)
SCALE_BYTES = 4
BLOCK_4BIT = 64
CODE_4BIT = 16


def quantized_layer_bytes(in_features: int, out_features: int, mode: str) -> int:
    """Bytes of one linear layer's weight in ``mode`` (bias not included), as :func:`weight_bytes` counts them."""
    weights = in_features * out_features
    if mode == "8bit":
        return weights + SCALE_BYTES * out_features
    if mode == "4bit":
        return (weights + 1) // 2 + SCALE_BYTES * (-(-weights // BLOCK_4BIT) + CODE_4BIT)
    raise ValueError(f"quantization must be one of {QUANT_MODES}, got {mode!r}")


def counted_weight_bytes(
    model: nn.Module, mode: str | None, dtype: torch.dtype, skip: tuple[nn.Module, ...] = ()
) -> int:
    """The bytes :func:`weight_bytes` would give for ``model`` in ``dtype`` once :func:`quantize_model` quantized it
    with ``mode`` (None: not), counted from the shapes alone: works on a model on the ``meta`` device, so a full-size
    LLaVA's weights are known without holding them."""
    size = torch.empty((), dtype=dtype).element_size()
    linears = {}
    if mode is not None:
        skipped = {id(module) for root in skip for module in root.modules()}
        linears = {
            id(module.weight): module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and id(module) not in skipped
            and name.split(".")[-1] not in KEPT_IN_FULL_PRECISION
        }  # fmt: skip
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        layer = linears.get(id(tensor))
        if layer is not None:
            total += quantized_layer_bytes(layer.in_features, layer.out_features, mode)
        else:
            total += tensor.numel() * (size if tensor.is_floating_point() else tensor.element_size())
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers as stored (int8 / packed 4-bit ones included) and their
    quantization scales (8-bit: per row; 4-bit: per block, in the layer's quant state)."""
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state, scales = getattr(weight, "quant_state", None), getattr(weight, "SCB", None)
        extra = _state_tensors(state) if state is not None else []
        extra += [scales] if isinstance(scales, torch.Tensor) else []  # 8-bit: one scale per output row
        total += sum(t.numel() * t.element_size() for t in extra)
    return total


def _state_tensors(state: Any) -> list[torch.Tensor]:
    """The tensors of a bitsandbytes 4-bit ``QuantState`` (absmax, code; the nested one's with double quantization)."""
    tensors = [t for t in (state.absmax, state.code) if isinstance(t, torch.Tensor)]
    nested = getattr(state, "state2", None)
    return tensors + (_state_tensors(nested) if nested is not None else [])
