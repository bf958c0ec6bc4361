"""``apla-rt batch`` (Ray Data, N actors of T threads) against ``apla-rt generate
--prompts-file`` (one process) on the same videos: videos per minute, end to end.

    python benchmarks/batch_throughput.py --engine-dir engines/small --videos 24 --steps 25 --rounds 3

Each round runs both commands once, alternating which goes first, so load from elsewhere on
the machine falls on both alike; the report gives the medians and every round. The batch
job starts its own local Ray instance (in a network namespace of its own where the machine
allows it, tests/netns.py); its stderr progress lines are timed as they arrive, which splits
its wall time into start-up (Ray, the actors' pipelines: until the first batch is written)
and a steady state (videos/min from the first written batch to the last); ``generate``'s
steady state is its ``--timings`` total less its ``load`` stage. Both commands make the same
videos (from noise, seeds 0..N-1, 4 prompts) into fresh folders under ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from netns import isolated, netns_status  # noqa: E402

PROMPTS = ["a man is skiing", "a panda is skiing", "a dog is skiing", "a man"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, list[tuple[float, int]], str]:
    """(wall seconds, [(seconds since start, videos done)] for each 'N/M videos' progress
    line as it arrived, stderr)."""
    start = time.perf_counter()
    progress = []
    lines = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if " videos (a batch of " in line:
            progress.append((time.perf_counter() - start, int(line.split("/")[0])))
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed ({rc}):\n{''.join(lines)[-2000:]}")
    return wall, progress, "".join(lines)


def stage_seconds(table: str, stage: str) -> float:
    """A stage's seconds in ``--timings``' table."""
    for line in table.splitlines():
        parts = line.split()
        if parts and " ".join(parts[:-3] if stage != "total" else parts[:-1]) == stage:
            return float(parts[-3] if stage != "total" else parts[-1])
    raise SystemExit(f"no {stage!r} in the timings table:\n{table}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--videos", type=int, default=24)
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--actor-threads", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2, help="generate's --threads")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args()

    work = Path(args.work or tempfile.mkdtemp(prefix="batch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    n = args.videos
    jobs = work / "jobs.jsonl"
    jobs.write_text("".join(json.dumps({"prompt": PROMPTS[i % 4], "seed": i, "steps": args.steps})
                            + "\n" for i in range(n)))
    # generate pairs every prompt with every seed: one prompt per line, each with seed 0, is
    # the same count of videos (seeds only choose the noise; the work per video is the same).
    prompts = work / "prompts.txt"
    prompts.write_text("".join(PROMPTS[i % 4] + "\n" for i in range(n)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    batch_cmd = isolated([sys.executable, "-m", "apla_rt.cli", "batch", "--engine-dir",
                          args.engine_dir, "--jobs", str(jobs), "--actors", str(args.actors),
                          "--threads", str(args.actor_threads), "--from-noise", "--out"])
    gen_cmd = [sys.executable, "-m", "apla_rt.cli", "generate", "--engine-dir", args.engine_dir,
               "--prompts-file", str(prompts), "--from-noise", "--seed", "0", "--steps",
               str(args.steps), "--threads", str(args.threads), "--quiet", "--timings", "--out"]
    rounds = []
    for r in range(args.rounds):
        order = ["batch", "generate"] if r % 2 == 0 else ["generate", "batch"]
        result = {}
        for which in order:
            out = work / f"{which}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = (batch_cmd if which == "batch" else gen_cmd) + [str(out) + "/"]
            wall, progress, text = timed(cmd, env)
            made = len([p for p in out.iterdir() if p.suffix == ".mp4"])
            assert made == n, (which, made)
            row = {"wall_s": round(wall, 2), "videos_per_min": round(60 * n / wall, 1)}
            if which == "batch":
                ray_line = [x for x in text.splitlines() if x.startswith("Ray started in ")]
                if ray_line:
                    row["ray_start_s"] = float(ray_line[0].split()[3])
            if which == "batch" and len(progress) >= 2:
                # Steady state: from the first written batch to the last one.
                (t0, k0), (t1, k1) = progress[0], progress[-1]
                row["first_batch_s"] = round(t0, 2)
                row["steady_videos_per_min"] = round(60 * (k1 - k0) / (t1 - t0), 1)
            if which == "generate":
                # Steady state: the run's own time less opening the engines (``load``).
                work_s = stage_seconds(text, "total") - stage_seconds(text, "load")
                row["load_s"] = round(stage_seconds(text, "load"), 2)
                row["steady_videos_per_min"] = round(60 * n / work_s, 1)
            result[which] = row
        rounds.append(result)
        print(json.dumps({"round": r, **result}), flush=True)

    def med(which: str, key: str) -> float:
        return statistics.median(x[which][key] for x in rounds if key in x[which])

    report = {
        "machine": platform.processor() or platform.machine(), "netns": netns_status()[1],
        "videos": n, "steps": args.steps, "actors": args.actors, "actor_threads": args.actor_threads,
        "generate_threads": args.threads, "rounds": rounds,
        "median_videos_per_min": {"batch": med("batch", "videos_per_min"),
                                  "generate": med("generate", "videos_per_min")},
        "median_steady_videos_per_min": {"batch": med("batch", "steady_videos_per_min"),
                                         "generate": med("generate", "steady_videos_per_min")},
        "median_wall_s": {"batch": med("batch", "wall_s"), "generate": med("generate", "wall_s")},
        "median_batch_first_batch_s": med("batch", "first_batch_s"),
        "median_generate_load_s": med("generate", "load_s"),
        "median_batch_ray_start_s": med("batch", "ray_start_s"),
    }
    for key in ("median_videos_per_min", "median_steady_videos_per_min"):
        report[key]["ratio"] = round(report[key]["batch"] / report[key]["generate"], 3)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
