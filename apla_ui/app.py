"""The Gradio app: four tabs (Train, Jobs, Generate, Gallery) over a workspace.

The handlers are methods of ``App``, which holds what the whole server shares (the
workspace, the job queue, the opened pipelines): every browser tab and every reload sees
the same jobs. A user's mistake (a bad clip, a bad setting) comes back as one line in the
page (``views.error``) and writes nothing; the named API endpoints (``/train``,
``/generate``, ``/jobs``, ...) are what ``gradio_client`` calls.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import gradio as gr

from apla_rt.errors import AplaError, InputError

from . import generate as gen
from . import training, views
from .jobs import ACTIVE, JobQueue
from .workspace import Workspace, check_name, name_from

TINY_LABEL = "tiny preset (CPU, random init)"
SD_LABEL = "Stable Diffusion 1.x (folder or Hub id, offline)"
CSS = """
.apla-progress progress { width: 22em; vertical-align: middle; }
.result-video video { image-rendering: pixelated; }
footer { display: none !important; }
"""


class App:
    """What the server shares between sessions, and the page's handlers."""

    def __init__(self, workspace: Workspace, queue: JobQueue, pipes: gen.Pipelines,
                 max_upload_bytes: int):
        self.ws = workspace
        self.queue = queue
        self.pipes = pipes
        self.max_upload_bytes = max_upload_bytes

    def warm_up(self) -> None:
        """Import the training code in the background, so the first press of "Start training"
        does not wait for torch."""
        def load() -> None:
            try:
                import apla_train.run  # noqa: F401
            except ImportError:
                pass  # the Train tab says so when used
        threading.Thread(target=load, name="apla-ui-warm-up", daemon=True).start()

    # -- Train ------------------------------------------------------------------------------

    def clip_of(self, upload: str | None, example: str | None) -> Path:
        if upload:
            return Path(upload)
        if example:
            for path in self.ws.examples():
                if path.name == example:
                    return path
        raise InputError("no clip: upload a video (mp4, mov, mkv, webm, gif) or pick an example")

    def check_clip(self, upload: str | None, example: str | None) -> tuple[str, str | None, str]:
        """Message, preview and a default name for the chosen clip."""
        if not upload and not example:
            return "", None, ""
        try:
            clip = self.clip_of(upload, example)
            training.check_clip_file(clip, self.max_upload_bytes)
        except AplaError as err:
            return views.error(str(err)), None, ""
        return f"Clip {clip.name} can be read.", str(clip), self._free_name(name_from(clip.name))

    def _free_name(self, base: str) -> str:
        used = self.queue.names_in_use()
        for i in range(1, 1000):
            name = base if i == 1 else f"{base}-{i}"
            if name not in used and self.ws.name_taken(name) is None:
                return name
        raise InputError(f"no free name from {base!r}; give a name")

    def train(self, upload: str | None, example: str | None, prompt: str, name: str, model: str,
              pretrained: str, variant: str, steps: float | None, frames: float | None,
              size: float | None, vgt: str | None, advanced: str, export: bool,
              cache_graphs: bool) -> tuple[str, str]:
        """Check everything, store the clip, queue the job: (message, job id or "")."""
        try:
            clip = self.clip_of(upload, example)
            name = check_name(name) if (name or "").strip() else self._free_name(name_from(clip.name))
            self._check_name_free(name)
            form = training.TrainForm(
                clip=clip, prompt=prompt or "", model=training.TINY if model != SD_LABEL else "sd",
                pretrained=pretrained or "", variant=variant or "",
                settings={"steps": steps, "frames": frames, "size": size, "vgt": vgt or None},
                advanced=advanced or "", export=bool(export), cache_graphs=bool(cache_graphs))
            try:
                _cfg, total = training.check(form, self.max_upload_bytes)
            except ImportError as err:
                raise InputError(f"training needs the training packages ({err.name} is missing): "
                                 'pip install -e ".[train,ui]"') from err
            run, engine = f"runs/{name}", f"engines/{name}"
            video = f"videos/clips/{name}{clip.suffix.lower()}"
            export_args = (["--run", run, "--out", engine] + ([] if cache_graphs else ["--no-cache-graphs"])
                           if export else [])
            shown = {"clip": clip.name, "prompt": form.prompt.strip(), "model": form.model_args()[-1],
                     "overrides": form.overrides(), "export": bool(export)}

            def store() -> None:
                self._check_name_free(name)
                self.ws.store_clip(clip, name)

            job = self.queue.submit("train", name, run, engine if export else None,
                                    form.train_args(video, run), export_args, total, shown, store)
        except AplaError as err:
            return views.error(str(err)), ""
        then = f", then exports {engine}" if export else ""
        return f"Job {job.id} queued: trains {run} ({total} steps){then}.", job.id

    def _check_name_free(self, name: str) -> None:
        taken = self.ws.name_taken(name)
        if taken is None and name in self.queue.names_in_use():
            taken = "a training job"
        if taken:
            raise InputError(f"the name {name!r} is taken ({taken}); give another name")

    # -- Jobs -------------------------------------------------------------------------------

    def job_list(self) -> list[dict[str, Any]]:
        """Every job's record with its progress (the ``/jobs`` endpoint)."""
        out = []
        for job in self.queue.jobs():
            record = {**job.__dict__, "progress": self.queue.progress(job)}
            out.append(record)
        return out

    def refresh(self, known_jobs: list[str] | None, known_folders: list[list[str]] | None) -> tuple[Any, ...]:
        """The Train tab's progress and the Jobs table; the lists of jobs, models and runs
        when they changed (a finished job's engine folder appears in Generate by itself)."""
        jobs = self.queue.jobs()
        shown = views.showing(jobs)
        progress = {j.id: self.queue.progress(j) for j in jobs if j.state in ACTIVE or j is shown}
        panel = views.progress_html(progress.get(shown.id) if shown else None, views.waiting(jobs))
        ids = [j.id for j in jobs]
        choices = gr.skip() if ids == (known_jobs or []) else gr.update(choices=views.job_choices(jobs))
        folders = [self.ws.engine_names(), self.ws.run_names()]
        if folders == known_folders:
            lists: tuple[Any, ...] = (gr.skip(),) * 3
        else:
            lists = (gr.update(choices=folders[0]), gr.update(choices=folders[0]), gr.update(choices=folders[1]))
        return (panel, views.job_rows(jobs, progress), choices, ids, *lists, folders)

    def cancel(self, job_id: str | None) -> str:
        try:
            if not job_id:
                shown = views.showing(self.queue.jobs())
                if shown is None or shown.state not in ACTIVE:
                    raise InputError("no job is queued or running")
                job_id = shown.id
            job = self.queue.cancel(job_id)
        except AplaError as err:
            return views.error(str(err))
        return f"Job {job.id}: {job.message or job.state}."

    def resume(self, job_id: str | None) -> str:
        try:
            if not job_id:
                raise InputError("pick a job to resume")
            job = self.queue.resume(job_id)
        except AplaError as err:
            return views.error(str(err))
        return f"Job {job.id} queued again ({'continues training' if job.phase == 'train' else 'exports again'})."

    def log(self, job_id: str | None) -> str:
        return self.queue.log_tail(job_id) if job_id else ""

    def export_run(self, run: str | None, engine: str, replace: bool, cache_graphs: bool) -> str:
        """Queue an export of ``runs/RUN`` to ``engines/ENGINE`` (default: the run's name)."""
        try:
            if not run:
                raise InputError("pick a run to export")
            run = check_name(run, "run")
            engine = check_name(engine, "engine name") if (engine or "").strip() else run
            if not (self.ws.runs / run / "config.json").is_file():
                raise InputError(f"runs/{run} is not a run folder (no config.json)")
            exists = (self.ws.engines / engine).exists()
            if exists and not replace:
                raise InputError(f"engines/{engine} exists; tick 'replace' to export over it, "
                                 "or give another engine name")
            args = (["--run", f"runs/{run}", "--out", f"engines/{engine}"]
                    + (["--force"] if exists else []) + ([] if cache_graphs else ["--no-cache-graphs"]))
            job = self.queue.submit("export", engine, f"runs/{run}", f"engines/{engine}", [], args, None,
                                    {"run": run, "replace": bool(exists)})
        except AplaError as err:
            return views.error(str(err))
        return f"Job {job.id} queued: exports runs/{run} to engines/{engine}."

    # -- Generate ---------------------------------------------------------------------------

    def model_info(self, engine: str | None, backend: str, precision: str, use_vgt: bool) -> str:
        if not engine:
            return "Pick a model: an engine folder of the workspace (`engines/NAME`)."
        try:
            engine = check_name(engine, "model")
            pipe = self.pipes.get(engine, gen.open_options(backend, precision, use_vgt))
            return views.model_info(pipe.summary(), engine)
        except AplaError as err:
            return views.error(str(err))

    def model_defaults(self, engine: str | None, backend: str, precision: str,
                       use_vgt: bool) -> tuple[Any, Any, Any]:
        """The model's own steps, guidance and frame count, to start the fields from."""
        try:
            summary = self.pipes.get(check_name(engine or "", "model"),
                                     gen.open_options(backend, precision, use_vgt)).summary()
        except AplaError:
            return gr.skip(), gr.skip(), gr.skip()
        return summary.get("steps"), summary.get("guidance"), (summary.get("frames") or {}).get("opt")

    def generate(self, engine: str | None, prompts: str, seeds: str, negative_prompt: str,
                 scheduler: str | None, steps: float | None, guidance: float | None,
                 guidance_interval: str, cache_interval: float | str | None, cache_schedule: str,
                 frames: float | None, from_noise: bool, use_vgt: bool, backend: str,
                 precision: str, progress: gr.Progress = gr.Progress()) -> tuple[str, Any]:
        """Generate every prompt with every seed: (message, the result's record or None)."""
        try:
            if not engine:
                raise InputError("pick a model (an engine folder of the workspace)")
            engine = check_name(engine, "model")
            settings = gen.sampling_settings(
                steps=steps, guidance=guidance, scheduler=scheduler, guidance_interval=guidance_interval,
                cache_interval=cache_interval, cache_schedule=cache_schedule, frames=frames,
                negative_prompt=negative_prompt, from_noise=from_noise)
            record = gen.generate(self.ws, self.pipes, engine, gen.parse_prompts(prompts),
                                  gen.parse_seeds(seeds), settings,
                                  gen.open_options(backend, precision, use_vgt),
                                  progress=lambda f, what: progress(f, desc=what))
        except AplaError as err:
            return views.error(str(err)), None
        n = len(record["videos"])
        return (f"{n} video{'s' if n != 1 else ''} in {record['seconds']:.1f} s, "
                f"saved as {record['id']}."), record

    def results(self, engine: str | None) -> list[dict[str, Any]]:
        """The earlier generations on a model, newest first (the ``/results`` endpoint)."""
        if not engine:
            return []
        check_name(engine, "model")
        return self.ws.results(engine)


