"""``apla-rt``: thin click commands over ``apla_rt.api`` and ``apla_rt.tune`` (generate, invert,
serve, batch, tune, info).

Every ``AplaError`` is printed as ``error: <one line>`` on stderr with exit code 2 and no
traceback; outputs are never replaced without ``--force``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import click

from .errors import AplaError, reported_to_user
from .backends.precision import PRECISION_HELP, PRECISIONS
from .backends.placement import BACKEND_HELP, BACKENDS, check_threads
from .folder.manifest import Manifest
from .sampling.deepcache import SCHEDULES
from .tune.options import REFERENCE_STEPS

_CONTEXT = {"help_option_names": ["-h", "--help"]}


def _user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``AplaError`` into ``error: <message>`` and its exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with reported_to_user(interrupted="nothing was written"):
            return func(*args, **kwargs)

    return wrapper


@click.group(context_settings=_CONTEXT)
def main() -> None:
    """Sample APLA text-to-video models from an exported engine folder (no torch)."""


_engine_dir = click.option("--engine-dir", required=True, type=click.Path(path_type=Path),
                           help="Engine folder written by apla-export (holds manifest.json).")
_backend = click.option("--backend", type=click.Choice(BACKENDS), default="auto", show_default=True,
                        help=BACKEND_HELP)
_threads = click.option("--threads", type=int, default=None,
                        help="CPU threads for ONNX Runtime or OpenVINO (default: its own choice); with 2 "
                             "or more, generate runs the UNet's two guidance halves side by side "
                             "(docs/benchmarks.md).")


_precision = click.option("--precision", type=click.Choice(PRECISIONS), default="auto",
                          show_default=True, help=PRECISION_HELP)
_exact = click.option("--exact", is_flag=True,
                      help="DDIM at the run's steps in fp32 (ONNX Runtime), as exported: not the "
                           "setting apla-rt tune chose for this machine (docs/tune.md).")


def _notes(lines: Any) -> None:
    for line in lines:  # a bf16 check that missed, the tuned setting that runs
        click.echo(f"note: {line}", err=True)


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--prompt", "prompts", multiple=True,
              help="What the video shows, e.g. 'a man is skiing'; repeat for several videos.")
@click.option("--prompts-file", type=click.Path(path_type=Path),
              help="A text file of prompts, one a line (blank lines skipped).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Video file (.mp4 or .gif), or a folder ending in '/' for several videos "
                   "(NNN-seedS.FORMAT files and index.json).")
@click.option("--frames", type=int, help="Frames to generate (default: the start latent's).")
@click.option("--steps", type=int, help="Sampling steps, 1..1000 (default: the run's sample.steps).")
@click.option("--scheduler", help="Solver: ddim, dpmpp-2m or unipc (default: the run's "
                                  "sample.scheduler; docs/architecture.md, 'Solvers').")
@click.option("--guidance-interval", help="LO:HI, fractions of the schedule: step i of N is "
                                          "guided iff LO <= i/N < HI, the others run the UNet "
                                          "on the prompt only (half the cost) [default: 0:1].")
@click.option("--guidance", type=float,
              help="Classifier-free guidance scale (default: the run's sample.guidance).")
@click.option("--seed", "seeds", type=click.IntRange(0, 2**63 - 1), multiple=True,
              help="Noise seed (--from-noise), 0 or more; repeat for several videos per prompt "
                   "[default: 0].")
@click.option("--num-videos", type=click.IntRange(1, 10_000),
              help="Videos per prompt, seeds --seed, --seed + 1, ... (--from-noise).")
@click.option("--negative-prompt", default="", help="The unconditional prompt (default: empty).")
@click.option("--no-vgt", is_flag=True, help="Leave out the VGT perturbation (Tune-A-Video).")
@click.option("--from-noise", is_flag=True,
              help="Start from seeded Gaussian noise instead of the inverted training clip.")
@click.option("--latent", type=click.Path(path_type=Path), help="Start from this latent (.npy).")
@click.option("--cache-interval", type=int,
              help="DeepCache: the full UNet every N-th step, only its outer blocks on the cached "
                   "feature in between (1 = off; needs an engine folder with the cache graphs) "
                   "[default: 1].")
@click.option("--cache-schedule", type=click.Choice(SCHEDULES),
              help="Where the full steps go: every N-th, or as many placed denser early "
                   "(DeepCache's non-uniform schedule) [default: uniform].")
@_backend
@_precision
@_exact
@_threads
@click.option("--format", "fmt", type=click.Choice(["mp4", "gif"]), default="mp4", show_default=True,
              help="Video format in an --out folder.")
@click.option("--fps", type=float, help="Frame rate of the video (default: the run's).")
@click.option("--timings", is_flag=True, help="Print the time spent per stage.")
@click.option("--force", is_flag=True, help="Replace outputs that exist.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@_user_errors
def generate(engine_dir: Path, prompts: tuple[str, ...], prompts_file: Path | None, out: Path,
             frames: int | None, steps: int | None, scheduler: str | None,
             guidance_interval: str | None, guidance: float | None, seeds: tuple[int, ...],
             num_videos: int | None, negative_prompt: str, no_vgt: bool, from_noise: bool,
             latent: Path | None, cache_interval: int | None, cache_schedule: str | None, backend: str,
             precision: str, exact: bool, threads: int | None, fmt: str, fps: float | None,
             timings: bool, force: bool, quiet: bool) -> None:
    """Generate videos for --prompt (or --prompts-file) with the model in --engine-dir.

    Every prompt is sampled with every seed; the videos run through the networks in batches.
    """
    from .api import Pipeline, Request, tuned_line
    from .sampling.settings import SamplingSettings

    check_threads(threads)
    if fps is not None and not 0 < fps <= 240:
        raise AplaError(f"--fps must be in (0, 240], got {fps}")
    texts = list(prompts) + (_read_prompts(prompts_file) if prompts_file is not None else [])
    if not prompts and prompts_file is None:
        raise click.UsageError("Missing option '--prompt' (or --prompts-file).")
    if not texts:
        raise AplaError(f"--prompts-file {prompts_file} holds no prompt")
    if any(not p.strip() for p in texts):
        raise AplaError("--prompt must not be empty")
    settings = SamplingSettings.from_dict({
        "steps": steps, "guidance": guidance, "scheduler": scheduler, "guidance_interval": guidance_interval,
        "cache_interval": cache_interval, "cache_schedule": cache_schedule})
    requests = [Request(p, s, frames, negative_prompt, settings)
                for p in texts for s in _seeds(seeds, num_videos, from_noise)]
    names = _output_names(out, len(requests), [r.seed for r in requests], fmt, force)
    cache = True if (settings.cache_interval or 1) > 1 else None
    with Pipeline.open(engine_dir, backend, threads, use_vgt=not no_vgt, precision=precision,
                       cache=cache, exact=exact) as pipe:
        _notes(pipe.placement.notes + ((tuned_line(pipe),) if pipe.tuned and not quiet else ()))
        for r in requests:
            pipe.check(r, from_noise=from_noise, latent=latent)
        steps_each = pipe.settings_for(settings).steps or 0
        callback, done = progress_bar(not quiet, -(-len(requests) // pipe.max_batch) * steps_each, "sample")
        try:
            videos = pipe.run(requests, from_noise=from_noise, latent=latent, callback=callback)
        finally:
            done()
        with pipe.timings("video write"):
            if names is None:
                written = [_save(videos[0], out, fps or videos[0].fps, force)]
            else:
                ran = {**pipe.placement.to_dict(pipe.engine.runners),
                       "tuned": None if pipe.tuned is None else pipe.tuned["mode"]}
                written = _write_folder(out, names, videos, fps, force, ran)
        if not quiet:
            click.echo(_summary(videos, pipe, f"{written[0]}" if names is None else
                                f"{len(videos)} videos and index.json to {out}"), err=True)
        if timings:
            click.echo(pipe.timings.table())


def progress_bar(enabled: bool, total: int, desc: str) -> tuple[Any, Callable[[], None]]:
    """(step callback, close) of a tqdm bar over ``total`` steps; (None, no-op) when disabled."""
    if not enabled:
        return None, lambda: None
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    return (lambda i, t: bar.update(1)), bar.close


def _output_names(out: Path, count: int, seeds: list[int], fmt: str, force: bool) -> list[str] | None:
    """The file names of an ``--out`` folder (None: ``--out`` is one video file), checked to be
    writable before any work is done."""
    from .folder.atomic import check_writable
    from .media.video import WRITE_SUFFIXES

    if count > 1 or str(out).endswith(("/", "\\")) or out.is_dir():
        names = [f"{i:03d}-seed{seed}.{fmt}" for i, seed in enumerate(seeds)]
        for path in [out / n for n in names] + [out / "index.json"]:
            check_writable(path, force)
        return names
    if out.suffix.lower() not in WRITE_SUFFIXES:
        raise AplaError(f"cannot write {out}: unknown extension {out.suffix!r}; use .mp4 or .gif")
    check_writable(out, force)
    return None


def _summary(videos: list[Any], pipe: Any, where: str) -> str:
    """The line that says what was written and how it was sampled."""
    v, s = videos[0], videos[0].settings
    interval = "" if s.guidance_interval is None else f" on {s.guidance_interval[0]:g}:{s.guidance_interval[1]:g}"
    cache = f", cache interval {s.cache_interval} ({s.cache_schedule})" if s.cache_interval > 1 else ""
    batches = f", batches of up to {max(x.batch_size for x in videos)}" if len(videos) > 1 else ""
    return (f"wrote {where}: {v.frames.shape[0]} frames of {v.frames.shape[2]}x{v.frames.shape[1]}, "
            f"{s.steps} {s.solver} steps from t={v.start_timestep}, guidance {s.guidance:g}{interval}, "
            f"VGT {'on' if v.vgt else 'off'}, backend {pipe.describe()}, precision "
            f"{pipe.describe_precision()}{cache}{batches}")


def _read_prompts(path: Path) -> list[str]:
    from .folder.jsonfile import read_text_file

    text = read_text_file(path, "--prompts-file")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _seeds(seeds: tuple[int, ...], num_videos: int | None, from_noise: bool) -> list[int]:
    if num_videos is not None and len(seeds) > 1:
        raise AplaError("--num-videos takes one --seed (the first); give either several --seed or "
                        "--num-videos")
    first = seeds[0] if seeds else 0
    out = [first + i for i in range(num_videos)] if num_videos is not None else list(seeds or [0])
    if len(out) > 1 and not from_noise:
        raise AplaError("several seeds give the same video unless the start is noise; pass "
                        "--from-noise (seeds only choose the noise)")
    if len(set(out)) != len(out):
        raise AplaError(f"--seed values repeat: {out}")
    return out


def _save(video: Any, out: Path, fps: float, force: bool) -> Path:
    from .media.video import write_video

    return write_video(out, video.frames, fps=fps, force=force)


def _write_folder(out: Path, names: list[str], videos: list[Any], fps: float | None,
                  force: bool, placement: dict[str, Any]) -> list[Path]:
    """The videos under ``out`` and ``index.json`` (each video's record, file, sha256 and
    where the networks ran), written last."""
    from .folder.atomic import write_text
    from .folder.manifest import sha256_file

    out.mkdir(parents=True, exist_ok=True)
    paths, index = [], []
    for name, video in zip(names, videos):
        path = _save(video, out / name, fps or video.fps, force)
        paths.append(path)
        index.append({**video.record(), "file": name, "sha256": sha256_file(path),
                      "backend": placement["backend"], "precision": placement["precision"],
                      "tuned": placement["tuned"]})
    write_text(out / "index.json", json.dumps(index, indent=2) + "\n", force=force)
    return paths


@main.command(context_settings=_CONTEXT)
@click.argument("video", type=click.Path(path_type=Path))
@_engine_dir
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Latent file (.npy); for a vgt.source model also NAME.source.npy beside it.")
@click.option("--steps", type=int, help="DDIM inversion steps (default: the run's "
                                        "sample.inversion_steps).")
@click.option("--frames", type=int, help="Frames to read (default: the start latent's count).")
@click.option("--start", type=int, help="First frame (default: the run's).")
@click.option("--stride", type=int, help="Read every N-th frame (default: the run's).")
@click.option("--no-vgt", is_flag=True, help="Invert without the VGT perturbation.")
@_backend
@_precision
@_threads
@click.option("--timings", is_flag=True, help="Print the time spent per stage.")
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
@click.option("--quiet", is_flag=True, help="No progress bar, no summary line.")
@_user_errors
def invert(video: Path, engine_dir: Path, out: Path, steps: int | None, frames: int | None,
           start: int | None, stride: int | None, no_vgt: bool, backend: str, precision: str,
           threads: int | None, timings: bool, force: bool, quiet: bool) -> None:
    """DDIM-invert VIDEO into a start latent for `generate --latent` (its timestep goes
    beside it in NAME.json)."""
    from .api import Pipeline
    from .folder.latents import check_latent_outputs, save_latent
    from .sampling.settings import check_steps

    check_threads(threads)
    if steps is not None:
        check_steps(steps)
    check_latent_outputs(out, False, force)
    with Pipeline.open(engine_dir, backend, threads, use_vgt=not no_vgt, for_inversion=True,
                       precision=precision) as pipe:
        _notes(pipe.placement.notes)
        check_latent_outputs(out, pipe.use_vgt and pipe.vgt_reads_source, force)
        steps = steps or pipe.inversion_steps()
        callback, done = progress_bar(not quiet, steps, "invert")
        try:
            latent = pipe.invert(video, steps=steps, frames=frames, start=start, stride=stride,
                                 callback=callback)
        finally:
            done()
        written = save_latent(latent, out, steps, with_source=pipe.use_vgt and pipe.vgt_reads_source,
                              force=force)
        if not quiet:
            extra = f" and {written[1]}" if len(written) > 2 else ""
            click.echo(f"wrote {written[0]}{extra}: latent {list(latent.start.shape)}, {steps} steps, "
                       f"backend {pipe.describe()}, precision {pipe.describe_precision()}", err=True)
        if timings:
            click.echo(pipe.timings.table())


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 exposes the server to the network).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(1), default=1, show_default=True,
              help="Replicas of the deployment, each with its own open pipeline.")
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True,
              help="Most requests one batched generate takes.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 10_000), default=20.0, show_default=True,
              help="How long a batch waits for more requests once one arrived.")
@click.option("--max-queue", type=click.IntRange(0), default=16, show_default=True,
              help="Requests that may wait per replica beyond a batch; more get 503.")
@click.option("--num-gpus", type=click.FloatRange(0), default=0.0, show_default=True,
              help="GPUs per replica (Ray's num_gpus; fractions share a GPU).")
@click.option("--num-cpus", type=click.FloatRange(0), default=1.0, show_default=True,
              help="CPUs Ray reserves per replica.")
@click.option("--timeout-s", type=click.FloatRange(0, min_open=True), default=300.0,
              show_default=True, help="A request unanswered after this long gets 504.")
@click.option("--from-noise", is_flag=True,
              help="Start every video from its seed's noise instead of the inverted clip.")
@click.option("--address", default=None, metavar="HOST:PORT|auto",
              help="Join this Ray cluster (default: RAY_ADDRESS, else a local instance); "
                   "token authentication as Ray documents (RAY_AUTH_TOKEN, ~/.ray/auth_token).")
@click.option("--proxy-location", type=click.Choice(["EveryNode", "HeadOnly"]), default="EveryNode",
              show_default=True, help="Where Serve runs its HTTP proxies.")
@click.option("--print-config", is_flag=True,
              help="Print the Serve config file for these options (serve run / serve deploy) and exit.")
@_backend
@_precision
@_exact
@_threads
@_user_errors
def serve(engine_dir: Path, host: str, port: int, replicas: int, max_batch: int,
          batch_wait_ms: float, max_queue: int, num_gpus: float, num_cpus: float,
          timeout_s: float, from_noise: bool, address: str | None, proxy_location: str,
          print_config: bool, backend: str, precision: str, exact: bool,
          threads: int | None) -> None:
    """Serve the model in --engine-dir over HTTP with Ray Serve (pip install -e ".[serve]").

    Joins the Ray cluster at --address or RAY_ADDRESS if given, else starts a local one on
    127.0.0.1; SIGINT or SIGTERM deletes the app (and stops the local Ray instance)."""

    check_threads(threads)
    Manifest.open(engine_dir).verify()  # a broken folder fails here, in one line
    try:
        from .service.serve import ServeOptions, run_server, serve_config
    except ImportError as err:
        raise AplaError(f"apla-rt serve needs Ray Serve ({err}); pip install -e \".[serve]\"") from None
    options = ServeOptions(str(engine_dir.resolve()), replicas, max_batch, batch_wait_ms, max_queue,
                           num_gpus, num_cpus, backend, threads, from_noise, timeout_s,
                           precision=precision, exact=exact)
    if print_config:
        import yaml

        click.echo(yaml.safe_dump(serve_config(options, host, port, proxy_location), sort_keys=False),
                   nl=False)
        return
    run_server(options, host, port, log=lambda line: click.echo(line, err=True), address=address,
               proxy_location=proxy_location)


def _placement_lines(manifest: Any, placement: Any) -> list[str]:
    """Where each network runs by default and why, with the measured table (candidate, seconds a
    call, fidelity, chosen) where this machine has one (``apla_rt.backends.choice``)."""
    from .backends import choice
    from .backends.precision import probe_cpu

    lines = [f"backend (auto): {placement.describe()}, precision {placement.describe_precision()}"]
    cpu = probe_cpu()
    for name, c in placement.networks.items():
        lines.append(f"  {name}: {c.runner} {c.precision}" + (f" ({c.why})" if c.why else ""))
        table = choice.measured(manifest, name, placement.threads, cpu, run=False) or {"rows": []}
        for row in table["rows"]:
            chosen = [row["backend"], row["precision"]] == table.get("chosen")
            seconds = "-" if row["seconds"] is None else f"{row['seconds']:.4g} s"
            lines.append(f"    {row['backend']:<8} {row['precision']:<5} {seconds:>12}  "
                         f"{'passed' if row['passed'] else 'failed'} {row['fidelity']}"
                         + ("  <- chosen" if chosen else ""))
    return lines


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--budget-db", default="1.0", show_default=True,
              help="How far (dB) below DDIM 50 fp32's PSNR against the reference a setting may be, "
                   "in every case.")
@click.option("--minutes", default="60", show_default=True,
              help="Time bound of this run; out of time it chooses among what it measured.")
@_threads
@click.option("--edit-prompt", help="The edit case's prompt (default: the training prompt in a "
                                    "watercolor style).")
@click.option("--solvers", help="Solvers to try, comma-separated [default: ddim,dpmpp-2m,unipc].")
@click.option("--steps", "steps_list", help="Step counts to try [default: 10,15,20,25,30,40,50].")
@click.option("--cache-intervals", help="DeepCache intervals to try, 1 = off [default: 1,2,3,4].")
@click.option("--reference-steps", type=click.IntRange(1, 1000), default=REFERENCE_STEPS, show_default=True,
              help="DDIM steps of the reference solution (docs/tune.md).")
@click.option("--force", is_flag=True, help="Tune again where this machine has a tuned setting.")
@click.option("--quiet", is_flag=True, help="No progress bars, no summary.")
@_user_errors
def tune(engine_dir: Path, budget_db: str, minutes: str, threads: int | None, edit_prompt: str | None,
         solvers: str | None, steps_list: str | None, cache_intervals: str | None,
         reference_steps: int, force: bool, quiet: bool) -> None:
    """Measure the fastest sampling setting for the model in --engine-dir on this machine that
    stays within --budget-db of DDIM 50 in fp32, and record it in the folder's tuned.json:
    generate, serve and batch then use it (docs/tune.md). A killed run continues when rerun."""
    from .tune import Grid, TuneOptions, run_tune, summary_lines

    options = TuneOptions(budget_db, minutes, threads, edit_prompt, force,  # type: ignore[arg-type]
                          Grid.parse(solvers, steps_list, cache_intervals), reference_steps)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    entry = run_tune(engine_dir, options, log, None if quiet else _bar)
    if not quiet:
        for line in summary_lines(entry):
            click.echo(line, err=True)
        click.echo(f"wrote {engine_dir / 'tuned.json'}: generate, serve and batch use it here by "
                   "default (--exact: DDIM at the run's steps in fp32)", err=True)


def _tuned_here(manifest: Any) -> list[str]:
    """``info``'s lines on the settings apla-rt tune chose for this folder on this machine."""
    from .tune import tuned_here

    return [f"tuned here ({threads or 'default'} threads): {line}" for threads, line in tuned_here(manifest)]


