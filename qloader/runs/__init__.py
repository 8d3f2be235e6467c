"""Runs and their records: the pipeline, manifests, sweeps and their jobs, replay, reports, summaries."""
