"""Background jobs: training (then export) and export on demand, one at a time, each the
project's own CLI run as a subprocess in its own process group.

A job is a JSON record in ``jobs/NNNN.json`` (``Job``), rewritten atomically at every change
of state, and a log ``jobs/NNNN.log`` with its processes' output. The record holds the
process id and its start time, so that:

* a browser reload sees the same jobs (the page reads this server's ``JobQueue``);
* a restarted apla-ui takes up a job whose process still runs (it keeps running when
  apla-ui stops: its own session), finishes the jobs whose process ended while it was
  away (a run trained to its last step goes on to its export) and marks the others
  ``interrupted``; ``resume`` continues those with ``apla-train --resume`` from the last
  checkpoint (or reruns the export, which writes its folder atomically).

Progress is read from the run folder (``metrics.jsonl``, the checkpoints, ``summary.json``),
never from the process's output. Cancelling sends SIGINT to the process group (the CLIs
end with "interrupted"; a checkpoint is written atomically, so the last whole one is kept),
then SIGKILL if it has not ended after ``KILL_AFTER_S``. Two jobs never write the same
folder: a job is refused while another queued or running job names its run or engine.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import psutil

from apla_rt.errors import InputError

from .workspace import Workspace, read_json, write_json

QUEUED, TRAINING, EXPORTING = "queued", "training", "exporting"
DONE, FAILED, CANCELLED, INTERRUPTED = "done", "failed", "cancelled", "interrupted"
RUNNING = (TRAINING, EXPORTING)
ACTIVE = (QUEUED, *RUNNING)
RESUMABLE = (FAILED, CANCELLED, INTERRUPTED)
KILL_AFTER_S = 20.0
TRAIN_CLI = ("-m", "apla_train.cli")
EXPORT_CLI = ("-m", "export.cli")


@dataclass
class Job:
    """One background job's record (``jobs/ID.json``); paths relative to the workspace."""

    id: str
    kind: str  # "train" (train, then export when ``export_args``) or "export"
    name: str
    run: str
    engine: str | None  # the engine folder it writes (None: a train job without export)
    train_args: list[str]  # apla-train's arguments for a fresh start ([] for an export job)
    export_args: list[str]  # apla-export's arguments ([]: no export)
    phase: str  # "train" or "export": what runs, or runs next
    state: str = QUEUED
    steps: int | None = None  # training steps of the run
    settings: dict[str, Any] = field(default_factory=dict)  # what the page was given, for display
    created: float = 0.0
    queued_at: float = 0.0
    started: float | None = None
    finished: float | None = None
    phase_started: float | None = None
    pid: int | None = None
    pid_created: float | None = None  # the process's start time: a reused pid is not ours
    cancel_requested: bool = False
    resumes: int = 0
    message: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Job":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def folders(self) -> set[str]:
        """The workspace folders the job reads or writes."""
        return {self.run} | ({self.engine} if self.engine else set())


class _Process:
    """A job's running process: our child (``Popen``), or one started by an earlier apla-ui."""

    def __init__(self, pid: int, created: float | None, popen: subprocess.Popen | None = None):
        self.pid = pid
        self.created = created
        self.popen = popen
        self.kill_at: float | None = None

    def ended(self) -> tuple[bool, int | None]:
        """(whether it has ended, its exit code where known: only for our own child)."""
        if self.popen is not None:
            code = self.popen.poll()
            return code is not None, code
        return not process_alive(self.pid, self.created), None

    def signal(self, sig: int) -> None:
        if self.popen is None and not process_alive(self.pid, self.created):
            return  # gone, or the id now belongs to another process
        try:
            os.killpg(self.pid, sig)  # its own session: the group id is its pid
        except ProcessLookupError:
            pass


def process_alive(pid: int | None, created: float | None) -> bool:
    """Whether ``pid`` still runs and is the process started at ``created``."""
    if pid is None or created is None:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - created) < 0.5
    except psutil.NoSuchProcess:
        return False


