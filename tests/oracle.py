"""Plain transformers as the oracle: the same settings must give the same tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from qloader.quant.base import flatten_context, inner_tensors

# The settings each quant option of conf/quant/ stands for, written out independently of qloader.
MODES = {
    "none": ([], None),
    "nf4": (
        ["quant=bnb-nf4", "quant.bnb_4bit_use_double_quant=false"],
        dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
    ),
    "nf4-dq": (
        ["quant=bnb-nf4"],
        dict(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
    ),
    "fp4": (
        ["quant=bnb-fp4"],
        dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.bfloat16),
    ),
    "int8": (["quant=bnb-int8"], dict(load_in_8bit=True)),
}
MODES["none"] = (["quant=none"], None)
PROMPT_IDS = torch.tensor([[1, 17, 42, 99, 7, 300, 5, 12]])

# conf/quant/<option>.yaml -> bitsandbytes kwargs (the MODES above, by option name).
BNB_OPTIONS = {"bnb-nf4": MODES["nf4-dq"][1], "bnb-fp4": MODES["fp4"][1], "bnb-int8": MODES["int8"][1]}
QUANTO_WEIGHTS = {"quanto-int8": "int8", "quanto-int4": "int4", "quanto-fp8": "float8"}
TORCHAO_OPTIONS = ("torchao-int8wo", "torchao-int8dq", "torchao-fp8wo", "torchao-int4")


def options_of(*quant_methods: str) -> list[str]:
    """The conf/quant options of these registered methods (`quant_method` values), in file order; not `auto`, which
    loads a pre-quantized checkpoint as saved and extends bnb-nf4 only for the others."""
    from qloader.config.quant_options import quant_options

    options = quant_options()
    return [o for o, m in options.items() if o != "auto" and m is not None and m.quant_method in quant_methods]


def transformers_load(
    path: Path, bnb_kwargs: dict | None, device_map="auto", dtype=torch.bfloat16, auto_class="AutoModelForCausalLM"
):
    """Plain `<auto_class>.from_pretrained` (AutoModelForCausalLM, AutoModelForSeq2SeqLM, ...) with bitsandbytes."""
    import transformers

    # Passing quantization_config=None would erase a pre-quantized checkpoint's own config: omit it.
    extra = {"quantization_config": BitsAndBytesConfig(**bnb_kwargs)} if bnb_kwargs else {}
    auto = getattr(transformers, auto_class)
    return auto.from_pretrained(path, device_map=device_map, dtype=dtype, **extra)


def _weights_on_cuda(device_map) -> bool:
    """Where transformers will put the weights, as far as picking the torchao int4 config goes."""
    if not torch.cuda.is_available():
        return False
    if isinstance(device_map, dict):
        return any(d not in ("cpu", "disk") for d in device_map.values())
    return str(device_map) != "cpu"


def option_config(option: str, device_map="auto"):
    """The transformers quantization config a quant option stands for, written out here in Python
    (not built from the YAML or qloader's plug-ins); None for quant=none."""
    from transformers import QuantoConfig, TorchAoConfig

    if option == "none":
        return None
    if option in BNB_OPTIONS:
        return BitsAndBytesConfig(**BNB_OPTIONS[option])
    if option in QUANTO_WEIGHTS:
        return QuantoConfig(weights=QUANTO_WEIGHTS[option])
    from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig
    from torchao.quantization import (
        Float8WeightOnlyConfig,
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
    )

    if option == "torchao-int8wo":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if option == "torchao-int8dq":
        return TorchAoConfig(Int8DynamicActivationInt8WeightConfig())
    if option == "torchao-fp8wo":
        return TorchAoConfig(Float8WeightOnlyConfig())
    if option == "torchao-int4":  # CPU int4 off CUDA; torchao's int4 kernel when the weights go to a GPU
        if _weights_on_cuda(device_map):
            return TorchAoConfig(Int4WeightOnlyConfig(group_size=64))
        return TorchAoConfig(PrototypeInt4WeightOnlyConfig(group_size=64))
    raise ValueError(f"no oracle config for quant option '{option}'")


def method_load(path: Path, option: str, device_map="auto", dtype=torch.bfloat16):
    """Plain `from_pretrained` with the config of `option` (conf/quant/<option>.yaml), built independently."""
    config = option_config(option, device_map)
    extra = {"quantization_config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **extra)


def quant_state_items(param: torch.Tensor) -> dict:
    """Every tensor and field bitsandbytes keeps beside a packed weight."""
    items = {}
    if (state := getattr(param, "quant_state", None)) is not None:
        items.update(state.as_dict(packed=False))
    if (scb := getattr(param, "SCB", None)) is not None:
        items["SCB"] = scb
    return items


def assert_same_tensor(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    """Same type, dtype, device, shape and subclass attributes, and every inner tensor equal with the same dtype.

    A tensor subclass (torchao, optimum-quanto) is compared through its inner tensors (`__tensor_flatten__`):
    `torch.equal` on the outer tensor may be unsupported, or compare something else than the stored bytes.
    A plain tensor is its own single inner tensor.
    """
    assert type(ours) is type(theirs), f"{name}: {type(ours).__name__} vs {type(theirs).__name__}"
    assert ours.dtype == theirs.dtype and ours.device == theirs.device, name
    assert ours.shape == theirs.shape, name
    assert flatten_context(ours) == flatten_context(theirs), name
    our_inner, their_inner = list(inner_tensors(ours)), list(inner_tensors(theirs))
    assert [part for part, _ in our_inner] == [part for part, _ in their_inner], name
    for (part, mine), (_, other) in zip(our_inner, their_inner, strict=True):
        where = f"{name}/{part}" if part else name
        assert type(mine.data) is type(other.data), where
        assert mine.dtype == other.dtype and mine.shape == other.shape and mine.device == other.device, where
        assert torch.equal(mine.data, other.data), where


def assert_same_weights(ours, theirs) -> None:
    """Every state_dict entry, parameter and buffer: same type and subclass attributes, every inner tensor
    torch.equal with the same dtype and device; bitsandbytes quant states too.

    Compare before either model has run a forward: on AVX512-BF16 hosts bitsandbytes repacks a 4-bit
    weight for the CPU on its first forward (and moves int8 `SCB` into the module's state), and its
    inverse is best-effort for double-quantized statistics.
    """
    assert type(ours) is type(theirs)
    our_modules = {n: type(m).__name__ for n, m in ours.named_modules()}
    assert our_modules == {n: type(m).__name__ for n, m in theirs.named_modules()}
    our_state, their_state = ours.state_dict(), theirs.state_dict()  # the serialized form, packed quant states
    assert our_state.keys() == their_state.keys()
    for key, value in our_state.items():
        assert_same_tensor(value, their_state[key], key)
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert our_params.keys() == their_params.keys()
    for name, ours_p in our_params.items():
        theirs_p = their_params[name]
        assert_same_tensor(ours_p, theirs_p, name)
        ours_q, theirs_q = quant_state_items(ours_p), quant_state_items(theirs_p)
        assert ours_q.keys() == theirs_q.keys(), name
        for key, value in ours_q.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, theirs_q[key]), f"{name}.{key}"
            else:
                assert value == theirs_q[key], f"{name}.{key}"
    our_buffers, their_buffers = dict(ours.named_buffers()), dict(theirs.named_buffers())
    assert our_buffers.keys() == their_buffers.keys()
    for name, buffer in our_buffers.items():
        assert_same_tensor(buffer, their_buffers[name], name)


def assert_same_logits(
    ours, theirs, prompt_ids: torch.Tensor = PROMPT_IDS, inputs: dict | None = None, output: str = "logits"
) -> None:
    """The same `output` (logits, or e.g. an encoder's last_hidden_state) for the same inputs: `inputs` as forward
    kwargs (input_features, pixel_values, decoder_input_ids, ...), else `prompt_ids` as input_ids."""
    inputs = {"input_ids": prompt_ids} if inputs is None else inputs
    with torch.no_grad():
        ours_out = getattr(ours(**{k: v.to(ours.device) for k, v in inputs.items()}), output)
        theirs_out = getattr(theirs(**{k: v.to(theirs.device) for k, v in inputs.items()}), output)
    assert torch.equal(ours_out, theirs_out)


def cpu_forward_refusals(model) -> set[str]:
    """The 4-bit layers of a plain transformers `model` whose forward bitsandbytes itself refuses on this CPU, found
    by running each layer on its own: on AVX512-BF16 CPUs bitsandbytes repacks a 4-bit weight on its first forward
    and raises for shapes its layout cannot take; elsewhere none. Runs that first forward (call it after comparing
    weights)."""
    import bitsandbytes as bnb

    refused = set()
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit) and module.weight.device.type == "cpu":
            try:
                with torch.no_grad():
                    module(torch.zeros(1, module.in_features, dtype=torch.bfloat16))
            except (AssertionError, RuntimeError):
                refused.add(name)
    return refused


def assert_same_model(ours, theirs, inputs: dict | None = None, output: str = "logits") -> None:
    """The oracle: same weights (checked first), then the same output on fixed inputs (a prompt by default)."""
    assert_same_weights(ours, theirs)
    assert_same_logits(ours, theirs, inputs=inputs, output=output)
