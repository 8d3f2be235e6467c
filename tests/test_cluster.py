"""What a cluster's stop means for a record, without a cluster: the causes SLURM's states name, the GPUs a device
map asks for, sbatch's refusal in one line, squeue read as sacct, and earlier attempts kept, never written over."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from qloader.core import cluster
from qloader.runs import slurm
from qloader.runs.job import keep_earlier_attempt


@pytest.mark.parametrize(
    ("state", "reason", "cause"),
    [
        ("TIMEOUT", "TimeLimit", "time limit"),
        ("COMPLETING", "TimeLimit", "time limit"),
        ("CANCELLED", "None", "cancelled"),
        ("CANCELLED+", None, "cancelled"),
        ("PREEMPTED", None, "preempted"),
        ("NODE_FAIL", None, "node failure"),
        ("OUT_OF_MEMORY", None, "out of memory"),
        ("RUNNING", None, None),
        ("COMPLETED", None, None),
        (None, None, None),
    ],
)
def test_job_states_name_their_cause(state, reason, cause) -> None:
    assert cluster.cause_of(state, reason) == cause


@pytest.mark.parametrize(("text", "seconds"), [("00:01:00", 60), ("1-02:00:00", 93600), ("05:30", 330),
                                                ("UNLIMITED", None), ("", None)])  # fmt: skip
def test_slurm_durations(text, seconds) -> None:
    assert cluster._seconds(text) == seconds


@pytest.fixture
def in_slurm_job(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "40")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")

    def answer(fields: dict) -> None:
        monkeypatch.setattr(cluster, "job_fields", lambda job_id: {**fields, "JobId": job_id})

    return answer


def test_outside_slurm_no_cause_is_claimed(monkeypatch) -> None:
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    assert cluster.slurm_job_id() is None and cluster.stop_cause("SIGTERM") is None


def test_sigterm_at_the_time_limit(in_slurm_job) -> None:
    in_slurm_job({"JobState": "COMPLETING", "Reason": "TimeLimit", "TimeLimit": "00:01:00", "RunTime": "00:01:01"})
    assert cluster.stop_cause("SIGTERM") == ("time limit", "SLURM stopped job 40_1 (time limit, time limit "
                                             "00:01:00) with SIGTERM")  # fmt: skip


def test_sigterm_from_scancel(in_slurm_job) -> None:
    """The controller ends a cancelled job with no reason of its own (CANCELLED shows once it has ended)."""
    in_slurm_job({"JobState": "COMPLETING", "Reason": "None"})
    assert cluster.stop_cause("SIGTERM")[0] == "cancelled"


@pytest.mark.parametrize(("run", "cause"), [("00:00:55", "time limit"), ("00:00:10", "time limit"),
                                            ("00:20:00", "preempted"), ("00:55:00", "time limit")])  # fmt: skip
def test_sigusr2_is_the_time_limit_warning_near_the_limit_else_preemption(in_slurm_job, run, cause) -> None:
    limit = "00:01:00" if run < "00:01:00" else "01:00:00"
    in_slurm_job({"JobState": "RUNNING", "Reason": "None", "TimeLimit": limit, "RunTime": run})
    assert cluster.stop_cause("SIGUSR2")[0] == cause


def test_a_plain_sigterm_in_a_running_job_names_no_cause(in_slurm_job) -> None:
    in_slurm_job({"JobState": "RUNNING", "Reason": "None"})
    assert cluster.stop_cause("SIGTERM") is None


@pytest.mark.parametrize(
    ("device_map", "gpus"),
    [
        ({"strategy": "cpu", "max_memory": {"cpu": None, "0": None}}, None),
        ({"strategy": "auto", "max_memory": {"cpu": None, "0": None}}, None),
        ({"strategy": "cuda"}, 1),
        ({"strategy": "auto", "max_memory": {"cpu": "1GiB", "0": "20GiB"}}, 1),
        ({"strategy": "explicit", "modules": {"model.embed_tokens": "cpu", "lm_head": 0}}, 1),
        ({"strategy": "explicit", "modules": {"model.embed_tokens": "cpu", "lm_head": "disk"}}, None),
    ],
)
def test_gpus_are_asked_only_for_weights_on_cuda(device_map, gpus) -> None:
    assert slurm.gpus_for(OmegaConf.create(device_map)) == gpus


def test_launcher_config_asks_for_a_gpu_only_for_cuda() -> None:
    from hydra import compose, initialize_config_dir

    from qloader.config.compose import CONFIG_NAME, config_dir
    from qloader.config.schema import register_configs

    register_configs()
    slurm.register_resolver()
    for device_map, gpus in (("cpu", None), ("auto", None), ("cuda", 1)):
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            overrides = ["hydra/launcher=slurm", f"device_map={device_map}"]
            cfg = compose(CONFIG_NAME, overrides=overrides, return_hydra_config=True)
        assert OmegaConf.select(cfg, "hydra.launcher.gpus_per_node") == gpus
        assert cfg.hydra.launcher.cpus_per_task == 1 and cfg.hydra.launcher.mem_gb is None


def test_sbatch_refusal_is_one_line_in_sbatch_words() -> None:
    from submitit.core.utils import FailedJobError

    error = FailedJobError("sbatch: error: invalid partition specified: gpu\nsbatch: error: Batch job submission "
                           "failed: Invalid partition name specified")  # fmt: skip
    line = slurm.sbatch_refusal(error)
    assert "\n" not in line and "sbatch: error: invalid partition specified: gpu" in line
    assert "hydra.launcher.partition" in line
    assert slurm.sbatch_refusal(RuntimeError("x")) is None


def test_squeue_is_read_like_sacct() -> None:
    watcher = slurm._watcher()(delay_s=1)
    slurm._sacct_missing = True
    try:
        info = watcher.read_info("7_0|COMPLETED|vm\n7_1|CANCELLED|vm\n8_[0-3%2]|PENDING|\n")
    finally:
        slurm._sacct_missing = None
    assert info["7_0"]["State"] == "COMPLETED" and info["7_1"]["State"] == "CANCELLED"
    assert {info[f"8_{i}"]["State"] for i in range(4)} == {"PENDING"}


def test_earlier_attempts_are_kept_never_written_over(tmp_path) -> None:
    for n in (1, 2, 3):
        (tmp_path / "manifest.json").write_text(json.dumps({"attempt": n}))
        assert keep_earlier_attempt(tmp_path) == f"manifest.attempt-{n}.json"
    assert not (tmp_path / "manifest.json").exists()
    kept = [json.loads((tmp_path / f"manifest.attempt-{n}.json").read_text())["attempt"] for n in (1, 2, 3)]
    assert kept == [1, 2, 3]
