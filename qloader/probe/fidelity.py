"""Fidelity probe: how much quantization changed the model's answers, measured after loading.

On a short English text that ships with qloader: perplexity, and top-1 agreement and mean KL
divergence of the next-token distribution against the same checkpoint loaded unquantized in the
same dtype. Also a greedy sample for a fixed prompt. The reference log-probs are computed once,
in a separate process, and cached by the checkpoint's input hashes, the dtype and the inputs.
Per task: a causal LM scores the next token; a seq2seq LM reads the text and, teacher-forced,
predicts it token by token in its decoder; a sequence classifier labels each chunk of the text
(agreement of the predicted labels, KL of the label distributions; no perplexity). Other tasks
are refused in `resolve`, before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files

import torch

from qloader.checkpoint.reader import Checkpoint
from qloader.checkpoint.sources import has_tokenizer
from qloader.core.errors import ProbeError
from qloader.core.names import TOKENIZER_FILES

TEXT_PATH = files("qloader.probe") / "probe_text.txt"
PROBED_TASKS = {
    "causal-lm": "next-token predictions",
    "seq2seq-lm": "the decoder's token predictions, the text as both source and target",
    "sequence-classification": "the label distribution of each chunk of the text",
}
"""The tasks the probe can score, and what it scores for each."""
CHUNK_TOKENS = 32
"""sequence-classification: the text is cut into chunks of this many tokens, each one labelled."""


def check_probe_task(choice) -> None:
    """Before anything is loaded: the probe scores only the tasks it knows (hf_loading.ModelChoice)."""
    if choice.task not in PROBED_TASKS:
        raise ProbeError(
            f"probe=quick cannot probe model.task {choice.task or choice.requested} ({choice.cls.__name__}): "
            f"it scores {', '.join(PROBED_TASKS)} models only; use probe=off"
        )


def refuse_forward_limit(limit: str) -> None:
    """Before any shard is read: the probe runs the model, which this host cannot (the method's `forward_limit`)."""
    raise ProbeError(f"probe=quick cannot run the model on this host: {limit}; or load it without it (probe=off)")


def _tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    if not has_tokenizer(checkpoint.path):
        raise ProbeError(
            f"probe: checkpoint '{checkpoint.path}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
            "the probe needs one to read its text (turn it off with probe=off)"
        )
    return AutoTokenizer.from_pretrained(checkpoint.path)


def _reference_log_probs(
    checkpoint: Checkpoint, dtype: torch.dtype, inputs: dict, auto_class: str
) -> tuple[torch.Tensor, bool]:
    """The unquantized model's log-probs on `inputs`, from the cache or a fresh process; (log-probs, cached)."""
    from qloader.core.cache import cache_dir

    key = [[f.name, f.sha256] for f in checkpoint.files] + [str(dtype), auto_class]
    key += [[name, tensor.tolist()] for name, tensor in sorted(inputs.items())]
    path = cache_dir() / "probe-reference" / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.pt"
    if path.is_file():
        return torch.load(path), True
    path.parent.mkdir(parents=True, exist_ok=True)
    inputs_path, tmp = path.with_suffix(".inputs.tmp"), path.with_suffix(".tmp")
    torch.save(inputs, inputs_path)
    name = str(dtype).removeprefix("torch.")
    command = [sys.executable, "-m", "qloader.probe.reference", str(checkpoint.path), name, str(inputs_path), str(tmp)]
    with step("the unquantized reference, in a process of its own (once per checkpoint and dtype, then cached)"):
        done = subprocess.run([*command, auto_class], capture_output=True, text=True)
    inputs_path.unlink(missing_ok=True)
    if done.returncode != 0:
        raise ProbeError(f"probe: the unquantized reference failed to load: {done.stderr.strip()[-500:]}")
    tmp.replace(path)
    return torch.load(path), False


def progress(message: str) -> None:
    print(f"qloader: probe: {message}", file=sys.stderr, flush=True)


@contextmanager
def step(what: str, every_s: float = 10.0) -> Iterator[None]:
    """A probe step on stderr, then a line every `every_s` seconds while it runs: on a small CPU the probe
    takes tens of seconds, which silence would hide."""
    progress(what)
    done, start = threading.Event(), time.monotonic()

    def tick() -> None:
        while not done.wait(every_s):
            progress(f"{what}: still running, {time.monotonic() - start:.0f} s")

    ticker = threading.Thread(target=tick, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()


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
    start = 0 if model.config.is_encoder_decoder else inputs["input_ids"].shape[1]  # a decoder's output is new text
    return tokenizer.decode(out[0, start:], skip_special_tokens=True).strip()


def _perplexity(log_probs: torch.Tensor, targets: torch.Tensor) -> float:
    """exp(mean NLL) of `targets`, scored by the log-probs of the positions before them (`log_probs` has one
    position more than `targets` for a causal LM, whose last position predicts past the text)."""
    nll = -log_probs[: len(targets)].gather(1, targets[:, None]).mean()
    return round(math.exp(nll.item()), 4)


def _probe_inputs(model, tokenizer, task: str, max_tokens: int) -> tuple[dict, torch.Tensor | None]:
    """The forward inputs for the task, and the tokens its log-probs score (None: no perplexity)."""
    text = TEXT_PATH.read_text()
    if task == "sequence-classification":
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
        chunks = [ids[i : i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
        batch = tokenizer.pad({"input_ids": chunks}, return_tensors="pt")
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}, None
    ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :max_tokens]
    if task == "seq2seq-lm":  # teacher-forced: the decoder reads the text shifted right and predicts each token
        decoder = model.prepare_decoder_input_ids_from_labels(labels=ids)
        return {"input_ids": ids, "decoder_input_ids": decoder}, ids[0]
    return {"input_ids": ids}, ids[0, 1:]


def _rows(log_probs: torch.Tensor, task: str) -> torch.Tensor:
    """log_softmax of the full logits -> one row per scored position (token tasks) or chunk (classification)."""
    return log_probs if task == "sequence-classification" else log_probs[0]


def _label_sample(model, tokenizer, prompt: str) -> str:
    inputs = {k: v.to(model.device) for k, v in tokenizer(prompt, return_tensors="pt").items()}
    with torch.no_grad():
        label = int(model(**inputs).logits[0].argmax())
    return str(model.config.id2label.get(label, label))


def run_probe(model, checkpoint: Checkpoint, dtype: torch.dtype, pre_quantized: bool, cfg, choice=None) -> dict:
    """Perplexity (token tasks), agreement and KL against the unquantized model, and a sample, for the task of
    `choice` (hf_loading.ModelChoice; None: causal-lm). Classification: agreement of the predicted labels and
    KL of the label distributions over the chunks of the text."""
    task = "causal-lm" if choice is None else choice.task
    auto_class = "AutoModelForCausalLM" if choice is None else choice.auto_class
    tokenizer = _tokenizer(checkpoint)
    inputs, targets = _probe_inputs(model, tokenizer, task, cfg.max_tokens)
    scoring = f"scoring {inputs['input_ids'].numel()} tokens of the shipped text ({PROBED_TASKS[task]})"
    with step(scoring), torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits
        log_probs = _rows(torch.log_softmax(logits.float(), dim=-1).cpu(), task)
        del logits
    with step(f"greedy sample for {cfg.prompt!r}"):
        if task == "sequence-classification":
            sample = _label_sample(model, tokenizer, cfg.prompt)
        else:
            sample = _sample(model, tokenizer, cfg.prompt, cfg.max_new_tokens)
    mask = inputs.get("attention_mask")
    result = {
        "task": task,
        "scored": PROBED_TASKS[task],
        "text_tokens": int(mask.sum()) if mask is not None else inputs["input_ids"].shape[1],
        "perplexity": None if targets is None else _perplexity(log_probs, targets),
        "reference_perplexity": None,
        "top1_agreement": None,
        "mean_kl": None,
        "reference_cached": None,
        "compared_with": "a pre-quantized checkpoint has no unquantized weights (perplexity and sample only)",
        "sample": {"prompt": cfg.prompt, "output": sample},
    }
    if pre_quantized:
        return result
    reference, cached = _reference_log_probs(checkpoint, dtype, inputs, auto_class)
    reference = _rows(reference, task)
    # KL(reference || quantized) per position, in chunks: a full-vocabulary temporary is large
    kl = torch.cat([(r.exp() * (r - q)).sum(-1) for r, q in zip(reference.split(32), log_probs.split(32), strict=True)])
    kl = kl.clamp_min(0)
    result.update(
        reference_perplexity=None if targets is None else _perplexity(reference, targets),
        top1_agreement=round((reference.argmax(-1) == log_probs.argmax(-1)).float().mean().item(), 4),
        mean_kl=round(kl.mean().item(), 6),
        reference_cached=cached,
        compared_with=f"the same checkpoint unquantized ({str(dtype).removeprefix('torch.')})",
    )
    return result