def _bar(desc: str, total: int) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)


def _dims(dims: tuple[Any, ...]) -> str:
    return "(" + ", ".join(str(d) for d in dims) + ")"


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--jobs", required=True, type=click.Path(path_type=Path),
              help="JSONL file, one video a line: {\"prompt\", \"seed\", \"frames\"?, "
                   "\"negative_prompt\"?, \"format\"?, and the sampling settings of generate: "
                   "\"steps\"?, \"guidance\"?, \"scheduler\"?, \"guidance_interval\"?, "
                   "\"cache_interval\"?, \"cache_schedule\"?} (docs/batch.md).")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder for the videos (NNNNN-HASH.FORMAT) and index.json; a rerun resumes.")
@click.option("--address", help="Ray cluster to join (HOST:PORT or auto; default: RAY_ADDRESS, "
                                "else a local Ray instance on 127.0.0.1).")
@click.option("--actors", type=click.IntRange(1), default=1, show_default=True,
              help="Ray actors, each with its own open pipeline.")
@click.option("--num-gpus", type=click.FloatRange(0), default=0.0, show_default=True,
              help="GPUs per actor (Ray's num_gpus; fractions share a GPU).")
@click.option("--max-batch", type=click.IntRange(1), default=4, show_default=True,
              help="Lines one batched generate takes (a kill loses at most these per actor).")
