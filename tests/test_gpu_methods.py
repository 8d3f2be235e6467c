"""Methods that need a GPU (fp8, fbgemm fp8, mxfp4, FP-Quant, EETQ) or that transformers 5.2x cannot
quantize while loading (HIGGS, HQQ): refused in one line before any weight is read, every transformers
field an override, and on a CUDA host the same tensors as plain `from_pretrained`."""

from __future__ import annotations

import importlib.util
import inspect
import json

import pytest
import torch
from conftest import read_manifest, run_cli
from omegaconf import OmegaConf

import qloader
from qloader.config.compose import compose
from qloader.core.errors import CheckpointMismatchError, ConfigError, EnvironmentMismatchError
from qloader.quant.merge import build_quantization_config
from qloader.quant.registry import METHODS, method_for_target

HQQ_INSTALLED = importlib.util.find_spec("hqq") is not None

# option -> (quant_method, what it needs, what to use instead, refused on a CUDA host too)
REFUSALS = {
    "fp8": ("fp8", "a CUDA GPU with compute capability >= 8.9", "use quant=torchao-fp8wo", False),
    "fbgemm-fp8": (
        "fbgemm_fp8",
        "a CUDA GPU with compute capability >= 9.0 (Hopper) and fbgemm-gpu-genai",
        "use quant=torchao-fp8wo",
        False,
    ),
    "mxfp4": (
        "mxfp4",
        "a CUDA GPU with compute capability >= 7.5, triton >= 3.4 and kernels",
        "use quant=bnb-nf4 or quant=torchao-int4",
        False,
    ),
    "higgs": (
        "higgs",
        "pre-quantized HIGGS checkpoints, on a CUDA GPU with flute-kernel and fast-hadamard-transform",
        "use quant=bnb-nf4 or quant=torchao-int4",
        True,
    ),
    "fp-quant": ("fp_quant", "a CUDA GPU with fp-quant >= 0.3.2", "use quant=bnb-nf4 or quant=torchao-int4", False),
    "eetq": ("eetq", "a CUDA GPU and the kernels package", "use quant=bnb-int8 or quant=torchao-int8wo", False),
    "hqq": ("hqq", "transformers 5.2x refuses HQQ on every device", "use quant=bnb-nf4 or quant=torchao-int4", True),
}
OPTIONS = list(REFUSALS)

# option -> transformers config class, and an override for every one of its __init__ fields with the value
# the built config must hold (None: the same as the override's value).
CONFIG_CLASSES = {
    "fp8": "FineGrainedFP8Config",
    "fbgemm-fp8": "FbgemmFp8Config",
    "mxfp4": "Mxfp4Config",
    "higgs": "HiggsConfig",
    "fp-quant": "FPQuantConfig",
    "eetq": "EetqConfig",
    "hqq": "HqqConfig",
}
OVERRIDES = {
    "fp8": {
        "activation_scheme": ("static", "static"),
        "weight_block_size": ("[64,64]", [64, 64]),
        "dequantize": ("true", True),
        "modules_to_not_convert": ("[lm_head]", ["lm_head"]),
        "modules_to_convert": ("[model.embed_tokens]", ["model.embed_tokens"]),
        "scale_fmt": ("ue8m0", "ue8m0"),
        "expert_dtype": ("fp4", "fp4"),
    },
    "fbgemm-fp8": {
        "activation_scale_ub": ("600.0", 600.0),
        "modules_to_not_convert": ("[lm_head]", ["lm_head"]),
    },
    "mxfp4": {
        "modules_to_not_convert": ("[lm_head]", ["lm_head"]),
        "dequantize": ("true", True),
    },
    "higgs": {
        "bits": ("3", 3),
        "p": ("1", 1),
        "modules_to_not_convert": ("[lm_head]", ["lm_head"]),
        "hadamard_size": ("1024", 1024),
        "group_size": ("128", 128),
        "tune_metadata": (
            "{model.layers.0.mlp.up_proj:{sm_count:132}}",
            {"model.layers.0.mlp.up_proj": {"sm_count": 132}},
        ),
    },
    "fp-quant": {
        "forward_dtype": ("mxfp4", "mxfp4"),
        "forward_method": ("quest", "quest"),
        "backward_dtype": ("mxfp8", "mxfp8"),
        "store_master_weights": ("true", True),
        "hadamard_group_size": ("64", 64),
        "pseudoquantization": ("true", True),
        "transform_init": ("gsr", "gsr"),
        "modules_to_not_convert": ("[lm_head,model.embed_tokens]", ["lm_head", "model.embed_tokens"]),
    },
    "eetq": {
        "weights": ("int8", "int8"),  # the only value EETQ supports
        "modules_to_not_convert": ("[lm_head]", ["lm_head"]),
    },
    "hqq": {
        "nbits": ("2", 2),
        "group_size": ("32", 32),
        "view_as_float": ("true", True),
        "axis": ("0", 0),
        "dynamic_config": ("{self_attn:{nbits:8,group_size:64}}", {"self_attn": {"nbits": 8, "group_size": 64}}),
        "skip_modules": ("[lm_head,model.embed_tokens]", ["lm_head", "model.embed_tokens"]),
    },
}


