"""Fidelity probe: how much quantization changed the model's answers, measured after loading.

On a short English text that ships with qloader: perplexity, and top-1 agreement and mean KL
divergence of the next-token distribution against the same checkpoint loaded unquantized in the
same dtype. Also a greedy sample for a fixed prompt. The reference log-probs are computed once,
in a separate process, and cached by the checkpoint's input hashes, the dtype and the text.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import torch

from qloader.checkpoint import Checkpoint
from qloader.errors import ProbeError

TEXT_PATH = Path(__file__).with_name("probe_text.txt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    if not any((checkpoint.path / name).is_file() for name in TOKENIZER_FILES):
        raise ProbeError(
            f"probe: checkpoint '{checkpoint.path}' has no tokenizer ({', '.join(TOKENIZER_FILES)}); "
            "the probe needs one to read its text (turn it off with probe=off)"
        )
    return AutoTokenizer.from_pretrained(checkpoint.path)


def _reference_log_probs(checkpoint: Checkpoint, dtype: torch.dtype, ids: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """The unquantized model's log-probs on `ids`, from the cache or a fresh process; (log-probs, cached)."""
    from qloader.sources import cache_dir

    inputs = json.dumps([[f.name, f.sha256] for f in checkpoint.files] + [str(dtype), ids.tolist()])
    path = cache_dir() / "probe-reference" / f"{hashlib.sha256(inputs.encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        return torch.load(path), True
    path.parent.mkdir(parents=True, exist_ok=True)
    ids_path, tmp = path.with_suffix(".ids.tmp"), path.with_suffix(".tmp")
    torch.save(ids, ids_path)
    name = str(dtype).removeprefix("torch.")
    command = [sys.executable, "-m", "qloader.probe_reference", str(checkpoint.path), name, str(ids_path), str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True)
    ids_path.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ProbeError(f"probe: the unquantized reference failed to load: {done.stderr.strip()[-500:]}")
    tmp.replace(path)
    return torch.load(path), False


def _sample(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def _perplexity(log_probs: torch.Tensor, ids: torch.Tensor) -> float:
    nll = -log_probs[:-1].gather(1, ids[0, 1:, None]).mean()
    return round(math.exp(nll.item()), 4)


def run_probe(model, checkpoint: Checkpoint, dtype: torch.dtype, pre_quantized: bool, cfg) -> dict:
    tokenizer = _tokenizer(checkpoint)
    ids = tokenizer(TEXT_PATH.read_text(), return_tensors="pt")["input_ids"][:, : cfg.max_tokens]
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits[0]
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        del logits
    result = {
        "text_tokens": ids.shape[1],
        "perplexity": _perplexity(log_probs, ids),
        "reference_perplexity": None,
        "top1_agreement": None,
        "mean_kl": None,
        "reference_cached": None,
        "sample": {"prompt": cfg.prompt, "output": _sample(model, tokenizer, cfg.prompt, cfg.max_new_tokens)},
    }
    if pre_quantized:  # no unquantized weights to compare with
        return result
    reference, cached = _reference_log_probs(checkpoint, dtype, ids)
    # KL(reference || quantized) per position, in chunks: a full-vocabulary temporary is large
    kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(reference.split(32), log_probs.split(32), strict=True)])
    kl = kl.clamp_min(0)
    result.update(
        reference_perplexity=_perplexity(reference, ids),
        top1_agreement=round((reference.argmax(-1) == log_probs.argmax(-1)).float().mean().item(), 4),
        mean_kl=round(kl.mean().item(), 6),
        reference_cached=cached,
    )
    return result
