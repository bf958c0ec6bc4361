"""``apla-rt tune``: for this model on this machine, the fastest sampling setting that stays as
close to a reference solution as DDIM 50 in fp32 does, within a budget in dB; written to the
engine folder's ``tuned.json`` (``apla_rt.folder.tuned``), where ``generate``, the API,
``serve`` and ``batch`` take it as their default (``apla_rt.api.tuned_for``). docs/tune.md.

    entry = run_tune("engines/ski", TuneOptions(budget_db=1.0, minutes=5, threads=2))
    entry["modes"]["auto"]["settings"]   # {"scheduler": "unipc", "steps": 20, ...}

What is measured:

* the cases (``cases_for``): the folder's DDIM-inverted start latent with the training prompt
  (``recon``), the same latent with an edit prompt (``edit``), seeded noise with the training
  prompt (``noise``); a folder without a start latent has the noise case only;
* per case the reference: DDIM at ``REFERENCE_STEPS`` steps in fp32 (ONNX Runtime) from the
  case's start latent and start timestep; and the baseline, DDIM 50 in fp32 (at most the steps
  that fit from the start timestep), whose frames' PSNR against the reference is the case's bar;
* the candidates (``Grid``): solver x steps x cache interval and schedule, in two precision
  modes: ``fp32`` (ONNX Runtime fp32 throughout) and ``auto`` (each network where
  ``--precision auto`` places it, the fastest faithful candidate measured per network by
  ``apla_rt.backends.choice``); where auto places every network in ONNX Runtime fp32 the two
  modes are one. A candidate passes when its frames' PSNR against the reference is at least the
  bar minus the budget in every case; its time is the median over its cases of one video's
  sampling (text, loop, decode; opening and warm-up excluded) at the folder's shape.

The search (``Search``) runs the candidates without the cache first, then those with it, each
group cheapest first by an estimate (each graph's measured time per call x its calls, plus the
per-step and fixed costs: ``Units``), case after case until one misses (the case missed most
often first). It skips a candidate estimated slower than the best passing time by more than
``SLACK``, one whose setting without the cache missed by more than ``CACHE_GAIN_DB``
(DeepCache approximates the full UNet's steps: it seldom brings the frames closer, and then by
little), and in auto one that missed in fp32 by more than ``PRECISION_GAIN_DB`` (a lower
precision adds an error of its own). The passing
settings within twice ``SLACK`` of the fastest are then timed again side by side, in turns; the
setting chosen is the fastest that passed. ``minutes`` bounds one invocation: out of time, it
keeps what it measured, chooses among what passed and says so. Every run is recorded as it ends
in a progress folder inside the engine folder (``Progress``), so a killed tune continues where it
stopped when rerun; the folder goes once a complete ``tuned.json`` entry is written.
"""

from .options import Case, Grid, TuneOptions, cases_for
from .run import OutOfTime, run_tune, summary_lines, tuned_here

__all__ = ["Case", "Grid", "OutOfTime", "TuneOptions", "cases_for", "run_tune", "summary_lines",
           "tuned_here"]
