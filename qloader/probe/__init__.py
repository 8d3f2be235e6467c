"""The fidelity probe: perplexity, agreement and KL against the unquantized model."""