def _show_result(record: dict[str, Any] | None, key: str) -> None:
    """One generation in the page: its settings and timings, then its videos side by side."""
    if not record:
        return
    gr.Markdown(views.result_header(record))
    folder = Path(record["folder"])
    with gr.Row(equal_height=True):
        for i, video in enumerate(record.get("videos") or []):
            with gr.Column(min_width=200):
                gr.Video(value=str(folder / video["file"]), label=video_label(video), loop=True,
                         autoplay=False, buttons=["download"], height=256, interactive=False,
                         elem_classes=["result-video"], key=f"{key}-{i}")
                gr.Markdown(views.video_caption(video))
    if (folder / "result.json").is_file():
        gr.DownloadButton("result.json (settings, timings)", value=str(folder / "result.json"),
                          size="sm", key=f"{key}-json")


def video_label(video: dict[str, Any]) -> str:
    return f"{video.get('prompt', '')} · seed {video.get('seed')}"


def build(app: App) -> gr.Blocks:
    """The page."""
    choices = gen.runtime_choices()
    try:
        defaults = training.preset_defaults()
        vgt_kinds = training.vgt_choices()
    except ImportError:  # the runtime alone: the Train tab explains when used
        defaults, vgt_kinds = {"sd": {}, training.TINY: {}}, []
    tiny, sd = defaults[training.TINY], defaults["sd"]

    def hint(key: str) -> str:
        return f"the preset's: {tiny.get(key)} tiny, {sd.get(key)} SD"

    # uploads and served copies of videos live in Gradio's cache: files older than a day go
    with gr.Blocks(title="apla", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown("# apla: one video in, a text-to-video model out\n"
                    f"Workspace `{app.ws.given}`: `runs/`, `engines/`, `videos/`, `jobs/` "
                    "(the `apla-train`, `apla-export` and `apla-rt` commands use the same folders).")
        known_jobs = gr.State([])
        known_folders = gr.State([])
        with gr.Tabs():
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label="Training clip (mp4, mov, mkv, webm, avi, gif)",
                                         elem_id="clip-upload")
                        example = gr.Dropdown([""] + [p.name for p in app.ws.examples()], value="",
                                              label="or an example clip", elem_id="clip-example",
                                              allow_custom_value=True)
                        clip_message = gr.Markdown(elem_id="clip-message")
                        preview = gr.Video(label="clip", interactive=False, height=200, elem_id="clip-preview")
                    with gr.Column():
                        prompt = gr.Textbox(label="Prompt describing the clip", placeholder="a man is skiing",
                                            elem_id="train-prompt")
                        name = gr.Textbox(label="Name (runs/NAME, engines/NAME)", elem_id="train-name",
                                          placeholder="from the clip's file name")
                        model = gr.Radio([TINY_LABEL, SD_LABEL], value=TINY_LABEL, label="Model")
                        with gr.Row():
                            pretrained = gr.Textbox(label="SD 1.x folder or Hub id (ORG/NAME)", scale=3)
                            variant = gr.Textbox(label="weights variant (e.g. fp16)", scale=1)
                        with gr.Row():
                            steps = gr.Number(label="Training steps", value=tiny.get("steps"), info=hint("steps"),
                                              precision=0,
                                              elem_id="train-steps")
                            frames = gr.Number(label="Frames", value=tiny.get("frames"), info=hint("frames"),
                                               precision=0,
                                               elem_id="train-frames")
                            size = gr.Number(label="Size (px)", value=tiny.get("size"), info=hint("size"), precision=0,
                                             elem_id="train-size")
                            vgt = gr.Dropdown(vgt_kinds, value=tiny.get("vgt"), label="VGT variant",
                                              info="none = Tune-A-Video")
                        with gr.Accordion("Advanced", open=False):
                            advanced = gr.Textbox(label="Config overrides, one section.key=value per line "
                                                        "(apla-train --set)", lines=3, elem_id="train-advanced",
                                                  placeholder="train.checkpoint_every=25\nloss.l_adv=0")
                            export = gr.Checkbox(True, label="Export the engine folder when training ends")
                            cache_graphs = gr.Checkbox(True, label="with the DeepCache graphs (cache interval > 1)",
                                                       elem_id="train-cache-graphs")
                        start = gr.Button("Start training", variant="primary", elem_id="start-training")
                        train_message = gr.Markdown(elem_id="train-message")
                        job_id = gr.Textbox(visible=False)
                gr.Markdown("### Current job")
                with gr.Row():
                    progress = gr.HTML(views.progress_html(None, []), elem_id="job-progress")
                    cancel_current = gr.Button("Cancel this job", size="sm", variant="stop", scale=0,
                                               min_width=160)
                cancel_message = gr.Markdown()
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs"):
                table = gr.Dataframe(headers=views.JOB_COLUMNS, interactive=False, wrap=True,
                                     elem_id="jobs-table", label="Jobs (newest first)")
                with gr.Row():
                    pick_job = gr.Dropdown([], value=None, label="Job", scale=2, elem_id="pick-job",
                                           allow_custom_value=True)
                    cancel_btn = gr.Button("Cancel", variant="stop")
                    resume_btn = gr.Button("Resume", elem_id="resume-job")
                job_message = gr.Markdown(elem_id="job-message")
                log = gr.Textbox(label="Log (last lines)", lines=8, max_lines=8, interactive=False, elem_id="job-log")
                gr.Markdown("### Export a run\nAny run of the workspace, also one made with `apla-train`.")
                with gr.Row():
                    export_run = gr.Dropdown(app.ws.run_names(), value=None, label="Run", elem_id="export-run",
                                             allow_custom_value=True)
                    export_name = gr.Textbox(label="Engine name (empty: the run's)")
                    replace = gr.Checkbox(False, label="replace the engine folder if it exists")
                    export_cache = gr.Checkbox(True, label="with the DeepCache graphs")
                    export_btn = gr.Button("Export")
                export_message = gr.Markdown()
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    engine = gr.Dropdown(app.ws.engine_names(), value=None, label="Model (engines/NAME)", scale=3,
                                         elem_id="gen-model", allow_custom_value=True)
                    reload_models = gr.Button("Refresh", size="sm", scale=0)
                info = gr.Markdown(elem_id="model-info")
                with gr.Row():
                    with gr.Column(scale=2):
                        prompts = gr.Textbox(label="Prompts, one per line", lines=3, elem_id="gen-prompts")
                        seeds = gr.Textbox("0", label="Seeds (every prompt with every seed)", elem_id="gen-seeds")
                        negative = gr.Textbox(label="Negative prompt")
                    with gr.Column(scale=3):
                        with gr.Row():
                            scheduler = gr.Dropdown(["", *choices["scheduler"]], value="",
                                                    label="Solver", info="empty: the default")
                            gen_steps = gr.Number(label="Steps", info="from the model's run", precision=0,
                                                  elem_id="gen-steps")
                            guidance = gr.Number(label="Guidance", info="from the model's run")
                            interval = gr.Textbox(label="Guidance interval LO:HI", info="empty: every step")
                        with gr.Row():
                            cache_interval = gr.Textbox(label="Cache interval",
                                                        info="DeepCache; 1 = off; empty: the default")
                            cache_schedule = gr.Dropdown(["", *choices["cache_schedule"]], value="",
                                                         label="Cache schedule", info="empty: uniform")
                            gen_frames = gr.Number(label="Frames", info="the start latent's", precision=0)
                        with gr.Row():
                            with gr.Column(min_width=180):
                                use_vgt = gr.Checkbox(True, label="VGT perturbation")
                                from_noise = gr.Checkbox(False, label="from noise (not the inverted clip)")
                            backend = gr.Dropdown(list(choices["backend"]), value="auto", label="Backend")
                            precision = gr.Dropdown(list(choices["precision"]), value="auto", label="Precision")
                go = gr.Button("Generate", variant="primary", elem_id="generate-button")
                gen_message = gr.Markdown(elem_id="gen-message")
                result = gr.JSON(visible=False)

                @gr.render(inputs=[result])
                def show_new(record: dict[str, Any] | None) -> None:
                    _show_result(record, "new")
            with gr.Tab("Gallery", id="gallery", elem_id="tab-gallery"):
                with gr.Row():
                    gallery_model = gr.Dropdown(app.ws.engine_names(), value=None, label="Model", scale=3,
                                                elem_id="gallery-model", allow_custom_value=True)
                    gallery_reload = gr.Button("Refresh", size="sm", scale=0)
                gallery_tick = gr.State(0)

                @gr.render(inputs=[gallery_model, gallery_tick])
                def show_gallery(model_name: str | None, _tick: int) -> None:
                    records = app.results(model_name) if model_name else []
                    if model_name and not records:
                        gr.Markdown(f"No videos generated with engines/{model_name} yet.")
                    for i, record in enumerate(records):
                        _show_result(record, f"g{i}")

        # -- events ------------------------------------------------------------------------
        private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
        upload.change(lambda f: app.check_clip(f, None), [upload], [clip_message, preview, name], **private)
        example.change(lambda e: (None, *app.check_clip(None, e)) if e else (gr.skip(),) * 4,
                       [example], [upload, clip_message, preview, name], **private)
        def preset(choice: str) -> tuple[Any, ...]:
            values = defaults["sd" if choice == SD_LABEL else training.TINY]
            return tuple(gr.update(value=values.get(k)) for k in ("steps", "frames", "size", "vgt"))

        model.change(preset, [model], [steps, frames, size, vgt], **private)
        start.click(app.train, [upload, example, prompt, name, model, pretrained, variant, steps, frames,
                                size, vgt, advanced, export, cache_graphs], [train_message, job_id],
                    api_name="train")
        timer = gr.Timer(1.0)
        refresh_inputs = [known_jobs, known_folders]
        refresh_outputs = [progress, table, pick_job, known_jobs, engine, gallery_model, export_run,
                           known_folders]
        timer.tick(app.refresh, refresh_inputs, refresh_outputs, **private)
        cancel_current.click(lambda: app.cancel(None), None, [cancel_message], api_visibility="private")
        cancel_btn.click(app.cancel, [pick_job], [job_message], api_name="cancel")
        resume_btn.click(app.resume, [pick_job], [job_message], api_name="resume")
        pick_job.change(app.log, [pick_job], [log], api_name="log")
        export_btn.click(app.export_run, [export_run, export_name, replace, export_cache], [export_message],
                         api_name="export")
        gr.api(app.job_list, api_name="jobs")
        gr.api(app.results, api_name="results")

        def models() -> tuple[Any, Any, Any]:
            engines = app.ws.engine_names()
            return (gr.update(choices=engines), gr.update(choices=engines),
                    gr.update(choices=app.ws.run_names()))

        model_lists = [engine, gallery_model, export_run]
        reload_models.click(models, None, model_lists, **private)
        gallery_reload.click(lambda n: (*models(), n + 1), [gallery_tick], [*model_lists, gallery_tick],
                             **private)
        demo.load(app.refresh, refresh_inputs, refresh_outputs, **private)
        open_inputs = [engine, backend, precision, use_vgt]
        engine.change(app.model_info, open_inputs, [info], api_name="model_info", concurrency_id="pipes")
        engine.change(app.model_defaults, open_inputs, [gen_steps, guidance, gen_frames],
                      concurrency_id="pipes", **private)
        go.click(app.generate, [engine, prompts, seeds, negative, scheduler, gen_steps, guidance, interval,
                                cache_interval, cache_schedule, gen_frames, from_noise, use_vgt, backend,
                                precision], [gen_message, result], api_name="generate",
                 concurrency_limit=1, concurrency_id="pipes")
        result.change(lambda n: n + 1, [gallery_tick], [gallery_tick], **private)
    return demo


def launch_options() -> dict[str, Any]:
    """The look of the page: system fonts only (nothing is fetched from the internet)."""
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return {"theme": theme, "css": CSS}
