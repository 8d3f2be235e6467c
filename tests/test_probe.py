"""Fidelity probe: perplexity, agreement and KL vs the unquantized model, a sample; never two models at once."""

from __future__ import annotations

import pytest
from conftest import read_manifest, run_cli

import qloader
from qloader.runs.report import collect


@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> dict:
    """SmolLM2 probed unquantized (which computes the reference) and then in nf4 (which reuses it)."""
    sweep = tmp_path_factory.mktemp("sweep")
    runs = {}
    for job, quant in enumerate(["none", "bnb-nf4"]):
        runs[quant] = qloader.load(
            ["model=smollm2-135m", f"quant={quant}", "probe=quick", "probe.decode_tokens=4"], run_dir=sweep / str(job)
        )
    return {"sweep": sweep, **{q: r.manifest for q, r in runs.items()}}


@pytest.mark.smollm2
def test_unquantized_agrees_fully_with_its_reference(probed) -> None:
    probe = probed["none"]["probe"]
    assert probe["top1_agreement"] == 1.0 and probe["mean_kl"] == 0.0
    assert probe["perplexity"] == probe["reference_perplexity"]
    assert probe["text_tokens"] == 256


@pytest.mark.smollm2
def test_nf4_stays_close_to_the_unquantized_model(probed) -> None:
    probe = probed["bnb-nf4"]["probe"]
    assert probe["reference_cached"] is True  # computed once, by the `none` run
    assert probe["top1_agreement"] > 0.5  # chance is 1 / 49152
    assert 0 < probe["mean_kl"] < 1.0
    assert 1.0 <= probe["perplexity"] / probe["reference_perplexity"] < 2.0
    assert "Paris" in probe["sample"]["output"]


@pytest.mark.smollm2
def test_probe_never_holds_a_second_model(probed) -> None:
    stage = next(s for s in probed["bnb-nf4"]["stages"] if s["name"] == "probe")
    unquantized = probed["none"]["model"]["footprint_bytes"]
    assert stage["anon_peak_bytes"] - stage["anon_start_bytes"] < unquantized


@pytest.mark.smollm2
def test_probe_columns_in_the_sweep_summary(probed) -> None:
    rows = collect(probed["sweep"])
    assert [r["top1_agreement"] for r in rows] == [1.0, probed["bnb-nf4"]["probe"]["top1_agreement"]]
    assert all(r["perplexity"] and r["mean_kl"] is not None for r in rows)


def test_probe_fails_clearly_without_a_tokenizer(tiny_checkpoint, tmp_path) -> None:
    result = run_cli("model=tiny-llama", "probe=quick", run_dir=tmp_path)
    assert result.returncode == 1
    assert f"ProbeError: probe: checkpoint '{tiny_checkpoint}' has no tokenizer" in result.stderr
    manifest = read_manifest(tmp_path)
    assert (manifest["error"]["stage"], manifest["status"]) == ("resolve", "failed")  # refused before loading
