"""Is the checkpoint what it claims to be? Checks that name the file, tensor or module at fault.

safetensors decides whether a shard is readable; when it refuses one, `describe_bad_shard`
explains why in words a user can act on (truncated, a git-LFS pointer, overlapping offsets).
The other checks compare what the files hold with their index and with the model skeleton,
before any tensor is materialized, and the loaded weights with themselves (NaN, Inf).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qloader.core.errors import NonFiniteWeightError

LFS_POINTER_PREFIX = b"version https://git-lfs"
SAFETENSORS_HEADER_LIMIT = 100_000_000
"""safetensors' own limit on the JSON header (bytes); larger ones are refused unread."""
FINITE_CHUNK = 1 << 20
"""Elements checked for NaN / Inf at a time."""
LISTED = 8
"""How many keys or modules an error lists before it says 'and N more'."""

# Bytes per element of safetensors dtypes, to name the tensor whose byte range is wrong.
_ITEMSIZE = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8, "C64": 8,
}  # fmt: skip


def listing(items: Iterable, limit: int = LISTED) -> str:
    """'a, b, c (and 12 more)': the first `limit` items, sorted."""
    items = sorted(str(item) for item in items)
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def is_lfs_pointer(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX


def describe_bad_shard(shard: Path, error: Exception) -> str:
    """Why safetensors refused `shard`: the file, the kind of failure and, where one is at fault, the tensor."""
    size = shard.stat().st_size
    if is_lfs_pointer(shard):
        return (
            f"{shard} is a git-LFS pointer file ({size} bytes), not the weights; "
            "fetch the real file (`git lfs pull`, or download it) and run again"
        )
    if size < 8:
        return f"{shard}: truncated: {size} bytes, shorter than the 8-byte header length"
    with shard.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > SAFETENSORS_HEADER_LIMIT:
            return (
                f"{shard}: header length {header_len} bytes exceeds the {SAFETENSORS_HEADER_LIMIT} byte limit "
                "(a corrupt file, or not a safetensors file)"
            )
        if 8 + header_len > size:
            return f"{shard}: truncated inside the header: it declares {header_len} bytes, {size - 8} follow"
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        return f"{shard}: the header is not valid JSON ({e})"
    layout = _describe_layout(shard, header, size - 8 - header_len)
    return layout or f"{shard}: not a readable safetensors file ({error})"


def _describe_layout(shard: Path, header: dict, data_bytes: int) -> str | None:
    """The first tensor whose byte range overlaps, leaves a gap, runs past the end, or misfits its shape."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = info["data_offsets"]
            shape, dtype = [int(d) for d in info["shape"]], info["dtype"]
        except (KeyError, TypeError, ValueError):
            return f"{shard}: tensor '{name}': malformed header entry {json.dumps(info)[:200]}"
        entries.append((int(start), int(end), name, shape, dtype))
    position, previous = 0, None
    for start, end, name, shape, dtype in sorted(entries):
        if start < position:
            return (
                f"{shard}: tensor '{name}' overlaps tensor '{previous}' "
                f"(offsets {start}-{end}; '{previous}' ends at {position})"
            )
        if start > position:
            return f"{shard}: {start - position} unaccounted bytes before tensor '{name}' (offsets {start}-{end})"
        if end > data_bytes:
            return (
                f"{shard}: tensor '{name}' ends at byte {end} but the data section holds {data_bytes} bytes "
                f"(truncated, or out-of-bounds offsets)"
            )
        if dtype not in _ITEMSIZE:
            return f"{shard}: tensor '{name}' has dtype '{dtype}', which safetensors does not know"
        if (need := math.prod(shape) * _ITEMSIZE[dtype]) != end - start:
            return f"{shard}: tensor '{name}' ({dtype} {shape}) needs {need} bytes, its offsets span {end - start}"
        position, previous = end, name
    if position != data_bytes:
        return f"{shard}: the tensors end at byte {position} of a {data_bytes}-byte data section (trailing bytes)"
    return None


def check_index(index_path: Path, weight_map: dict[str, str], found: dict[str, Path]) -> None:
    """The index must name, for every tensor, the shard whose header holds it, and nothing else."""
    from qloader.core.errors import CheckpointError

    problems = []
    if wrong := [k for k, shard in weight_map.items() if k in found and found[k].name != shard]:
        where = [f"{k} (index: {weight_map[k]}, found in {found[k].name})" for k in wrong]
        problems.append(f"{len(wrong)} tensor(s) listed under the wrong shard: {listing(where)}")
    if absent := [k for k in weight_map if k not in found]:
        problems.append(f"{len(absent)} tensor(s) listed that no shard holds: {listing(absent)}")
    if unlisted := [k for k in found if k not in weight_map]:
        problems.append(f"{len(unlisted)} tensor(s) in the shards that it does not list: {listing(unlisted)}")
    if problems:
        raise CheckpointError(f"{index_path} does not match the shards' headers: {'; '.join(problems)}")


def check_remote_code(config_json: Path, trusted: bool) -> None:
    """A config.json `auto_map` names Python files shipped with the checkpoint: refuse it unless trusted."""
    from qloader.checkpoint.config_files import read_json_object
    from qloader.core.errors import UnsafeCheckpointError

    auto_map = read_json_object(config_json).get("auto_map")
    if auto_map and not trusted:
        code = sorted(p.name for p in config_json.parent.glob("*.py"))
        raise UnsafeCheckpointError(
            f"{config_json} has auto_map {json.dumps(auto_map)}: loading it runs Python code from the checkpoint"
            f"{' (' + ', '.join(code) + ')' if code else ''}. Set model.trust_remote_code=true only if you trust it"
        )


def check_tensors_fit_model(
    model,
    shapes: dict[str, tuple[int, ...]],
    weight_mapping,
    quantizer,
    where: Path,
    created: set[str] = frozenset(),
    source_shapes: dict[str, tuple[int, ...]] | None = None,
    partial: bool = False,
) -> None:
    """Every weight the model needs is in the checkpoint, nothing else is, and shapes agree (`partial`, a plan from
    some of the shards' headers: only that what they hold is the model's, in its shapes).

    Keys are matched as transformers' loader will rename them (`weight_mapping`, base-model prefix);
    tied weights and the model's own ignore patterns are exempt, as in `from_pretrained`. Read from
    the headers only: nothing is materialized, and nothing is ever randomly initialized unnoticed.
    `created` are the keys the quantizer makes itself while loading (optimum-quanto's activation scales).
    `source_shapes` are the skeleton's shapes before the quantizer swapped its modules: the shapes a
    checkpoint holds, which the quantizer then converts (a GPT-2 Conv1D weight is stored [in, out] and
    transposed into a Linear4bit [out, in]); shapes are compared against them when given, except for a
    pre-quantized checkpoint, which holds the quantized layout.
    """
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    from transformers.utils.loading_report import LoadStateDictInfo

    from qloader.core.errors import CheckpointMismatchError

    expected = model.state_dict()
    renamings = [t for t in weight_mapping or [] if isinstance(t, WeightRenaming)]
    converters = [t for t in weight_mapping or [] if isinstance(t, WeightConverter)]
    prefix = model.base_model_prefix
    pre_quantized = quantizer is not None and quantizer.pre_quantized
    found, unexpected, mismatched = set(), set(), []
    for key, shape in shapes.items():
        target, pattern = rename_source_key(key, renamings, converters, prefix, expected)
        if target not in expected and key in expected:
            target, pattern = rename_source_key(key, [], [], prefix, expected)
        if target not in expected:
            unexpected.add(target)
            continue
        found.add(target)
        packed = pre_quantized and quantizer.param_needs_quantization(model, target)
        # a pre-quantized checkpoint holds the quantized layout; any other, the model's own (source) layout
        source = None if pre_quantized else (source_shapes or {}).get(target)
        wanted = source or tuple(expected[target].shape)
        if pattern is None and not packed and wanted != shape:
            mismatched.append(f"{key}: checkpoint {list(shape)}, model {list(wanted)}")
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    info = LoadStateDictInfo(
        missing_keys=set() if partial else set(expected) - found - tied - set(created),
        unexpected_keys=unexpected,
        mismatched_keys=set(),
        error_msgs=[],
        conversion_errors={},
        skipped_pp_keys=set(),
    )
    model._adjust_missing_and_unexpected_keys(info)  # the model's own exemptions (inv_freq, ignore patterns)
    problems = []
    if info.missing_keys:
        problems.append(f"{len(info.missing_keys)} weight(s) the model needs are missing: {listing(info.missing_keys)}")
    if info.unexpected_keys:
        problems.append(f"{len(info.unexpected_keys)} unexpected tensor(s): {listing(info.unexpected_keys)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {listing(mismatched)}")
    if problems:
        raise CheckpointMismatchError(
            f"{where}: the weights do not fit {type(model).__name__} as its config.json describes it: "
            + "; ".join(problems)
        )


def nonfinite_weights(model, offloaded=None, storage_tensors=None) -> list[str]:
    """Parameters and buffers holding NaN or Inf, judged on the tensors that store them (`storage_tensors`,
    from the method plug-in): a bitsandbytes weight by its scales (absmax, SCB), a torchao or quanto
    weight by its inner tensors. The scales are computed from the source weight, so a NaN or Inf anywhere
    in it shows there. Weights offloaded to disk are read from `offloaded`, one at a time."""
    import torch

    from qloader.quant.base import inner_tensors

    def finite(t: torch.Tensor) -> bool:
        # max propagates NaN and Inf, and is ten times faster than isfinite(t).all(); in chunks, the
        # temporaries stay small
        return all(bool(torch.isfinite(chunk.abs().amax())) for chunk in t.reshape(-1).split(FINITE_CHUNK))

    def stored(tensor):
        return storage_tensors(tensor) if storage_tensors else (t for _, t in inner_tensors(tensor))

    bad = []
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.device.type == "meta" and offloaded is not None:
            tensor = offloaded[name]
        # 1-byte floats (fp8 data) carry no Inf and are judged by their scales
        checked = [t for t in stored(tensor) if t.is_floating_point() and t.element_size() > 1]
        for t in checked:
            if not finite(t):
                kind = "NaN" if bool(torch.isnan(t).any()) else "Inf"
                bad.append(f"{name} ({kind})")
                break
    return bad


def read_hash_cache(path: Path) -> tuple[dict[str, dict], bool]:
    """The entries of `sha256-cache.json` that have the right shape and checksum, and whether the file was
    well-formed (a missing file is); anything else is dropped with one warning.

    The cache only saves time, so a file that is not JSON, JSON of the wrong shape (`[]`, `null`, an entry
    without `ctime_ns`, a digest edited by hand), or a folder in its place must never stop a run, nor give
    a wrong digest: it is ignored and rewritten.
    """
    from qloader.core.cache import read_json_entries

    return read_json_entries(path, "hash cache", _hash_entry_ok, "ignoring it, files are hashed afresh")


def _hash_entry_ok(key: str, entry: object) -> bool:
    """{"size", "mtime_ns", "ctime_ns", "ino": int, "sha256": 64 hex digits, "check": its checksum}."""
    from qloader.core.cache import entry_check, is_sha256

    if not isinstance(entry, dict) or set(entry) != {"size", "mtime_ns", "ctime_ns", "ino", "sha256", "check"}:
        return False
    ints = all(type(entry[name]) is int for name in ("size", "mtime_ns", "ctime_ns", "ino"))
    return ints and is_sha256(entry["sha256"]) and entry["check"] == entry_check(key, entry)


def check_finite(model, validate: Any, checkpoint_path: Path, parameters: int, offloaded, storage_tensors) -> str:
    """`validate.finite`: fail on any NaN or Inf weight ('passed'); 'auto' checks models up to
    `validate.finite_max_parameters` ('skipped' above it, and with validate.finite=false)."""
    if validate.finite is False or (validate.finite == "auto" and parameters > validate.finite_max_parameters):
        return "skipped"
    if bad := nonfinite_weights(model, offloaded, storage_tensors):
        raise NonFiniteWeightError(
            f"{checkpoint_path}: {len(bad)} weight(s) hold NaN or Inf after loading: {listing(bad)}. "
            "Set validate.finite=false to load it anyway"
        )
    return "passed"
