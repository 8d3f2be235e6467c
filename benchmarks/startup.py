"""Start-up time of qloader's light entry points against a minimal Hydra app, side by side.

    python benchmarks/startup.py              # 15 rounds
    python benchmarks/startup.py --rounds 31

The baseline is a `@hydra.main` app with no config, asked for `--help`: what any Hydra CLI costs to
start. Each round runs every command once, as a fresh process, in an order that rotates from round
to round, so a slow moment of a shared machine hits every side alike. The figure per command is the
median wall time over the rounds, and its ratio to the baseline's median (target: at most 1.5).
Results: benchmarks/results/startup.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TARGET = 1.5

MINIMAL_APP = """
import hydra


@hydra.main(version_base=None, config_path=None)
def app(cfg) -> None:
    pass


if __name__ == "__main__":
    app()
"""


def commands(app: Path, run_dir: Path) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv, extra environment); every command exits 0 without loading a model."""
    python = sys.executable
    completion = {"COMP_LINE": "qloader quant=", "COMP_POINT": "14"}
    return {
        "minimal hydra app --help (baseline)": ([python, str(app), "--help"], {}),
        "qloader --help": ([python, "-m", "qloader", "--help"], {}),
        "qloader --cfg job": ([python, "-m", "qloader", "--cfg", "job", f"hydra.run.dir={run_dir}"], {}),
        "qloader -sc query=bash (completion)": ([python, "-m", "qloader", "-sc", "query=bash"], completion),
        "qloader-report --help": ([python, "-c", "from qloader.runs.report import main; main()", "--help"], {}),
    }


def time_once(argv: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env={**os.environ, **env}, timeout=120)
    return time.perf_counter() - start


def measure(rounds: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="qloader-startup-") as tmp:
        app = Path(tmp) / "minimal_app.py"
        app.write_text(MINIMAL_APP)
        cmds = commands(app, Path(tmp) / "run")
        names = list(cmds)
        for name in names:  # warm the file cache and .pyc files; not counted
            time_once(*cmds[name])
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(time_once(*cmds[name]))
    baseline = statistics.median(times[names[0]])
    rows = [
        {
            "command": name,
            "median_s": round(statistics.median(t), 4),
            "min_s": round(min(t), 4),
            "max_s": round(max(t), 4),
            "ratio_to_baseline": round(statistics.median(t) / baseline, 3),
        }
        for name, t in times.items()
    ]
    return {"rounds": rounds, "target_ratio": TARGET, "machine": machine(), "rows": rows, "times_s": times}


def machine() -> dict:
    from qloader.measure.environment import hardware

    hw = hardware()
    return {"cpu_model": hw["cpu_model"], "cpu_cores": hw["cpu_cores"], "python": sys.version.split()[0]}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        f"Start-up, median of {result['rounds']} rounds of fresh processes (order rotating each round); "
        f"{m['cpu_model']}, {m['cpu_cores']} cores, Python {m['python']}. "
        f"Target: ratio at most {result['target_ratio']}.",
        "",
        "| command | median s | min s | max s | ratio to baseline |",
        "|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(
            f"| {row['command']} | {row['median_s']} | {row['min_s']} | {row['max_s']} | {row['ratio_to_baseline']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    result = measure(args.rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "startup.md").write_text(markdown(result))
    print(markdown(result), end="")
    over = [r["command"] for r in result["rows"] if r["ratio_to_baseline"] > TARGET]
    if over:
        print(f"over the {TARGET}x target: {', '.join(over)}", file=sys.stderr)


if __name__ == "__main__":
    main()