class JobQueue:
    """The workspace's jobs, one running at a time, driven by a thread (``start``)."""

    def __init__(self, workspace: Workspace, python: str = sys.executable, poll_s: float = 0.5,
                 env: dict[str, str] | None = None):
        self.ws = workspace
        self.python = python
        self.poll_s = poll_s
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self._lock = threading.RLock()
        self._jobs: dict[str, Job] = {}
        self._procs: dict[str, _Process] = {}
        self._rates: dict[str, tuple[float, int, float, int]] = {}  # id -> (t0, step0, t, step)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Read every record, take up or settle the jobs an earlier apla-ui left running,
        and start the thread that runs the queue."""
        with self._lock:
            for path in sorted(self.ws.jobs.glob("*.json")):
                data = read_json(path)
                if data is None or "id" not in data:
                    continue
                try:
                    job = Job.from_dict(data)
                except TypeError:
                    continue  # not a job record of this apla-ui
                self._jobs[job.id] = job
                if job.state in RUNNING:
                    if process_alive(job.pid, job.pid_created):
                        self._procs[job.id] = _Process(job.pid, job.pid_created)  # type: ignore[arg-type]
                    else:
                        self._phase_ended(job, None)
        self._thread = threading.Thread(target=self._loop, name="apla-ui-jobs", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (running jobs go on; the next apla-ui takes them up)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bug: say so, keep the queue running
                traceback.print_exc()

    def tick(self) -> None:
        """One round: settle ended processes, escalate cancels, start the next job."""
        with self._lock:
            now = time.time()
            for job_id, proc in list(self._procs.items()):
                job = self._jobs[job_id]
                ended, code = proc.ended()
                if ended:
                    del self._procs[job_id]
                    self._phase_ended(job, code)
                elif proc.kill_at is not None and now >= proc.kill_at:
                    proc.signal(signal.SIGKILL)
                    proc.kill_at = None
            if not self._procs:
                queued = sorted((j for j in self._jobs.values() if j.state == QUEUED),
                                key=lambda j: (j.queued_at, j.id))
                if queued:
                    self._launch(queued[0])

    # -- the queue ------------------------------------------------------------------------

    def jobs(self) -> list[Job]:
        with self._lock:
            return [dataclasses.replace(j) for j in sorted(self._jobs.values(), key=lambda j: j.id)]

    def get(self, job_id: str) -> Job:
        with self._lock:
            if job_id not in self._jobs:
                raise InputError(f"there is no job {job_id!r}")
            return dataclasses.replace(self._jobs[job_id])

    def submit(self, kind: str, name: str, run: str, engine: str | None, train_args: list[str],
               export_args: list[str], steps: int | None, settings: dict[str, Any],
               prepare: Callable[[], None] | None = None) -> Job:
        """Record and queue a job, unless another active job uses one of its folders;
        ``prepare`` runs under the queue's lock once that is checked (storing the clip)."""
        with self._lock:
            job = Job(id=self._next_id(), kind=kind, name=name, run=run, engine=engine,
                      train_args=train_args, export_args=export_args,
                      phase="train" if kind == "train" else "export", steps=steps,
                      settings=settings, created=time.time(), queued_at=time.time())
            self._check_free(job)
            if prepare is not None:
                prepare()
            self._save(job)
            self._jobs[job.id] = job
            return dataclasses.replace(job)

    def names_in_use(self) -> set[str]:
        """Names of the training jobs (any state: a failed one may be resumed)."""
        with self._lock:
            return {j.name for j in self._jobs.values() if j.kind == "train"}

    def cancel(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in ACTIVE:
                raise InputError(f"job {job_id} is not queued or running")
            if job.state == QUEUED:
                job.state, job.message = CANCELLED, "cancelled before it started"
                self._save(job)
            else:
                job.cancel_requested = True
                proc = self._procs.get(job_id)
                if proc is not None:
                    proc.signal(signal.SIGINT)
                    proc.kill_at = time.time() + KILL_AFTER_S
                job.message = "cancelling..."
                self._save(job)
            return dataclasses.replace(job)

    def resume(self, job_id: str) -> Job:
        """Queue a failed, cancelled or interrupted job again: training continues from the
        run's last checkpoint, an export starts over."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in RESUMABLE:
                raise InputError(f"job {job_id} is not failed, cancelled or interrupted; nothing to resume")
            self._check_free(job)
            job.state, job.queued_at, job.cancel_requested = QUEUED, time.time(), False
            job.resumes += 1
            job.message = ""
            self._save(job)
            return dataclasses.replace(job)

    # -- progress -------------------------------------------------------------------------

    def progress(self, job: Job) -> dict[str, Any]:
        """What the page shows about ``job``: step, total, loss, seconds left (training), the
        phase's elapsed seconds and a line saying where it is."""
        run = self.ws.root / job.run
        out: dict[str, Any] = {"id": job.id, "name": job.name, "state": job.state,
                               "phase": job.phase, "total": job.steps, "step": 0, "loss": None,
                               "eta_s": None, "elapsed_s": None, "message": job.message}
        if job.kind == "train":
            from apla_train.run import read_metrics

            records = read_metrics(run / "metrics.jsonl")
            if records:
                out["step"] = records[-1]["step"]
                losses = [r["loss"] for r in records if "loss" in r]
                out["loss"] = losses[-1] if losses else None
        if job.state in RUNNING and job.phase_started:
            out["elapsed_s"] = time.time() - job.phase_started
        if job.state == TRAINING:
            out["eta_s"] = self._eta(job.id, out["step"], job.steps)
        out["line"] = _line(out)
        return out

    def _eta(self, job_id: str, step: int, total: int | None) -> float | None:
        now = time.time()
        with self._lock:
            t0, s0, _, _ = self._rates.get(job_id) or (now, step, now, step)
            if step < s0:  # a resumed run restarted its count
                t0, s0 = now, step
            self._rates[job_id] = (t0, s0, now, step)
        if total is None or step <= s0 or now <= t0:
            return None
        return max(0.0, (total - step) * (now - t0) / (step - s0))

    def log_tail(self, job_id: str, lines: int = 20) -> str:
        path = self.ws.jobs / f"{job_id}.log"
        try:
            with open(path, "rb") as fh:
                fh.seek(max(0, path.stat().st_size - 16384))
                text = fh.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.replace("\r", "\n").splitlines()[-lines:])

    # -- inside ---------------------------------------------------------------------------

    def _next_id(self) -> str:
        taken = [int(j) for j in self._jobs if j.isdigit()]
        taken += [int(p.stem) for p in self.ws.jobs.glob("*.json") if p.stem.isdigit()]
        return f"{max(taken, default=0) + 1:04d}"

    def _check_free(self, job: Job) -> None:
        for other in self._jobs.values():
            if other.id != job.id and other.state in ACTIVE and other.folders() & job.folders():
                shared = sorted(other.folders() & job.folders())
                raise InputError(f"job {other.id} ({other.state}) uses {', '.join(shared)}; "
                                 "wait for it or cancel it first")

    def _save(self, job: Job) -> None:
        write_json(self.ws.jobs / f"{job.id}.json", dataclasses.asdict(job))

    def _args(self, job: Job) -> list[str]:
        if job.phase == "export":
            return [*EXPORT_CLI, *job.export_args]
        if (self.ws.root / job.run / "config.json").is_file():  # started before: continue it
            return [*TRAIN_CLI, "--out", job.run, "--resume", "--quiet"]
        return [*TRAIN_CLI, *job.train_args]

    def _launch(self, job: Job) -> None:
        args = self._args(job)
        self.ws.jobs.mkdir(parents=True, exist_ok=True)
        try:
            with open(self.ws.jobs / f"{job.id}.log", "a", encoding="utf-8") as log:
                log.write(f"$ python {' '.join(args)}\n")
                log.flush()
                popen = subprocess.Popen([self.python, *args], cwd=self.ws.root, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as err:  # no room for the log, no interpreter: the job cannot start
            job.state, job.finished = FAILED, time.time()
            job.message = f"could not start: {err.strerror or err}"
            self._save(job)
            return
        try:
            created = psutil.Process(popen.pid).create_time()
        except psutil.NoSuchProcess:
            created = None
        now = time.time()
        job.pid, job.pid_created = popen.pid, created
        job.state = TRAINING if job.phase == "train" else EXPORTING
        job.started = job.started or now
        job.phase_started, job.finished, job.message = now, None, ""
        self._rates.pop(job.id, None)
        self._procs[job.id] = _Process(popen.pid, created, popen)
        self._save(job)

    def _phase_ended(self, job: Job, code: int | None) -> None:
        """Settle a job whose process ended (``code`` None: not our child, or found ended at
        start-up): by what its folders hold, then by its exit code."""
        job.pid = job.pid_created = None
        now = time.time()
        if code in (0, None) and self._phase_done(job):
            if job.phase == "train" and job.export_args:
                job.phase, job.state, job.message = "export", QUEUED, ""
                job.queued_at = job.queued_at or now  # keeps its place: it runs next
            else:
                job.state, job.finished, job.message = DONE, now, ""
        elif job.cancel_requested:
            job.state, job.finished, job.message = CANCELLED, now, self._stopped_line("cancelled", job)
        elif code is not None and code > 0 and code != 130:
            job.state, job.finished, job.message = FAILED, now, self._error_line(job)
        else:
            how = (f"its process ended (signal {-code})" if code is not None and code < 0
                   else "its process ended" if code is not None else "its process is gone")
            job.state, job.finished, job.message = INTERRUPTED, now, self._stopped_line(how, job)
        job.cancel_requested = False
        self._save(job)

    def _phase_done(self, job: Job) -> bool:
        if job.phase == "export":
            manifest = self.ws.root / (job.engine or "") / "manifest.json"
            return manifest.is_file() and manifest.stat().st_mtime >= (job.phase_started or 0) - 1
        summary = read_json(self.ws.root / job.run / "summary.json")
        config = read_json(self.ws.root / job.run / "config.json") or {}
        steps = (config.get("train") or {}).get("steps")
        return summary is not None and steps is not None and summary.get("steps") == steps

    def _stopped_line(self, how: str, job: Job) -> str:
        if job.phase == "export":
            return f"{how} during the export; resume runs it again"
        from apla_train.checkpoint import list_checkpoints

        found = list_checkpoints(self.ws.root / job.run)
        where = f"the last checkpoint is step {found[-1][0]}" if found else "no checkpoint yet"
        return f"{how} during training; {where}: resume continues from there"

    def _error_line(self, job: Job) -> str:
        lines = [ln.strip() for ln in self.log_tail(job.id, 50).splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or ["the process failed without a message"])[-1]


def _line(p: dict[str, Any]) -> str:
    """One line of progress, e.g. "training: step 12 / 50, loss 0.4123, about 40 s left"."""
    state = p["state"]
    if state == TRAINING:
        if p["total"] and p["step"] >= p["total"]:
            return f"training: step {p['step']} / {p['total']} done; inverting the clip and sampling it"
        if not p["step"]:
            return f"training: step 0 / {p['total']}, starting (reading the clip, building the models)"
        text = f"training: step {p['step']} / {p['total']}"
        if p["loss"] is not None:
            text += f", loss {p['loss']:.4f}"
        if p["eta_s"] is not None:
            text += f", about {_duration(p['eta_s'])} left"
        return text
    if state == EXPORTING:
        return f"exporting the engine folder ({_duration(p['elapsed_s'] or 0)} so far)"
    if state == QUEUED:
        return "queued" + (" for its export" if p["phase"] == "export" else "")
    return f"{state}" + (f": {p['message']}" if p["message"] else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"


def find_running_pids(workspace: Path) -> list[int]:
    """The process ids of the jobs of ``workspace`` that still run (for whoever must stop
    them, by id)."""
    pids = []
    for path in sorted((workspace / "jobs").glob("*.json")):
        data = read_json(path) or {}
        if process_alive(data.get("pid"), data.get("pid_created")):
            pids.append(int(data["pid"]))
    return pids
