"""Fidelity probe: how much quantization changed the model's answers, measured after loading.

On a short English text that ships with qloader: perplexity, and top-1 agreement and mean KL
divergence of the next-token distribution against the same checkpoint loaded unquantized in the
same dtype. Also a greedy sample for a fixed prompt, and generation speed on it (prefill and decode tokens/s, and
the peak memory while generating). The reference log-probs are computed once,
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
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.resources import files
from pathlib import Path

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


def check_probe_task(choice, folder: Path | None = None) -> None:
    """Before anything is loaded: the probe scores only the tasks it knows (hf_loading.ModelChoice), and reads its
    text with the checkpoint's tokenizer, which `folder` must hold."""
    if choice.task not in PROBED_TASKS:
        raise ProbeError(
            f"probe=quick cannot probe model.task {choice.task or choice.requested} ({choice.cls.__name__}): "
            f"it scores {', '.join(PROBED_TASKS)} models only; use probe=off"
        )
    if folder is not None and not has_tokenizer(folder):
        raise ProbeError(_no_tokenizer(folder))


def _no_tokenizer(folder: Path) -> str:
    return (
        f"probe: checkpoint '{folder}' has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
        "the probe needs one to read its text (turn it off with probe=off)"
    )


def refuse_forward_limit(limit: str) -> None:
    """Before any shard is read: the probe runs the model, which this host cannot (the method's `forward_limit`)."""
    raise ProbeError(f"probe=quick cannot run the model on this host: {limit}; or load it without it (probe=off)")


def _tokenizer(checkpoint: Checkpoint):
    from transformers import AutoTokenizer

    if not has_tokenizer(checkpoint.path):
        raise ProbeError(_no_tokenizer(checkpoint.path))
    return AutoTokenizer.from_pretrained(checkpoint.path)