@click.option("--from-noise", is_flag=True,
              help="Start every video from its seed's noise instead of the inverted clip.")
@click.option("--no-vgt", is_flag=True, help="Leave out the VGT perturbation (Tune-A-Video).")
@_backend
@_precision
@_exact
@_threads
@click.option("--force", is_flag=True,
              help="Make every video again, also over another job's folder.")
@click.option("--quiet", is_flag=True, help="No progress lines, no summary line.")
def batch(engine_dir: Path, jobs: Path, out: Path, address: str | None, actors: int,
          num_gpus: float, max_batch: int, from_noise: bool, no_vgt: bool, backend: str,
          precision: str, exact: bool, threads: int | None, force: bool, quiet: bool) -> None:
    """Generate every line of --jobs as a resumable Ray Data job (pip install -e ".[batch]").

    Every line is checked before anything runs; a rerun into the same --out skips the videos
    that exist and match their sha256 in index.json."""
    from .service.batch import BatchOptions, run_batch

    with reported_to_user(interrupted="nothing was written"):
        check_threads(threads)
        try:
            import ray.data  # noqa: F401
        except ImportError as err:
            raise AplaError(f"apla-rt batch needs Ray Data ({err}); "
                            "pip install -e \".[batch]\"") from None
    options = BatchOptions(str(engine_dir), str(jobs), str(out), address, actors, num_gpus,
                           threads, max_batch, backend, from_noise, not no_vgt, force, precision,
                           exact)
    log = (lambda m: None) if quiet else (lambda m: click.echo(m, err=True))
    with reported_to_user(interrupted=f"the videos indexed in {out / 'index.json'} are kept; "
                                      "the same command resumes"):
        result = run_batch(options, log)
    if not quiet:
        click.echo(f"wrote {result.made} video(s) to {result.out} ({result.skipped} already "
                   f"there, {result.total} lines) and index.json", err=True)


