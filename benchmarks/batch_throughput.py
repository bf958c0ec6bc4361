"""``apla-rt batch`` (Ray Data, N actors of T threads) against ``apla-rt generate
--prompts-file`` (one process) on the same videos: videos per minute, end to end.

    python benchmarks/batch_throughput.py --engine-dir engines/small --videos 24 --steps 25 --rounds 3

Each round runs both commands once, alternating which goes first, so load from elsewhere on
the machine falls on both alike; the report gives the medians and every round. The batch
job starts its own local Ray instance (in a network namespace of its own where the machine
allows it, tests/netns.py); its stderr progress lines are timed as they arrive, which splits
its wall time into start-up (Ray, the actors' pipelines: until the first batch is written)
and the rest. Both commands make the same videos (from noise, seeds 0..N-1, 4 prompts) into
fresh folders under ``--work``.
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


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float | None, str]:
    """(wall seconds, seconds until the first stderr progress line 'N/M videos', stderr)."""
    start = time.perf_counter()
    first = None
    lines = []
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if first is None and " videos (a batch of " in line:
            first = time.perf_counter() - start
    rc = proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed ({rc}):\n{''.join(lines)[-2000:]}")
    return wall, first, "".join(lines)


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
               str(args.steps), "--threads", str(args.threads), "--quiet", "--out"]
    rounds = []
    for r in range(args.rounds):
        order = ["batch", "generate"] if r % 2 == 0 else ["generate", "batch"]
        result = {}
        for which in order:
            out = work / f"{which}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = (batch_cmd if which == "batch" else gen_cmd) + [str(out) + "/"]
            wall, first, _ = timed(cmd, env)
            made = len([p for p in out.iterdir() if p.suffix == ".mp4"])
            assert made == n, (which, made)
            result[which] = {"wall_s": round(wall, 2), "videos_per_min": round(60 * n / wall, 1)}
            if which == "batch" and first is not None:
                result[which]["first_batch_s"] = round(first, 2)
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
        "median_wall_s": {"batch": med("batch", "wall_s"), "generate": med("generate", "wall_s")},
        "median_batch_first_batch_s": med("batch", "first_batch_s"),
    }
    report["ratio_batch_over_generate"] = round(report["median_videos_per_min"]["batch"]
                                                / report["median_videos_per_min"]["generate"], 3)
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