def _plain_fields(quant) -> dict:
    """The `quant` node as plain Python values, without qloader's own keys (`_target_`, `auto`)."""
    fields = OmegaConf.to_container(quant)
    fields.pop("_target_")
    fields.pop("auto")
    return fields


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ---------------------------------------------------------------- refused on this host, before any weight is read


@pytest.mark.parametrize("option", OPTIONS)
def test_option_is_refused_in_one_line_naming_need_and_alternative(option: str, tmp_path) -> None:
    method, needs, instead, everywhere = REFUSALS[option]
    if torch.cuda.is_available() and not everywhere:
        pytest.skip("this host has CUDA: test_fp8_methods_on_cuda_equal_transformers loads it instead")
    with pytest.raises(EnvironmentMismatchError) as raised:
        qloader.load(["model=tiny-llama", f"quant={option}"], run_dir=tmp_path)
    message = str(raised.value)
    assert message.startswith(f"quant {method}: ") and needs in message and instead in message, message
    assert "\n" not in message
    manifest = read_manifest(tmp_path)
    assert manifest["status"] == "failed"
    assert manifest["error"]["type"] == "EnvironmentMismatchError"
    assert manifest["error"]["message"] == message
    # HqqConfig() itself raises ImportError without the hqq package, so its config cannot be built: the
    # refusal comes from `resolve`. With hqq installed the config builds and `validate` refuses it.
    stage = "resolve" if option == "hqq" and not HQQ_INSTALLED else "validate"
    assert manifest["error"]["stage"] == stage
    ran = [s["name"] for s in manifest["stages"]]
    assert ran[-1] == stage and "load" not in ran and "preprocess" not in ran
    assert manifest["model"] is None


