"""A byte-level BPE tokenizer trained on qloader's calibration text, for tiny checkpoints that have none.

Deterministic and offline: GPTQ calibration and the probe need a tokenizer, and nothing may be downloaded.
"""

from __future__ import annotations

from pathlib import Path

from qloader.quant.methods.gptq import CALIBRATION_TEXT


def add_tokenizer(folder: Path, vocab_size: int = 512) -> Path:
    """Train and save a tokenizer of `vocab_size` (tiny-llama's vocabulary) into `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([CALIBRATION_TEXT.read_text()], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder
