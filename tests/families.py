"""Tiny seeded checkpoints of the model families transformers quantizes, built with transformers' own classes.

Each family: its config (hidden 32-64, 1-2 layers, small vocab), the class `config.json` architectures names,
the Auto class plain transformers loads it with, and cheap inputs for a forward pass. Nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 256
TEXT_IDS = torch.tensor([[1, 17, 42, 99, 7, 200, 5, 12]])


def _llama_text(**extra: Any):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        **extra,
    )


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2
    )
    return GPT2LMHeadModel(config)


def t5():
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(
        d_model=64, d_ff=128, d_kv=16, num_layers=1, num_decoder_layers=1, num_heads=4, vocab_size=VOCAB,
        decoder_start_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


def bart():
    from transformers import BartConfig, BartForConditionalGeneration

    config = BartConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64,
    )  # fmt: skip
    return BartForConditionalGeneration(config)


def bert_classifier():
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
        max_position_embeddings=64, num_labels=3,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    config = WhisperConfig(
        d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, vocab_size=VOCAB, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, decoder_start_token_id=1, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        suppress_tokens=[], begin_suppress_tokens=[],
    )  # fmt: skip
    return WhisperForConditionalGeneration(config)


IMAGE_TOKEN = VOCAB - 1
LLAVA_IMAGE = 32
LLAVA_PATCH = 8


def llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        image_size=LLAVA_IMAGE, patch_size=LLAVA_PATCH, projection_dim=32,
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=vision, text_config=_llama_text(), image_token_index=IMAGE_TOKEN, vision_feature_layer=-1
    )
    return LlavaForConditionalGeneration(config)


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=VOCAB, max_position_embeddings=128,
    )  # fmt: skip
    return MixtralForCausalLM(config)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(config)


def phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    return Phi3ForCausalLM(config)


def _seq2seq_inputs(model) -> dict:
    return {"input_ids": TEXT_IDS, "decoder_input_ids": TEXT_IDS[:, :4]}


def _whisper_inputs(model) -> dict:
    frames = 2 * model.config.max_source_positions
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(1, model.config.num_mel_bins, frames, generator=generator).to(model.dtype)
    return {"input_features": features, "decoder_input_ids": TEXT_IDS[:, :4]}


def _llava_inputs(model) -> dict:
    patches = (LLAVA_IMAGE // LLAVA_PATCH) ** 2
    ids = torch.cat([TEXT_IDS[:, :2], torch.full((1, patches), IMAGE_TOKEN), TEXT_IDS[:, 2:]], dim=1)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(1, 3, LLAVA_IMAGE, LLAVA_IMAGE, generator=generator).to(model.dtype)
    return {"input_ids": ids, "pixel_values": pixels}


def _text_inputs(model) -> dict:
    return {"input_ids": TEXT_IDS}


@dataclass(frozen=True)
class Family:
    name: str
    build: Any
    """() -> the model, with random weights (seeded by the caller)."""
    task: str
    """What model.task=auto resolves to (the config's architectures class belongs to this task)."""
    model_class: str
    auto_class: str
    """The transformers Auto class that plain `from_pretrained` loads it with."""
    inputs: Any
    """model -> forward kwargs (cheap, deterministic)."""
    output: str = "logits"


FAMILIES = {
    f.name: f
    for f in (
        Family("gpt2", gpt2, "causal-lm", "GPT2LMHeadModel", "AutoModelForCausalLM", _text_inputs),
        Family("t5", t5, "seq2seq-lm", "T5ForConditionalGeneration", "AutoModelForSeq2SeqLM", _seq2seq_inputs),
        Family("bart", bart, "seq2seq-lm", "BartForConditionalGeneration", "AutoModelForSeq2SeqLM", _seq2seq_inputs),
        Family(
            "bert-cls",
            bert_classifier,
            "sequence-classification",
            "BertForSequenceClassification",
            "AutoModelForSequenceClassification",
            _text_inputs,
        ),  # fmt: skip
        Family(
            "whisper",
            whisper,
            "speech-seq2seq",
            "WhisperForConditionalGeneration",
            "AutoModelForSpeechSeq2Seq",
            _whisper_inputs,
        ),  # fmt: skip
        Family(
            "llava",
            llava,
            "image-text-to-text",
            "LlavaForConditionalGeneration",
            "AutoModelForImageTextToText",
            _llava_inputs,
        ),  # fmt: skip
        Family("mixtral", mixtral, "causal-lm", "MixtralForCausalLM", "AutoModelForCausalLM", _text_inputs),
        Family("qwen2", qwen2, "causal-lm", "Qwen2ForCausalLM", "AutoModelForCausalLM", _text_inputs),
        Family("phi3", phi3, "causal-lm", "Phi3ForCausalLM", "AutoModelForCausalLM", _text_inputs),
    )
}


def tokenizer():
    """A small BPE tokenizer (vocabulary 200 < VOCAB) trained on qloader's own probe text: nothing downloaded."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from qloader.probe.fidelity import TEXT_PATH

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    bpe.train_from_iterator([TEXT_PATH.read_text()], trainers.BpeTrainer(vocab_size=200, special_tokens=specials))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def write_checkpoint(family: Family, folder: Path, seed: int = 0) -> Path:
    """The family's model with seeded random weights, saved in bf16 as a transformers checkpoint folder, with a
    small tokenizer (the fidelity probe reads its text through it)."""
    torch.manual_seed(seed)
    model = family.build().to(torch.bfloat16)
    model.config.dtype = "bfloat16"
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def shape_only_shards(tensors: dict[str, list[int]], shards: int) -> tuple[dict[str, tuple[bytes, int]], dict]:
    """`tensors` (name -> shape, bf16) split over `shards` safetensors files: file -> (its header, as the file
    starts: length and JSON; the file's whole size), and the index (`total_size`, `weight_map`)."""
    import json
    import math

    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    files, weight_map = {}, {}
    for index in range(shards):
        file = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in names[index * per_shard : (index + 1) * per_shard]:
            size = math.prod(tensors[name]) * 2
            header[name] = {"dtype": "BF16", "shape": tensors[name], "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        files[file] = (len(raw).to_bytes(8, "little") + raw, 8 + len(raw) + offset)
    total = sum(math.prod(s) * 2 for s in tensors.values())
    return files, {"metadata": {"total_size": total}, "weight_map": weight_map}


def write_shape_only_checkpoint(config, tensors: dict[str, list[int]], folder: Path, shards: int) -> Path:
    """A checkpoint whose shards declare `tensors` (name -> shape, bf16) with no data on disk: each shard is a
    sparse file with a real safetensors header, so plan mode (which reads headers only) sizes a model of any
    size. Reading a tensor would give zeros."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    files, index = shape_only_shards(tensors, shards)
    for file, (header, size) in files.items():
        with (folder / file).open("wb") as f:
            f.write(header)
            f.truncate(size)  # sparse: no blocks written
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def mixtral_8x7b_shapes() -> tuple[Any, dict[str, list[int]]]:
    """Mixtral-8x7B's config and its checkpoint's tensor names and shapes (per-expert w1/w2/w3, as published)."""
    from transformers import MixtralConfig

    config = MixtralConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, dtype="bfloat16", architectures=["MixtralForCausalLM"],
    )  # fmt: skip
    hidden, inter, kv = 4096, 14336, 1024
    tensors = {"model.embed_tokens.weight": [32000, hidden]}
    for layer in range(32):
        at = f"model.layers.{layer}"
        tensors |= {
            f"{at}.self_attn.q_proj.weight": [hidden, hidden],
            f"{at}.self_attn.k_proj.weight": [kv, hidden],
            f"{at}.self_attn.v_proj.weight": [kv, hidden],
            f"{at}.self_attn.o_proj.weight": [hidden, hidden],
            f"{at}.block_sparse_moe.gate.weight": [8, hidden],
            f"{at}.input_layernorm.weight": [hidden],
            f"{at}.post_attention_layernorm.weight": [hidden],
        }
        for expert in range(8):
            moe = f"{at}.block_sparse_moe.experts.{expert}"
            tensors |= {f"{moe}.w1.weight": [inter, hidden], f"{moe}.w2.weight": [hidden, inter]}
            tensors |= {f"{moe}.w3.weight": [inter, hidden]}
    tensors |= {"model.norm.weight": [hidden], "lm_head.weight": [32000, hidden]}
    return config, tensors
