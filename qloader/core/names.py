"""Names that several layers use, each defined once: stages, tasks, dtypes, device-map strategies, modes,
tokenizer files. A leaf module with no imports: `qloader-report` and the schemas read it without torch.
"""

from __future__ import annotations

STAGE_NAMES = ("resolve", "instantiate", "validate", "device_map", "preprocess", "load", "postprocess")
"""The seven stages, in run order."""

TASK_AUTO_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "masked-lm": "AutoModelForMaskedLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "speech-seq2seq": "AutoModelForSpeechSeq2Seq",
    "image-text-to-text": "AutoModelForImageTextToText",
    "base": "AutoModel",
}
"""`model.task` -> the transformers Auto class whose own model mapping picks the class."""
TASKS = ("auto", *TASK_AUTO_CLASSES)
"""Every `model.task` value: `auto` (the class config.json `architectures` names) and the tasks above."""
FALLBACK_TASK = "causal-lm"
"""What `model.task=auto` builds when config.json names no class transformers has."""

TORCH_DTYPES = ("bfloat16", "float16", "float32", "float64")
"""torch dtype names qloader loads unquantized layers in."""
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
"""Short names (the `dtype` group's options) -> torch dtype names."""
DTYPE_CHOICES = (*TORCH_DTYPES, "auto", *DTYPE_ALIASES)
"""Every `dtype.name` value: a torch dtype name, `auto` (the checkpoint's own) or a short name."""

DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
"""`device_map.strategy` values that accelerate's inference places (`from_pretrained(device_map=<strategy>)`)."""
CUDA_PLACEMENTS = ("cuda", *(f"cuda:{i}" for i in range(8)))
"""`device_map.strategy` values that put the whole model on one GPU (further GPUs: `explicit`)."""
DEVICE_MAP_CHOICES = (*DEVICE_MAP_STRATEGIES, "cpu", *CUDA_PLACEMENTS, "explicit")
"""Every `device_map.strategy` value."""

MODES = ("load", "plan")
"""`mode`: run all seven stages, or plan (resolve ... preprocess on the meta device)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
"""Files of a checkpoint's tokenizer: copied with saved weights; a checkpoint holding none has no tokenizer."""


def dtype_name(name: str) -> str:
    """`bf16` -> `bfloat16`; other names as they are."""
    return DTYPE_ALIASES.get(str(name), str(name))