def _reference_log_probs(
    checkpoint: Checkpoint, dtype: torch.dtype, inputs: dict, auto_class: str, shape: tuple[int, ...]
) -> tuple[torch.Tensor, bool]:
    """The unquantized model's log-probs on `inputs`, from the cache or a fresh process; (log-probs, cached).

    `shape` is what the quantized model's log-probs have: a cached file that is not a float32 tensor of that
    shape holding log-probabilities (truncated, foreign, a folder in its place) is removed with one warning
    and computed again; temp files of a reference process that was killed are removed.
    """
    from qloader.core.cache import cache_dir, discard, owner_tag, remove_dead_temps, warn_damaged

    # CPU kernels split their sums by thread and pick their code by instruction set (ATEN_CPU_CAPABILITY), and
    # both change with the torch build: the reference is computed with this process's thread count and keyed on
    # all three, so an unquantized model agrees with its reference bit for bit.
    threads = torch.get_num_threads()
    kernels = [f"torch={torch.__version__}", f"cpu={torch.backends.cpu.get_cpu_capability()}", f"threads={threads}"]
    key = [[f.name, f.sha256] for f in checkpoint.files] + [str(dtype), auto_class, *kernels]
    key += [[name, tensor.tolist()] for name, tensor in sorted(inputs.items())]
    folder = cache_dir() / "probe-reference"
    path = folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:24]}.pt"
    remove_dead_temps(folder.glob("*.tmp"), "probe reference temp file(s)")
    if path.exists() or path.is_symlink():
        cached, why = _read_reference(path, shape)
        if why is None:
            return cached, True
        discard(path)
        warn_damaged("probe reference", path, why, "removed it; the reference is computed again")
    folder.mkdir(parents=True, exist_ok=True)
    tag = owner_tag()
    inputs_path, tmp = folder / f"{path.stem}{tag}.inputs.tmp", folder / f"{path.stem}{tag}.tmp"
    try:
        torch.save(inputs, inputs_path)
        name = str(dtype).removeprefix("torch.")
        command = [sys.executable, "-m", "qloader.probe.reference", str(checkpoint.path), name, str(inputs_path)]
        with step("the unquantized reference, in a process of its own (once per checkpoint and dtype, then cached)"):
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            done = subprocess.run([*command, str(tmp), auto_class], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise ProbeError(f"probe: the unquantized reference failed to load: {done.stderr.strip()[-500:]}")
        fresh, why = _read_reference(tmp, shape, values=False)
        if why is not None:
            raise ProbeError(f"probe: the unquantized reference process wrote {tmp}, which {why}")
        if _log_prob_problem(fresh) is None:  # NaN from the model itself is not cached: it would read as damage
            tmp.replace(path)
    finally:
        inputs_path.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return fresh, False


def _read_reference(path: Path, shape: tuple[int, ...], values: bool = True) -> tuple[torch.Tensor | None, str | None]:
    """(log-probs, None), or (None, why the file at `path` is not the reference the probe needs)."""
    if not path.is_file():
        return None, "is not a file"
    try:
        reference = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated or foreign file: zipfile, pickle or torch errors of many kinds
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else ""
        return None, f"is not a readable tensor file ({type(e).__name__}: {first})"
    if not isinstance(reference, torch.Tensor):
        return None, f"holds a {type(reference).__name__}, not a tensor"
    if reference.dtype != torch.float32 or tuple(reference.shape) != tuple(shape):
        return None, f"holds {reference.dtype} {list(reference.shape)}, the probe needs torch.float32 {list(shape)}"
    why = _log_prob_problem(reference) if values else None
    return (None, why) if why else (reference, None)


def _log_prob_problem(log_probs: torch.Tensor) -> str | None:
    """Log-probabilities are never NaN and never above 0 (-inf is a probability of 0)."""
    if bool(torch.isnan(log_probs).any()):
        return "holds NaN"
    if bool((log_probs > 1e-3).any()):
        return "holds values above 0, which are not log-probabilities"
    return None


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


def input_device(model) -> torch.device:
    """Where the model takes its inputs: its device, or, for a model offloaded to disk (its weights on the meta
    device until a hook loads them), the device accelerate's hooks run it on."""
    device = getattr(getattr(model, "_hf_hook", None), "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return model.device


def _prompt_inputs(model, tokenizer, prompt: str) -> dict:
    """The prompt as the model reads it (through the chat template when the tokenizer has one), on its device."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    else:
        inputs = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(input_device(model)) for k, v in inputs.items()}


def _new_tokens(model, inputs: dict, out: torch.Tensor) -> torch.Tensor:
    """The generated tokens: a decoder-only model's output repeats the prompt, a seq2seq one starts with the
    decoder's start token."""
    return out[0, 1:] if model.config.is_encoder_decoder else out[0, inputs["input_ids"].shape[1] :]


def _sample(model, tokenizer, inputs: dict, max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.decode(_new_tokens(model, inputs, out), skip_special_tokens=True).strip()


def _rate(tokens: int, seconds: float) -> float | None:
    return round(tokens / seconds, 2) if seconds > 0 else None


def _generation_speed(model, inputs: dict, new_tokens: int) -> dict:
    """One timed greedy `generate` of exactly `new_tokens` tokens (EOS suppressed). A logits processor stamps the
    time of each step: the first stamp ends the prompt's forward (prefill), the rest is decoding."""
    from transformers import LogitsProcessor, LogitsProcessorList

    stamps: list[float] = []

    class StepClock(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if scores.is_cuda:  # the step's kernels have run when the clock reads
                torch.cuda.synchronize(scores.device)
            stamps.append(time.perf_counter())
            return scores

    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            logits_processor=LogitsProcessorList([StepClock()]),
        )
    end = time.perf_counter()
    made = len(_new_tokens(model, inputs, out))
    prompt_tokens = inputs["input_ids"].shape[1]
    prefill_s, decode_s = stamps[0] - start, end - stamps[0]
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": _rate(prompt_tokens, prefill_s),
        "new_tokens": made,
        "decode_s": round(decode_s, 4),
        "decode_tokens_per_s": _rate(made - 1, decode_s),  # the first new token came from the prefill
        "decode": "greedy, EOS suppressed; tokens after the first, over the time after the prefill",
    }


def _forward_speed(model, inputs: dict) -> dict:
    """A classifier reads the prompt in one forward and generates nothing: prefill only."""
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    prefill_s = time.perf_counter() - start
    prompt_tokens = inputs["input_ids"].shape[1]
    return {
        "prompt_tokens": prompt_tokens,
        "prefill_s": round(prefill_s, 4),
        "prefill_tokens_per_s": _rate(prompt_tokens, prefill_s),
        "new_tokens": None,
        "decode_s": None,
        "decode_tokens_per_s": None,
        "decode": "not applicable: a sequence classifier generates no tokens",
    }


@contextmanager
def _unmeasured() -> Iterator[dict]:
    yield {}


def _sample_and_speed(model, tokenizer, task: str, cfg, memory_window) -> tuple[str, dict]:
    """The greedy sample (also the warm-up: bitsandbytes repacks, kernels compile on a first forward), then the
    timed run, both inside `memory_window` (the peak memory while generating)."""
    with memory_window() as memory:
        if task == "sequence-classification":
            inputs = {k: v.to(input_device(model)) for k, v in tokenizer(cfg.prompt, return_tensors="pt").items()}
            sample = _label_sample(model, inputs)
            speed = _forward_speed(model, inputs)
        else:
            inputs = _prompt_inputs(model, tokenizer, cfg.prompt)
            sample = _sample(model, tokenizer, inputs, cfg.max_new_tokens)
            speed = _generation_speed(model, inputs, cfg.decode_tokens)
    speed.update(
        device=str(input_device(model)),
        warmup="the sample's " + ("forward" if task == "sequence-classification" else "generation"),
        peak_anon_bytes=memory.get("peak_anon_bytes"),
        peak_anon_exact=memory.get("peak_anon_exact"),
        cuda_peak_allocated_bytes=memory.get("cuda_peak_allocated_bytes"),
    )
    return sample, speed


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


def _label_sample(model, inputs: dict) -> str:
    with torch.no_grad():
        label = int(model(**inputs).logits[0].argmax())
    return str(model.config.id2label.get(label, label))


def run_probe(
    model, checkpoint: Checkpoint, dtype: torch.dtype, pre_quantized: bool, cfg, choice=None, memory_window=None
) -> dict:
    """Perplexity (token tasks), agreement and KL against the unquantized model, a sample and generation speed,
    for the task of `choice` (hf_loading.ModelChoice; None: causal-lm). Classification: agreement of the predicted
    labels and KL of the label distributions over the chunks of the text, and forward speed only.
    `memory_window`: a context manager yielding a dict it fills with peak memory on exit (measure.memory's
    `peak_window`), around the generation; the generation runs first, so a CUDA peak since the stage began is its.
    """
    task = "causal-lm" if choice is None else choice.task
    auto_class = "AutoModelForCausalLM" if choice is None else choice.auto_class
    tokenizer = _tokenizer(checkpoint)
    timed = "a forward" if task == "sequence-classification" else f"{cfg.decode_tokens} new tokens"
    with step(f"greedy sample for {cfg.prompt!r}, then speed ({timed})"):
        sample, speed = _sample_and_speed(model, tokenizer, task, cfg, memory_window or _unmeasured)
    inputs, targets = _probe_inputs(model, tokenizer, task, cfg.max_tokens)
    scoring = f"scoring {inputs['input_ids'].numel()} tokens of the shipped text ({PROBED_TASKS[task]})"
    with step(scoring), torch.no_grad():
        logits = model(**{k: v.to(input_device(model)) for k, v in inputs.items()}).logits
        shape = tuple(logits.shape)  # the reference's too: the same model class on the same inputs
        log_probs = _rows(torch.log_softmax(logits.float(), dim=-1).cpu(), task)
        del logits
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
        "speed": speed,
    }
    if pre_quantized:
        return result
    reference, cached = _reference_log_probs(checkpoint, dtype, inputs, auto_class, shape)
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