@main.command(context_settings=_CONTEXT)
@_engine_dir
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--threads", type=int, default=None,
              help="Show where each network runs with this --threads (the measured choice depends on it).")
@_user_errors
def info(engine_dir: Path, verify: bool, as_json: bool, threads: int | None) -> None:
    """Show the networks, dims, profiles, prompt, files and versions of an engine folder."""
    from .backends.placement import place
    from .folder.latents import folder_start_timestep
    from .sampling.solvers import SOLVERS

    manifest = Manifest.open(engine_dir)
    if verify:
        manifest.verify()
    if as_json:
        click.echo(json.dumps(manifest.data, indent=2))
        return
    out = [f"engine folder {manifest.root}  (manifest format {manifest.data['format_version']})",
           f"prompt: {manifest.prompt!r}"]
    shape = manifest.start_latent_shape()
    out.append(f"start latent: {manifest.rel(manifest.start_latent_path)} {list(shape)}"
               if manifest.start_latent_path is not None and shape is not None else "start latent: none")
    lo, opt, hi = manifest.frame_range()
    out.append(f"frames: {lo}..{hi} (opt {opt}); latent {manifest.latent_size()}, "
               f"{manifest.latent_channels} channels, VAE x{manifest.vae_downsample}, "
               f"scaling {manifest.vae_scaling_factor:g}; fps {manifest.fps:g}")
    sched = manifest.scheduler
    try:
        default = manifest.sampling_defaults().solver
    except AplaError as err:
        default = f"unreadable ({err})"
    where = ("" if manifest.start_latent_path is None else
             f"; start latent at t={folder_start_timestep(manifest)}"
             + ("" if manifest.start_timestep is not None else " (not recorded: the run's inversion's)"))
    out.append(f"sampling: {default} by default (--scheduler {'|'.join(SOLVERS)}){where}")
    out.append(f"noise schedule: {sched.beta_schedule} {sched.beta_start:g}..{sched.beta_end:g}, "
               f"{sched.num_train_timesteps} steps, {sched.timestep_spacing} spacing, "
               f"offset {sched.steps_offset}")
    out.append("networks:")
    for name, spec in manifest.networks.items():
        files = ", ".join(manifest.rel(p) for p in (spec.onnx, spec.onnx_ort, spec.engine) if p is not None)
        out.append(f"  {name}  [{files}]")
        for t in spec.inputs:
            out.append(f"    in  {t.name:<22} {str(t.dtype):<8} {_dims(t.dims)}")
        for t in spec.outputs:
            out.append(f"    out {t.name:<22} {str(t.dtype):<8} {_dims(t.dims)}")
        out.append("    profile " + ", ".join(f"{d} {r[0]}..{r[2]} (opt {r[1]})"
                                             for d, r in spec.profile.items()))
    try:  # what the defaults would run here, without running a check not cached yet
        out += _placement_lines(manifest, place(manifest, tuple(manifest.networks), threads=threads,
                                                check=False))
    except AplaError as err:
        out.append(f"backend (auto): unavailable ({err})")
    out += _int8_lines(manifest)
    out += _tuned_here(manifest)
    out.append("files:" + (" (sha256 verified)" if verify else ""))
    out += [f"  {rel}  {digest[:16]}" for rel, digest in manifest.files.items()]
    if manifest.checkpoint_sha256:
        out.append(f"checkpoint sha256: {manifest.checkpoint_sha256}")
    if manifest.versions:
        out.append("versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()))
    click.echo("\n".join(out))


def _int8_lines(manifest: Manifest) -> list[str]:
    """One line per int8 model of the folder (apla_rt.folder.int8): its file and its check."""
    lines = []
    for name, model in manifest.int8.items():
        ok, why = model.usable()
        lines.append(f"int8: {name}: {manifest.rel(model.model)}, {why}" + ("" if ok else ": not used"))
    return lines


if __name__ == "__main__":
    main()
