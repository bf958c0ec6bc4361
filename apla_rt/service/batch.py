"""``apla-rt batch``: many videos from a JSONL jobs file as a resumable Ray Data job.

Each line of the jobs file is one video, with the fields of a ``serve`` request
(``apla_rt.service.request_fields``) and a required ``seed``. Every line is checked before anything
runs. The job is a ``map_batches`` over ``Generator``, a callable class of which each actor opens
one ``Pipeline`` and runs its batched ``run`` on up to ``max_batch`` lines at a time,
returning the encoded videos' bytes.

**The driver writes every file.** It receives the videos as Ray Data streams them back,
writes each one atomically (``apla_rt.folder.atomic``: a temporary sibling, fsync, rename) and then
rewrites ``index.json`` atomically. One process writes the folder, so the index needs no
locking, the output folder only has to exist where the driver runs (no shared storage on a
cluster), and a SIGKILL at any moment leaves complete videos under final names and an index
that lists a subset of them: only the videos in flight are lost.

A video's name is ``NNNNN-HASH.FORMAT``: its line number and a hash of its line's settings,
the job's options (``from_noise``, VGT) and the engine folder (its manifest's sha256), so a
rerun of the same job finds the same names. ``index.json`` records, per video, its line,
prompt, seed, resolved settings, file and sha256, plus the job's identity (the hash of all
its names).

Rerun semantics:

* the same job into the same folder **resumes**: a line whose video exists and matches its
  recorded sha256 is skipped; a missing or tampered one is made again (replacing the file);
* a folder holding another job's index (another jobs file, engine folder or options), or
  files under this job's names without an index, is refused without ``--force``;
* ``--force`` makes every video again; files of another job that this one does not name are
  left where they are.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from ..api import Pipeline, Request, tuned_for
from ..folder.atomic import check_writable, write_bytes, write_text
from ..errors import AplaError, InputError
from ..folder.jsonfile import read_text_file
from ..folder.files import sha256_file
from ..folder.manifest import MANIFEST_NAME, Manifest
from ..engine import Engine
from .raycluster import connect, disconnect
from ..backends.placement import check_threads
from ..backends.precision import check_precision
from .request_fields import decode_object, parse_request, request_fields

INDEX = "index.json"
INDEX_FORMAT = "apla-batch/1"
MAX_LINE_BYTES = 64 * 1024  # a line of the jobs file (the serve body's limit)
MAX_ERRORS_SHOWN = 5  # bad lines named in the one-line error (all are counted)


@dataclass(frozen=True)
class BatchOptions:
    """What ``apla-rt batch`` configures."""

    engine_dir: str
    jobs: str
    out: str
    address: str | None = None
    actors: int = 1
    num_gpus: float = 0.0
    threads: int | None = None
    max_batch: int = 4
    backend: str = "auto"
    from_noise: bool = False
    use_vgt: bool = True
    force: bool = False
    precision: str = "auto"  # apla_rt.backends.placement; index.json records what ran
    exact: bool = False  # DDIM at the run's steps in fp32, not the setting tuned for the machine

    def check(self) -> "BatchOptions":
        for name, value in (("--actors", self.actors), ("--max-batch", self.max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        if (isinstance(self.num_gpus, bool) or not isinstance(self.num_gpus, (int, float))
                or not 0 <= self.num_gpus < float("inf")):
            raise InputError(f"--num-gpus must be a non-negative number, got {self.num_gpus!r}")
        check_threads(self.threads)
        check_precision(self.precision)
        return self


@dataclass(frozen=True)
class Job:
    """One line of the jobs file, checked."""

    line: int  # 1-based line number in the file
    request: Request
    fmt: str
    name: str  # the video's file name in the output folder

    def spec(self) -> str:
        """The line as the actors get it (JSON)."""
        return json.dumps(request_fields(self.request, self.fmt))


@dataclass
class Plan:
    """The checked job: every line, which still need a video, and the index so far."""

    jobs: list[Job]
    job_id: str
    engine_id: str
    todo: list[Job]
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)  # line -> index entry


def engine_identity(manifest: Manifest, tuned: dict[str, Any] | None = None) -> str:
    """The engine folder's identity: the sha256 of its manifest (which lists every file's), and
    of the tuned setting that gives the lines their defaults, if any."""
    digest = sha256_file(manifest.root / MANIFEST_NAME)
    if tuned is None:
        return digest
    return hashlib.sha256((digest + json.dumps(tuned["settings"], sort_keys=True)).encode()).hexdigest()


def video_name(line: int, request: Request, fmt: str, options: BatchOptions, engine_id: str) -> str:
    settings = {**request_fields(request, fmt), "from_noise": options.from_noise,
                "vgt": options.use_vgt, "engine": engine_id}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    return f"{line:05d}-{digest[:12]}.{fmt}"


def read_jobs(options: BatchOptions, pipe: Pipeline, engine_id: str) -> list[Job]:
    """Every line of the jobs file checked as ``serve`` checks a request (plus a required
    seed); all bad lines in one ``InputError``, each named by its line number."""
    path = Path(options.jobs)
    text = read_text_file(path, "--jobs")
    jobs: list[Job] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            if len(line.encode("utf-8")) > MAX_LINE_BYTES:
                raise InputError(f"the line is longer than {MAX_LINE_BYTES} bytes")
            request, fmt = parse_request(decode_object(line, "the line"), seed_required=True)
            pipe.check(request, from_noise=options.from_noise)
        except AplaError as err:
            errors.append(f"line {number}: {err}")
            continue
        jobs.append(Job(number, request, fmt, video_name(number, request, fmt, options, engine_id)))
    if errors:
        shown = "; ".join(errors[:MAX_ERRORS_SHOWN])
        more = f" (and {len(errors) - MAX_ERRORS_SHOWN} more)" if len(errors) > MAX_ERRORS_SHOWN else ""
        raise InputError(f"--jobs {path}: {len(errors)} bad line(s), nothing was run: {shown}{more}")
    if not jobs:
        raise InputError(f"--jobs {path} holds no job (one JSON object a line)")
    return jobs


def plan(options: BatchOptions) -> Plan:
    """Check the options, the engine folder, every line and the output folder, without
    starting Ray or writing anything; decide which lines still need their video."""
    options.check()
    manifest = Manifest.open(options.engine_dir)
    # the folder, and the setting tuned for this machine that the lines' defaults come from
    tuned = None if options.exact else tuned_for(manifest, options.backend, options.precision, options.threads)
    engine_id = engine_identity(manifest, tuned)
    # A pipeline that opens no network (so the backend does not matter, and the driver needs
    # no GPU): what ``Pipeline.check`` needs, the tokenizer and the manifest.
    checker = Pipeline(Engine.open(manifest, "ort-cpu", networks=()), options.use_vgt,
                       options.max_batch, tuned)
    jobs = read_jobs(options, checker, engine_id)
    job_id = hashlib.sha256("\n".join(j.name for j in jobs).encode()).hexdigest()
    out = Path(options.out)
    if out.exists() and not out.is_dir():
        raise AplaError(f"--out {out} is a file; give a folder")
    index = _read_index(out / INDEX, options.force)
    if index is not None and index.get("job") != job_id and not options.force:
        raise AplaError(f"{out} holds the index of another batch job (another jobs file, engine "
                        "folder or options); pass --force to make this job's videos there, or "
                        "choose another --out")
    entries: dict[int, dict[str, Any]] = {}
    if index is None and not options.force:
        for job in jobs:  # this job's names taken by files it did not index
            check_writable(out / job.name, force=False)
    check_writable(out / INDEX, force=True)  # the folder can be written
    if index is not None and index.get("job") == job_id and not options.force:
        recorded = {e.get("file"): e for e in index.get("videos", []) if isinstance(e, dict)}
        for job in jobs:
            entry = recorded.get(job.name)
            if entry is None:
                continue
            try:
                intact = sha256_file(out / job.name) == entry.get("sha256")
            except OSError:  # gone or unreadable: the video is made again
                intact = False
            if intact:
                entries[job.line] = entry
    todo = [j for j in jobs if j.line not in entries]
    return Plan(jobs, job_id, engine_id, todo, entries)


def _read_index(path: Path, force: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
        if force:
            return None
        raise AplaError(f"{path} exists and is not an apla-rt batch index; pass --force to "
                        "replace it, or choose another --out")
    return data


def write_index(out: Path, plan_: Plan, options: BatchOptions, jobs_file: str) -> None:
    videos = [plan_.entries[line] for line in sorted(plan_.entries)]
    data = {"format": INDEX_FORMAT, "job": plan_.job_id, "engine": plan_.engine_id,
            "jobs_file": jobs_file, "lines": len(plan_.jobs), "from_noise": options.from_noise,
            "vgt": options.use_vgt, "videos": videos}
    write_text(out / INDEX, json.dumps(data, indent=1) + "\n", force=True)


class Generator:
    """The ``map_batches`` callable class: one ``Pipeline`` per actor, opened once."""

    def __init__(self, options: dict[str, Any]):
        o = BatchOptions(**options)
        self.pipe = Pipeline.open(o.engine_dir, o.backend, o.threads, use_vgt=o.use_vgt,
                                  max_batch=o.max_batch, precision=o.precision, exact=o.exact)
        self.from_noise = o.from_noise
        self.ran = {"backend": self.pipe.describe(), "precision": self.pipe.describe_precision(),
                    "tuned": None if self.pipe.tuned is None else self.pipe.tuned["mode"]}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        parsed = [parse_request(json.loads(str(s)), seed_required=True) for s in batch["spec"]]
        videos = self.pipe.run([r for r, _ in parsed], from_noise=self.from_noise)
        data, meta = [], []
        for video, (_, fmt) in zip(videos, parsed):
            data.append(video.encode(fmt))
            meta.append(json.dumps({**video.record(), "format": fmt, "from_noise": self.from_noise,
                                    "batch_size": video.batch_size, **self.ran}))
        return {"line": np.asarray(batch["line"]), "data": np.array(data, dtype=object),
                "meta": np.array(meta, dtype=object)}


@dataclass(frozen=True)
class BatchResult:
    out: Path
    total: int
    skipped: int  # already made, sha256 checked
    made: int


def _results(options: BatchOptions, todo: list[Job]) -> Iterator[list[dict[str, Any]]]:
    """Run ``todo`` as a Ray Data job; yield its output batches (rows) as they arrive."""
    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-run INFO and notices
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # One line per input block: Ray Data bundles blocks up to ``batch_size`` lines for a
    # task, so each task is one batch and its output one block that the driver gets as soon
    # as that batch is done (larger input blocks would hold several batches' videos back).
    items = ray.data.from_items([{"line": j.line, "spec": j.spec()} for j in todo],
                                override_num_blocks=len(todo))
    per_actor_cpus = options.threads or 1
    ds = items.map_batches(Generator, batch_size=options.max_batch, batch_format="numpy",
                        fn_constructor_kwargs={"options": asdict(options)},
                        compute=ray.data.ActorPoolStrategy(size=options.actors),
                        num_cpus=per_actor_cpus,
                        num_gpus=options.num_gpus or None)
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=0):
        yield [{"line": int(batch["line"][i]), "data": batch["data"][i],
                "meta": json.loads(str(batch["meta"][i]))} for i in range(len(batch["line"]))]


def run_batch(options: BatchOptions, log: Callable[[str], None] = lambda m: None) -> BatchResult:
    """Plan (checks, resume), then make the missing videos on Ray (see the module docstring)."""
    p = plan(options)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out, p.jobs)
    jobs_file = Path(options.jobs).name
    write_index(out, p, options, jobs_file)  # marks the folder as this job's before any work
    skipped = len(p.entries)
    log(f"{len(p.jobs)} lines: {skipped} video(s) already made, {len(p.todo)} to make")
    if not p.todo:
        return BatchResult(out, len(p.jobs), skipped, 0)
    by_line = {j.line: j for j in p.todo}
    clock = time.perf_counter()
    connection = connect(options.address, num_cpus=options.actors * (options.threads or 1))
    log(f"Ray {'started' if connection.started else 'joined'} in {time.perf_counter() - clock:.1f} s; "
        f"{options.actors} actor(s) open the engine folder")

    made = 0
    previous = _sigterm_interrupts()
    try:
        for rows in _user_error_of_actor(_results(options, p.todo)):
            for row in rows:  # each video under its final name first, then the index
                job = by_line[row["line"]]
                data: bytes = row["data"]
                write_bytes(out / job.name, data, force=True)
                meta = row["meta"]
                p.entries[job.line] = {
                    "line": job.line, "prompt": job.request.prompt, "seed": int(job.request.seed),
                    "settings": {k: v for k, v in meta.items()
                                 if k not in ("prompt", "seed", "batch_size", "backend", "precision", "tuned")},
                    "backend": meta["backend"], "precision": meta["precision"], "tuned": meta["tuned"],
                    "file": job.name, "sha256": hashlib.sha256(data).hexdigest()}
            made += len(rows)
            write_index(out, p, options, jobs_file)
            log(f"{skipped + made}/{len(p.jobs)} videos (a batch of {len(rows)}: "
                f"{', '.join(by_line[r['line']].name for r in rows)})")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        disconnect(connection)
    return BatchResult(out, len(p.jobs), skipped, made)


def _sigterm_interrupts() -> Any:
    """SIGTERM ends the job as Ctrl-C does (the local Ray instance is stopped on the way
    out); the previous handler, or None off the main thread."""
    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        return None


def _user_error_of_actor(rows: Iterator[list[dict[str, Any]]]) -> Iterator[list[dict[str, Any]]]:
    """An ``AplaError`` raised in an actor (an engine folder it cannot open, ...) as the
    one-line error it is, not Ray's wrapped traceback."""
    try:
        yield from rows
    except AplaError:
        raise
    except Exception as err:
        seen: Any = err
        for _ in range(8):
            seen = getattr(seen, "cause", None) or seen.__cause__
            if seen is None:
                break
            if isinstance(seen, AplaError):
                raise AplaError(f"an actor failed: {seen}") from None
        raise


def _remove_stale_temporaries(out: Path, jobs: list[Job]) -> None:
    """Temporary files a killed run of this job left (``apla_rt.folder.atomic``'s ``.NAME.*.tmp*``)."""
    for name in [INDEX] + [j.name for j in jobs]:
        for stale in glob.glob(glob.escape(str(out / f".{name}.")) + "*.tmp*"):
            Path(stale).unlink(missing_ok=True)
