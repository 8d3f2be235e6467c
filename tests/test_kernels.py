"""quant.kernel=fused: byte-for-byte what bitsandbytes' own quantize_4bit produces, over many inputs."""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

import qloader
from qloader.quant.bnb_kernel import quantize_4bit_kernel

SHAPES = [(64,), (4, 64), (128, 192), (3, 4096), (333, 128), (1024, 320), (96, 8), (100,), (65, 3)]


def special_blocks(quant_type: str, blocksize: int) -> list[torch.Tensor]:
    """Zeros, all-equal blocks, and values exactly at the code midpoints (absmax 1), both signs."""
    midpoints, _ = _get_4bit_quantize_bounds(quant_type, torch.device("cpu"))
    at_midpoints = torch.cat([midpoints, -midpoints, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    at_midpoints = at_midpoints.repeat(blocksize * 4 // at_midpoints.numel() + 1)[: blocksize * 4]
    at_midpoints[::blocksize] = 1.0  # every block's absmax is exactly 1, so scaled values are the midpoints
    equal = torch.full((blocksize * 3,), 0.3125)
    equal[blocksize : 2 * blocksize] = -2.5
    return [torch.zeros(blocksize * 2), equal, at_midpoints, at_midpoints * 2**-20]


def random_tensors(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i, shape in enumerate(SHAPES):
        scale = 10.0 ** (i % 5 - 2)
        out.append(torch.randn(shape, generator=generator) * scale)
    return out


def assert_same_quantization(A: torch.Tensor, blocksize: int, quant_type: str, nested: bool) -> None:
    expected, expected_state = F.quantize_4bit(
        A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested
    )
    with quantize_4bit_kernel("fused") as report:
        packed, state = F.quantize_4bit(A, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    covered = A.numel() % blocksize == 0  # finite inputs here; the rest go to bitsandbytes
    assert (report.fused_calls, report.fallback_calls) == ((1, 0) if covered else (0, 1)), report.notes
    assert packed.dtype == expected.dtype and torch.equal(packed, expected)
    ours, theirs = state.as_dict(packed=False), expected_state.as_dict(packed=False)
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
        else:
            assert ours[key] == value, key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_kernel_is_bitsandbytes_byte_for_byte(quant_type: str, dtype: torch.dtype) -> None:
    for seed in range(3):
        for A in random_tensors(seed):
            for blocksize, nested in ((64, True), (64, False), (128, True)):
                assert_same_quantization(A.to(dtype), blocksize, quant_type, nested)
    for A in special_blocks(quant_type, 64):
        for nested in (True, False):
            assert_same_quantization(A.to(dtype), 64, quant_type, nested)


def test_uncovered_inputs_fall_back_to_bitsandbytes() -> None:
    odd = torch.randn(100)  # not a multiple of the block size
    with quantize_4bit_kernel("fused") as report:
        F.quantize_4bit(odd, blocksize=64, quant_type="nf4")
        poisoned = torch.randn(4, 64)
        poisoned[1, 3] = float("nan")
        F.quantize_4bit(poisoned, blocksize=64, quant_type="nf4")
        F.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4")
    assert (report.fallback_calls, report.fused_calls) == (2, 1)
    assert_same_quantization(odd, 64, "nf4", True)


def test_the_kernel_is_only_installed_during_the_block() -> None:
    A = torch.randn(8, 64)
    with quantize_4bit_kernel("fused") as report:
        pass
    F.quantize_4bit(A, blocksize=64, quant_type="nf4")
    assert report.fused_calls == 0


@pytest.mark.parametrize("quant", ["bnb-nf4", "bnb-fp4"])
def test_fused_load_equals_transformers_and_is_recorded(quant: str, tmp_path) -> None:
    from oracle import MODES, assert_same_model, transformers_load

    mode = {"bnb-nf4": "nf4-dq", "bnb-fp4": "fp4"}[quant]
    result = qloader.load(["model=tiny-llama", *MODES[mode][0], "quant.kernel=fused"], run_dir=tmp_path)
    kernel = result.manifest["quantization"]["kernel"]
    assert kernel["kernel"] == "fused" and kernel["fused_calls"] == 14 and kernel["fallback_calls"] == 0
    assert_same_model(result.model, transformers_load(result.checkpoint_path, MODES[mode][1]))


def test_choosing_a_kernel_is_not_a_quantization_request() -> None:
    """A pre-quantized checkpoint's own config is used as is when only quant.kernel is given."""
    from qloader.quant.merge import quant_overridden

    assert not quant_overridden(["quant.kernel=fused", "model=local"])
    assert quant_overridden(["quant.kernel=fused", "quant.bnb_4bit_quant_type=fp4"])
