"""Fuzz: mutate bytes of a small sharded checkpoint. Each mutant loads exactly as safetensors reads it,
or is rejected with a qloader error; no other exception escapes, and no mutant hangs."""

from __future__ import annotations

import shutil
import signal
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import qloader
from qloader.core.errors import QloaderError

SECONDS_PER_MUTANT = 60
MICRO_LLAMA = [
    "model=tiny-llama",
    "model.hidden_size=16",
    "model.intermediate_size=32",
    "model.num_hidden_layers=1",
    "model.num_attention_heads=2",
    "model.num_key_value_heads=1",
    "model.vocab_size=32",
    "model.max_shard_size=2KB",
]


@pytest.fixture(scope="module")
def micro_checkpoint() -> Path:
    from qloader.checkpoint.sources import checkpoint_folder
    from qloader.config.compose import compose

    folder = checkpoint_folder(compose(MICRO_LLAMA).model)
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


FILES = ["shard", "shard", "shard", "index"]  # shards get most of the mutations
position = st.integers(min_value=0, max_value=1 << 16)
byte_set = st.tuples(st.just("set"), position, st.integers(0, 255))
mutation = st.one_of(
    byte_set,
    byte_set,  # in-place edits keep offsets intact, so they reach the header's meaning and the data
    byte_set,
    st.tuples(st.just("insert"), position, st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), position, st.integers(1, 8)),
    st.tuples(st.just("truncate"), position, st.just(0)),
)
edits = st.lists(st.tuples(st.sampled_from(FILES), st.integers(0, 63), mutation), min_size=1, max_size=3)


def mutate(folder: Path, edits_: list) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    for kind, which, (op, at, arg) in edits_:
        path = shards[which % len(shards)] if kind == "shard" else folder / "model.safetensors.index.json"
        data = bytearray(path.read_bytes())
        at = at % (len(data) + 1)
        if op == "set" and at < len(data):
            data[at] = arg
        elif op == "insert":
            data[at:at] = arg
        elif op == "delete":
            del data[at : at + arg]
        elif op == "truncate":
            del data[at:]
        path.write_bytes(bytes(data))


def safetensors_reading(folder: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in sorted(folder.glob("*.safetensors")) for name, t in load_file(shard).items()}


def _timeout(signum, frame):
    raise TimeoutError(f"a mutant took longer than {SECONDS_PER_MUTANT} s")


@pytest.mark.slow
@settings(
    max_examples=80,
    deadline=None,
    derandomize=True,  # the same mutants in every run
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(edits_=edits)
def test_mutants_load_identically_or_fail_with_a_qloader_error(micro_checkpoint, edits_) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "checkpoint"
        shutil.copytree(micro_checkpoint, folder)
        mutate(folder, edits_)
        previous = signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(SECONDS_PER_MUTANT)
        try:
            result = qloader.load(
                ["model=local", f"model.path={folder}", "quant=none", "device_map=cpu", "summary=false"],
                run_dir=Path(tmp) / "run",
            )
        except QloaderError:
            return
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        reference = safetensors_reading(folder)  # qloader accepted the mutant: safetensors must read it too
        state = result.model.state_dict()
        assert state.keys() == reference.keys()
        for name, tensor in state.items():
            assert torch.equal(tensor, reference[name].to(tensor.dtype)), name