@pytest.mark.slow  # a real process of its own (signals, umask, import side effects): make test-slow
def test_cli_refusal_is_one_error_line_and_the_manifest_line(tmp_path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = run_cli("model=tiny-llama", "quant=fbgemm-fp8", run_dir=tmp_path)
    assert result.returncode == 1
    manifest = read_manifest(tmp_path)
    # stderr also carries what importing torch/torchao logs (third-party warnings): qloader's own lines are these two.
    ours = [line for line in result.stderr.splitlines() if line.startswith("qloader:")]
    assert ours == [
        f"qloader: error: EnvironmentMismatchError: {manifest['error']['message']}",
        f"qloader: manifest (failed): {tmp_path / 'manifest.json'}",
    ]
    assert ours[0].startswith("qloader: error: EnvironmentMismatchError: quant fbgemm_fp8: needs a CUDA GPU")
    assert result.stderr.rstrip("\n").splitlines()[-2:] == ours
    assert "Traceback" not in result.stderr and result.stderr.count("EnvironmentMismatchError") == 1
    assert manifest["error"]["stage"] == "validate"


# ---------------------------------------------------------------- config: transformers' fields, all overrides


@pytest.mark.parametrize("option", OPTIONS)
def test_schema_fields_are_the_config_class_init_fields(option: str) -> None:
    import transformers

    cls = getattr(transformers, CONFIG_CLASSES[option])
    params = {
        name: _plain(p.default)
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    quant = compose([f"quant={option}"]).quant
    fields = _plain_fields(quant)
    assert list(fields) == list(params)  # the same names, in the same order
    assert fields == params  # and the same defaults
    assert quant._target_ == f"transformers.{cls.__name__}"
    method = method_for_target(quant._target_)
    assert method is METHODS[method.quant_method] and method.config_class == cls.__name__
    assert method.module is None and method.packages and method.needs and method.instead


@pytest.mark.parametrize("option", OPTIONS)
def test_every_field_is_an_override_and_reaches_the_config(option: str) -> None:
    overrides = OVERRIDES[option]
    assert set(overrides) == set(_plain_fields(compose([f"quant={option}"]).quant))  # every field, none left out
    cfg = compose([f"quant={option}", *(f"quant.{k}={v}" for k, (v, _) in overrides.items())])
    assert _plain_fields(cfg.quant) == {key: expected for key, (_, expected) in overrides.items()}
    if option == "hqq" and not HQQ_INSTALLED:  # HqqConfig() raises ImportError without hqq: one line instead
        with pytest.raises(EnvironmentMismatchError, match=r"^quant hqq: transformers 5\.2x refuses HQQ"):
            build_quantization_config(cfg.quant)
        return
    config = build_quantization_config(cfg.quant)
    assert type(config).__name__ == CONFIG_CLASSES[option]
    for key, (_, expected) in overrides.items():
        if option == "hqq" and key in ("nbits", "group_size", "view_as_float", "axis", "dynamic_config"):
            continue  # folded into hqq's own quant_config
        assert _plain(getattr(config, key)) == expected, key


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["quant=fp8", "quant.scale_fmt=fp16"], "quant.scale_fmt 'fp16' is not one of float, ue8m0"),
        (["quant=fp8", "quant.weight_block_size=[128]"], "quant.weight_block_size [128] is not two positive integers"),
        (["quant=higgs", "quant.group_size=100"], "quant.group_size '100' is not one of 64, 128, 256"),
        (["quant=eetq", "quant.weights=int4"], "quant.weights 'int4' is not one of int8"),
        # a combination only the config class checks: its ValueError, as one ConfigError line
        (
            ["quant=fp-quant", "quant.forward_method=quest"],
            "quant (FPQuantConfig): Only 'abs_max' is supported for forward_method for 'nvfp4'.",
        ),
    ],
)
def test_bad_field_values_fail_in_resolve_naming_the_field(overrides, fragment, tmp_path) -> None:
    with pytest.raises(ConfigError) as raised:
        qloader.load(["model=tiny-llama", *overrides], run_dir=tmp_path)
    assert fragment in str(raised.value)
    manifest = read_manifest(tmp_path)
    assert manifest["error"]["type"] == "ConfigError" and manifest["error"]["stage"] == "resolve"


def test_gpu_methods_list_their_packages_in_the_manifest() -> None:
    from qloader.measure import environment

    names = environment.packages()
    for package in ("fbgemm-gpu-genai", "kernels", "triton", "flute-kernel", "fp-quant", "hqq"):
        assert package in names


# ---------------------------------------------------------------- fp8 on CPU: what runs here without a GPU


def _fp8_checkpoint(source, folder, block):
    """tiny-llama with every projection stored as fine-grained fp8, quantized by transformers' own op."""
    from safetensors.torch import load_file, save_file
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Quantizer:
        quantization_config = FineGrainedFP8Config(weight_block_size=block)

    op, tensors = Fp8Quantize(Quantizer()), {}
    for shard in sorted(source.glob("*.safetensors")):
        for key, value in load_file(shard).items():
            tensors.update(op.convert({key: value}) if key.endswith("_proj.weight") else {key: value})
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": block, "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared bit for bit (torch.equal has no fp8 kernel on some devices)."""
    return tensor.view(torch.uint8) if tensor.dtype.itemsize == 1 and tensor.dtype.is_floating_point else tensor


def assert_same_state(ours, theirs) -> None:
    assert {n: type(m).__name__ for n, m in ours.named_modules()} == {
        n: type(m).__name__ for n, m in theirs.named_modules()
    }
    our_state, their_state = ours.state_dict(), theirs.state_dict()
    assert our_state.keys() == their_state.keys()
    for key, value in our_state.items():
        other = their_state[key]
        assert value.dtype == other.dtype and value.device == other.device and value.shape == other.shape, key
        assert torch.equal(_bits(value), _bits(other)), key


def test_prequantized_fp8_checkpoint_dequantizes_on_cpu_as_transformers_does(tiny_checkpoint, tmp_path) -> None:
    """quant.dequantize=true: what the refusal offers for a pre-quantized fp8 checkpoint on a host without a GPU."""
    from transformers import AutoModelForCausalLM

    if torch.cuda.is_available():
        pytest.skip("transformers dequantizes only without a GPU")
    folder = _fp8_checkpoint(tiny_checkpoint, tmp_path / "fp8", [32, 32])
    local = ["model=local", f"model.path={folder}", "device_map=cpu"]
    with pytest.raises(EnvironmentMismatchError, match="quant.dequantize=true"):
        qloader.load(local, run_dir=tmp_path / "as-saved")
    result = qloader.load(
        [*local, "quant=fp8", "quant.weight_block_size=[32,32]", "quant.dequantize=true"], run_dir=tmp_path / "run"
    )
    assert result.manifest["quantization"]["pre_quantized"] is True
    theirs = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.bfloat16)
    assert_same_state(result.model, theirs)
    assert {v.dtype for v in result.model.state_dict().values()} == {torch.bfloat16}


@pytest.fixture
def fp8_checks_bypassed(monkeypatch):
    """Lets fp8 quantize on CPU, which transformers' quantize op can: every GPU check switched off."""
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    monkeypatch.setattr(FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None)
    monkeypatch.setattr(type(METHODS["fp8"]), "check_environment", lambda self, config, cuda_devices: None)


