"""How many DDIM steps ``apla-rt tune``'s reference needs: DDIM N against DDIM 500 on tiny runs.

    python benchmarks/tune_reference.py --engine-dir ENGINE [--engine-dir ENGINE2 ...]
        [--steps 100,200,300] [--threads 2] [--json OUT.json]

For each engine folder and each of the tune's cases (``apla_rt.tune.cases_for``: the inverted
start latent with the training prompt, with the default edit prompt, seeded noise), all from the
case's own start latent and start timestep, in ONNX Runtime fp32:

* DDIM 500, the reference of ``benchmarks/fast_sampling.py`` and of the issue's figures;
* DDIM N for each ``--steps`` N: its frames' PSNR against DDIM 500;
* a set of settings (``SETTINGS``: the tune's uncached grid and cache intervals 2 and 3 at 20
  steps and more): each one's frames' PSNR against DDIM 500 and against DDIM N.

Per N it reports the largest change, over settings and cases, of a setting's PSNR when scored
against DDIM N instead of DDIM 500, of its margin over DDIM 50's PSNR (its worst case's PSNR
minus DDIM 50's there: what ``tune`` compares with the budget), the same over the settings
within two budgets of the bar (whose verdicts a moved margin could flip), and which of the
tune's verdicts (within the 1 dB budget of DDIM 50 in every case) differ. A step count whose margins move by a small fraction of the budget and
whose verdicts equal DDIM 500's is enough (docs/tune.md).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TRUTH_STEPS = 500
BUDGET_DB = 1.0


def settings_list() -> list[Any]:
    from apla_rt.sampling.settings import SamplingSettings
    from apla_rt.tune.options import STEP_GRID
    from apla_rt.sampling.solvers import SOLVERS

    out = [SamplingSettings(steps=n, solver=s, cache_interval=1, cache_schedule="uniform")
           for s, n in itertools.product(SOLVERS, STEP_GRID)]
    out += [SamplingSettings(steps=n, solver=s, cache_interval=c, cache_schedule="uniform")
            for s, n, c in itertools.product(SOLVERS, (20, 25, 50), (2, 3)) if n <= 50]
    return out


def measure(engine: Path, steps: list[int], threads: int, log: Any) -> dict[str, Any]:
    from apla_rt import Pipeline
    from apla_rt.media.video import psnr
    from apla_rt.sampling.settings import SamplingSettings
    from apla_rt.tune.options import cases_for, label
    from apla_rt.tune.search import Bench

    with Pipeline.open(engine, "auto", threads, cache=True, exact=True) as pipe:
        bench = Bench(pipe, pipe.manifest.sampling_defaults())
        cases = cases_for(pipe.manifest, None)
        ddim = lambda n: SamplingSettings(steps=n, solver="ddim", cache_interval=1)  # noqa: E731
        frames: dict[str, dict[str, Any]] = {}
        for case in cases:
            log(f"{engine.name} {case.name}: DDIM {TRUTH_STEPS}, {steps}, {len(settings_list())} settings")
            runs = {f"ddim {n} (reference)": bench.run(case, ddim(n))[0] for n in [TRUTH_STEPS, *steps]}
            runs.update({label(s): bench.run(case, s)[0] for s in settings_list()})
            frames[case.name] = runs
    truth = f"ddim {TRUTH_STEPS} (reference)"
    table: dict[str, Any] = {"cases": [c.describe() for c in cases], "reference_vs_500": {}, "by_steps": {}}
    for n in steps:
        ref = f"ddim {n} (reference)"
        table["reference_vs_500"][n] = {c: round(psnr(f[ref], f[truth]), 2) for c, f in frames.items()}
        scores = {r: {c: (psnr(f[label(s)], f[truth]), psnr(f[label(s)], f[ref])) for c, f in frames.items()}
                  for s in settings_list() for r in [label(s)]}
        table["by_steps"][n] = compare(scores)
    table["psnr_vs_500"] = {r: {c: round(v[0], 2) for c, v in cs.items()} for r, cs in scores.items()}
    return table


def compare(scores: dict[str, dict[str, tuple[float, float]]]) -> dict[str, Any]:
    """How scoring against DDIM N instead of DDIM 500 moves PSNRs, margins and verdicts; the
    margin of a setting is its worst case's PSNR minus DDIM 50's there. ``near``: the settings
    within 2 budgets of the bar against DDIM 500, whose verdicts a moved margin could flip."""
    base = scores["ddim 50"]
    worst_psnr = max(abs(a - b) for cs in scores.values() for a, b in cs.values())
    margins = {name: (min(a - base[c][0] for c, (a, _) in cs.items()),
                      min(b - base[c][1] for c, (_, b) in cs.items())) for name, cs in scores.items()}
    worst_margin = max(abs(m500 - mn) for m500, mn in margins.values())
    near = {n: m for n, m in margins.items() if abs(m[0] + BUDGET_DB) <= 2 * BUDGET_DB and n != "ddim 50"}
    flips = []
    for name, cs in scores.items():
        ok500 = all(a >= base[c][0] - BUDGET_DB for c, (a, _) in cs.items())
        okn = all(b >= base[c][1] - BUDGET_DB for c, (_, b) in cs.items())
        if ok500 != okn:
            flips.append(name)
    passing = [n for n, cs in scores.items() if all(b >= base[c][1] - BUDGET_DB for c, (_, b) in cs.items())]
    return {"max_psnr_change_db": round(worst_psnr, 3), "max_margin_change_db": round(worst_margin, 3),
            "near_margin_change_db": round(max((abs(a - b) for a, b in near.values()), default=0.0), 3),
            "margins": {n: [round(a, 3), round(b, 3)] for n, (a, b) in margins.items()},
            "verdicts_differing": flips, "passing": passing}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", action="append", required=True, type=Path)
    p.add_argument("--steps", default="100,200,300", help="reference step counts to compare")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]
    report = {str(e): measure(e, steps, args.threads, lambda m: print(m, file=sys.stderr, flush=True))
              for e in args.engine_dir}
    for engine, table in report.items():
        print(f"{engine}: cases {', '.join(c['name'] for c in table['cases'])}")
        for n in steps:
            r, b = table["reference_vs_500"][n], table["by_steps"][n]
            print(f"  DDIM {n}: PSNR vs DDIM {TRUTH_STEPS} "
                  + ", ".join(f"{c} {v:.2f}" for c, v in r.items())
                  + f" dB; scores move <= {b['max_psnr_change_db']:.3f} dB, margins over DDIM 50 "
                  f"<= {b['max_margin_change_db']:.3f} dB (<= {b['near_margin_change_db']:.3f} dB within "
                  f"{2 * BUDGET_DB:g} dB of the bar); verdicts differing: {b['verdicts_differing'] or 'none'}")
        ddim50 = table["psnr_vs_500"]["ddim 50"]
        print("  DDIM 50 vs DDIM 500: " + ", ".join(f"{c} {v:.2f}" for c, v in ddim50.items()) + " dB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
