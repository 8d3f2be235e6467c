"""quant.kernel=fused: byte-for-byte what bitsandbytes' own quantize_4bit and int8_vectorwise_quant produce."""

from __future__ import annotations

import os

import bitsandbytes.functional as F
import pytest
import torch
from bitsandbytes.backends.default.ops import _get_4bit_quantize_bounds

import qloader
from qloader.quant import bnb_kernel
from qloader.quant.bnb_kernel import choose_kernel, quantization_kernels

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
    with quantization_kernels("fused") as report:
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
    with quantization_kernels("fused") as report:
        F.quantize_4bit(odd, blocksize=64, quant_type="nf4")
        poisoned = torch.randn(4, 64)
        poisoned[1, 3] = float("nan")
        F.quantize_4bit(poisoned, blocksize=64, quant_type="nf4")
        F.quantize_4bit(torch.randn(4, 64), blocksize=64, quant_type="nf4")
    assert (report.fallback_calls, report.fused_calls) == (2, 1)
    assert_same_quantization(odd, 64, "nf4", True)


def test_the_kernel_is_only_installed_during_the_block() -> None:
    A = torch.randn(8, 64)
    with quantization_kernels("fused") as report:
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


# ---------------------------------------------------------------- LLM.int8(): int8_vectorwise_quant

INT8_SHAPES = [(1, 64), (4, 64), (128, 192), (3, 4096), (333, 128), (1024, 320), (96, 8), (65, 3), (7, 1)]


def int8_inputs(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) * 10.0 ** (i % 5 - 2) for i, shape in enumerate(INT8_SHAPES)]


def int8_ties() -> torch.Tensor:
    """Rows whose scaled values land exactly on .5 (round half to even) and on the row absmax, both signs."""
    row = torch.tensor([127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 63.5, -63.5, 0.0, -0.0] + [3.0] * 4)
    return torch.stack([row, row * 2.0**-7, row * 2.0**5, -row])


def assert_same_int8(A: torch.Tensor, threshold: float = 0.0, fused_calls: int | None = 1) -> None:
    expected = F.int8_vectorwise_quant(A.clone(), threshold=threshold)
    with quantization_kernels("fused") as report:
        ours = F.int8_vectorwise_quant(A.clone(), threshold=threshold)
    if fused_calls is not None:
        assert report.fused_calls == fused_calls, (A.shape, A.dtype, report.as_dict())
    for got, want in zip(ours, expected, strict=True):
        if want is None:
            assert got is None
            continue
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want), (A.shape, A.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_fused_int8_is_bitsandbytes_byte_for_byte(dtype: torch.dtype) -> None:
    for seed in range(3):
        for A in int8_inputs(seed):
            assert_same_int8(A.to(dtype))
    assert_same_int8(int8_ties().to(dtype))
    assert_same_int8(int8_inputs(0)[2].to(dtype), threshold=6.0)  # threshold, no outlier: fused


def test_fused_int8_falls_back_for_zero_rows_nonfinite_and_outliers() -> None:
    zero_row = torch.randn(4, 64, dtype=torch.float16)
    zero_row[2] = 0
    inf = torch.randn(4, 64, dtype=torch.float16)
    inf[1, 5] = float("inf")
    nan = torch.randn(4, 64, dtype=torch.float16)
    nan[3, 0] = float("nan")
    outliers = torch.randn(16, 64, dtype=torch.float16)
    outliers[3, 7] = 9.0
    for A, threshold in ((zero_row, 0.0), (inf, 0.0), (nan, 0.0), (outliers, 6.0)):
        with quantization_kernels("fused") as report:
            F.int8_vectorwise_quant(A.clone(), threshold=threshold)
        assert (report.fused_calls, report.fallback_calls) == (0, 1)
    for A in (zero_row, outliers):  # what bitsandbytes gives, the outlier columns zeroed included
        assert_same_int8(A, threshold=6.0 if A is outliers else 0.0, fused_calls=None)


def test_fused_int8_load_equals_transformers_and_is_recorded(tmp_path) -> None:
    from oracle import MODES, assert_same_model, transformers_load

    result = qloader.load(["model=tiny-llama", *MODES["int8"][0], "quant.kernel=fused"], run_dir=tmp_path)
    kernel = result.manifest["quantization"]["kernel"]
    assert kernel["kernel"] == "fused" and kernel["fused_calls"] == 14 and kernel["fallback_calls"] == 0
    assert_same_model(result.model, transformers_load(result.checkpoint_path, MODES["int8"][1]))


# ---------------------------------------------------------------- quant.kernel=auto


def test_auto_picks_fused_only_when_the_elements_win_back_the_first_call(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path))
    small, why = choose_kernel("auto", "quantize_4bit", 10_000_000)
    assert small == "bnb" and "not yet cached" in why
    assert choose_kernel("auto", "quantize_4bit", 2_000_000_000)[0] == "fused"
    bnb_kernel._record_first_call("quantize_4bit/torch.bfloat16/nf4", 0.5, cold=False)  # this host: a cache hit
    assert choose_kernel("auto", "quantize_4bit", 100_000_000) == (
        "fused",
        "auto: 100,000,000 planned elements save about 2.5 s with the fused kernel, its first call costs 0.5 s "
        "(cache hit recorded on this host) -> fused",
    )
    assert choose_kernel("auto", "int8_vectorwise_quant", 100_000_000)[0] == "bnb"  # int8 has no record yet
    assert choose_kernel("auto", "quantize_4bit", 0)[0] == "bnb"
    assert choose_kernel("bnb", "quantize_4bit", 10**12) == ("bnb", "quant.kernel=bnb")