def test_fp8_pipeline_equals_transformers_with_the_gpu_checks_bypassed(
    fp8_checks_bypassed, tiny_checkpoint, tmp_path
) -> None:
    """The stages past `validate` (created scale keys, inventory, finite check) on CPU: what the CUDA test runs."""
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    result = qloader.load(
        ["model=tiny-llama", "quant=fp8", "quant.weight_block_size=[32,32]", "device_map=cpu"], run_dir=tmp_path
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint,
        quantization_config=FineGrainedFP8Config(weight_block_size=(32, 32)),
        device_map="cpu",
        dtype=torch.bfloat16,
    )
    assert_same_state(result.model, theirs)
    model = result.manifest["model"]
    assert model["quantized_module_classes"] == {"FP8Linear": 14} and model["missing_keys"] == []
    assert result.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float8_e4m3fn


def test_fp8_blocks_that_do_not_tile_the_weights_fail_before_loading(fp8_checks_bypassed, tmp_path) -> None:
    """tiny-llama's 64-wide weights in 128x128 blocks: transformers would leave their scales random."""
    with pytest.raises(CheckpointMismatchError, match=r"weight_scale_inv"):
        qloader.load(["model=tiny-llama", "quant=fp8", "device_map=cpu"], run_dir=tmp_path)
    manifest = read_manifest(tmp_path)
    assert manifest["error"]["stage"] == "preprocess"
    assert "load" not in [s["name"] for s in manifest["stages"]]


# ---------------------------------------------------------------- CUDA: the same tensors as plain transformers


def _cuda_case(option: str):
    """(qloader overrides, the transformers config written out here, why it cannot run on this GPU or None)."""
    from transformers import FbgemmFp8Config, FineGrainedFP8Config

    capability = torch.cuda.get_device_capability()
    if option == "fp8":  # 32x32 blocks tile every tiny-llama projection (64 and 128 wide)
        why = None if capability >= (8, 9) else f"fp8 needs compute capability >= 8.9, this GPU has {capability}"
        return ["quant.weight_block_size=[32,32]"], FineGrainedFP8Config(weight_block_size=(32, 32)), why
    why = None if capability >= (9, 0) else f"fbgemm fp8 needs compute capability >= 9.0, this GPU has {capability}"
    if importlib.util.find_spec("fbgemm_gpu") is None:
        why = "fbgemm fp8 needs fbgemm-gpu-genai"
    return [], FbgemmFp8Config(), why


@pytest.mark.cuda
@pytest.mark.parametrize("option", ["fp8", "fbgemm-fp8"])
def test_fp8_methods_on_cuda_equal_transformers(option: str, tiny_checkpoint, tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    overrides, config, why = _cuda_case(option)
    if why:
        pytest.skip(why)
    result = qloader.load(["model=tiny-llama", f"quant={option}", *overrides, "device_map=cuda"], run_dir=tmp_path)
    theirs = AutoModelForCausalLM.from_pretrained(
        tiny_checkpoint, quantization_config=config, device_map="cuda", dtype=torch.bfloat16
    )
    assert_same_state(result.model, theirs)
    assert result.manifest["model"]["quantized_modules"] == 14
    assert {v.device.type for v in result.model.state_dict().values()} == {"cuda"}
