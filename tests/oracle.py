"""Plain transformers as the oracle: the same settings must give the same tensors."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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


def transformers_load(path: Path, bnb_kwargs: dict | None, device_map="auto", dtype=torch.bfloat16):
    # Passing quantization_config=None would erase a pre-quantized checkpoint's own config: omit it.
    extra = {"quantization_config": BitsAndBytesConfig(**bnb_kwargs)} if bnb_kwargs else {}
    return AutoModelForCausalLM.from_pretrained(path, device_map=device_map, dtype=dtype, **extra)


def quant_state_items(param: torch.Tensor) -> dict:
    """Every tensor and field bitsandbytes keeps beside a packed weight."""
    items = {}
    if (state := getattr(param, "quant_state", None)) is not None:
        items.update(state.as_dict(packed=False))
    if (scb := getattr(param, "SCB", None)) is not None:
        items["SCB"] = scb
    return items


def assert_same_weights(ours, theirs) -> None:
    """Every parameter, buffer and quant-state tensor: torch.equal, same type, dtype and device.

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
        assert torch.equal(value, their_state[key]), key
    our_params, their_params = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert our_params.keys() == their_params.keys()
    for name, ours_p in our_params.items():
        theirs_p = their_params[name]
        assert type(ours_p) is type(theirs_p), name
        assert ours_p.dtype == theirs_p.dtype and ours_p.device == theirs_p.device, name
        assert torch.equal(ours_p.data, theirs_p.data), name
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
        assert torch.equal(buffer, their_buffers[name]), name


def assert_same_logits(ours, theirs, prompt_ids: torch.Tensor = PROMPT_IDS) -> None:
    with torch.no_grad():
        ids = prompt_ids.to(ours.device)
        assert torch.equal(ours(ids).logits, theirs(ids).logits)


def assert_same_model(ours, theirs) -> None:
    """The oracle: same weights (checked first), then the same logits on a fixed prompt."""
    assert_same_weights(ours, theirs)
    assert_same_logits(ours, theirs)