def test_auto_load_records_its_choice_and_keeps_the_cache_env_to_the_load(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    result = qloader.load(["model=tiny-llama", "quant=bnb-nf4", "quant.kernel=fused"], run_dir=tmp_path / "a")
    kernel = result.manifest["quantization"]["kernel"]
    assert kernel["cache_dir"].startswith(os.environ["QLOADER_CACHE"]) and "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    assert kernel["first_call_s"] is not None and bnb_kernel.recorded_first_call_s()
    auto = qloader.load(["model=tiny-llama", "quant=bnb-nf4"], run_dir=tmp_path / "b").manifest
    kernel = auto["quantization"]["kernel"]
    assert kernel["requested"] == "auto" and kernel["planned_elements"] > 0 and kernel["reason"].startswith("auto: ")
    assert kernel["kernel"] == "bnb"  # a tiny model never wins back even a cache hit
    assert kernel["bnb_calls"] == 14 and kernel["fused_calls"] == 0


@pytest.mark.slow
def test_warm_compiles_a_kernel_and_times_its_cache_read_so_auto_weighs_a_measurement(tmp_path, monkeypatch) -> None:
    """`qloader cache warm`'s work, for the int8 kernel: compiled into an empty kernel cache and recorded as a
    compile, then its first call read back from the cache in a fresh process and recorded as such; `auto` then
    weighs a 1B int8 load against that measured read, where on a fresh cache it estimates a compile."""
    one_b_int8 = 880_803_840  # synthetic-1b's planned int8 elements
    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path))  # also the fresh process's
    kernel, why = choose_kernel("auto", "int8_vectorwise_quant", one_b_int8)
    assert kernel == "bnb" and "compile, not yet cached on this host (estimate)" in why
    [(key, compile_s, read_s)] = bnb_kernel.warm_kernels(names=("int8_vectorwise_quant",))
    assert key == "int8_vectorwise_quant/torch.bfloat16" and compile_s > 0 and read_s is not None and read_s > 0
    assert bnb_kernel.recorded_first_call_s() == {f"cold:{key}": compile_s, key: read_s}
    assert any(bnb_kernel.kernel_cache_dir().glob("**/*.so"))
    kernel, why = choose_kernel("auto", "int8_vectorwise_quant", one_b_int8)
    assert f"its first call costs {read_s:.1f} s (cache hit recorded on this host)" in why
    assert kernel == (
        "fused" if one_b_int8 * bnb_kernel.SAVED_S_PER_ELEMENT["int8_vectorwise_quant"] > read_s else "bnb"
    )
    loaded = qloader.load(["model=tiny-llama", "quant=bnb-int8", "quant.kernel=fused"], run_dir=tmp_path / "run")
    report = loaded.manifest["quantization"]["kernel"]
    assert (report["kernel"], report["fused_calls"], report["bnb_calls"]) == ("fused", 14, 0)


@pytest.mark.slow
def test_processes_starting_together_on_a_cold_cache_compile_a_kernel_once(tmp_path, monkeypatch) -> None:
    """Two processes' first fused int8 calls at once into one empty kernel cache: one compiles while the other
    waits on the cache's lock, then reads what was compiled. So the record holds one compile and one cache read
    (two compiles at once would record two compiles), and both processes' kernels ran."""
    import json
    import subprocess
    import sys

    monkeypatch.setenv("QLOADER_CACHE", str(tmp_path))  # also the processes'
    command = [sys.executable, "-m", "qloader.quant.bnb_kernel", "bfloat16", "int8_vectorwise_quant"]
    runs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in "ab"]
    outs = [run.communicate(timeout=600) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-600:] for _, err in outs]
    key = "int8_vectorwise_quant/torch.bfloat16"
    assert [json.loads(out.splitlines()[-1])[0][0] for out, _ in outs] == [key, key]
    costs = bnb_kernel.recorded_first_call_s()
    assert set(costs) == {f"cold:{key}", key}, costs
