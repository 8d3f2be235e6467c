"""`python -m qloader.probe_reference CHECKPOINT DTYPE IDS OUT`: the unquantized model's log-probs.

Runs in a process of its own, so the reference model is never in memory beside the quantized
one. The same model loaded unquantized in the same dtype is plain `from_pretrained`, which is
also what `quant=none` loads.
"""

from __future__ import annotations

import sys

import torch


def main(checkpoint: str, dtype: str, ids_path: str, out_path: str) -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.load(ids_path)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device_map="auto")
    with torch.no_grad():
        logits = model(ids.to(model.device)).logits[0].float()
    torch.save(torch.log_softmax(logits, dim=-1).cpu(), out_path)


if __name__ == "__main__":
    main(*sys.argv[1:5])
