"""`python -m qloader.probe.reference CHECKPOINT DTYPE INPUTS OUT [AUTO_CLASS]`: the unquantized model's log-probs.

Runs in a process of its own, so the reference model is never in memory beside the quantized
one. The same model loaded unquantized in the same dtype is plain `from_pretrained`, which is
also what `quant=none` loads.
"""

from __future__ import annotations

import sys

import torch


def main(
    checkpoint: str, dtype: str, inputs_path: str, out_path: str, auto_class: str = "AutoModelForCausalLM"
) -> None:
    """`auto_class` is the transformers Auto class of the run's model.task; the output is log_softmax of the
    full logits."""
    import transformers

    inputs = torch.load(inputs_path)
    auto = getattr(transformers, auto_class)
    model = auto.from_pretrained(checkpoint, dtype=getattr(torch, dtype), device_map="auto")
    with torch.no_grad():
        logits = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.float()
    torch.save(torch.log_softmax(logits, dim=-1).cpu(), out_path)


if __name__ == "__main__":
    main(*sys.argv[1:6])
