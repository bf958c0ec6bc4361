"""apla-ui through Gradio's Python client (the endpoints the page calls): train the tiny preset
on the shipped clip with a handful of steps, export, generate two prompts and check the
videos and what was recorded; bad uploads and bad settings answer one line and change
nothing; jobs queue one at a time, never share a folder, survive a restart of apla-ui and
resume from their last checkpoint after being killed. The servers listen on 127.0.0.1 and
are stopped by process id (tests/ui_helpers.py)."""

from __future__ import annotations

import json
import os
import signal

import av
import numpy as np
import pytest
from click.testing import CliRunner
from gradio_client import handle_file
from ui_helpers import SD_LABEL, TINY_LABEL, TINY_TRAIN, UIServer, job, snapshot, wait_for, wait_job

from apla_rt.media.video import read_video

pytestmark = pytest.mark.slow
SKI_PROMPTS = ["a man is skiing", "a panda is skiing"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("ui")
    srv = UIServer(root / "workspace", root / "server.log")
    try:
        yield srv.start()
    finally:
        srv.close()


def train(client, clip, name="", **form):
    """``/train`` with the tiny preset; ``form`` overrides TINY_TRAIN's fields."""
    fields = {"upload": handle_file(str(clip)) if clip else None, "example": "", "prompt": "a man is skiing",
              "name": name, "model": TINY_LABEL, "pretrained": "", "variant": "", "vgt": None,
              "export": True, "cache_graphs": False, **TINY_TRAIN}
    fields.update(form)
    return client.predict(**fields, api_name="/train")


def generate(client, engine, **form):
    fields = {"engine": engine, "prompts": "\n".join(SKI_PROMPTS), "seeds": "3", "negative_prompt": "",
              "scheduler": "", "steps": None, "guidance": None, "guidance_interval": "",
              "cache_interval": "1", "cache_schedule": "uniform", "frames": None, "from_noise": False,
              "use_vgt": True, "backend": "ort-cpu", "precision": "fp32"}
    fields.update(form)
    return client.predict(**fields, api_name="/generate")


@pytest.fixture(scope="module")
def ski(server, skiing):
    """The tiny preset trained and exported from the page's endpoint: (job record, clip)."""
    client = server.client()
    message, job_id = train(client, skiing, name="ski")
    assert job_id and "queued" in message, message
    return wait_job(client, job_id), skiing


def test_train_then_export_from_the_page(server, ski):
    record, clip = ski
    assert record["state"] == "done", record
    ws = server.workspace
    run, engine = ws / "runs" / "ski", ws / "engines" / "ski"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == TINY_TRAIN["steps"] and summary["frames"] == 4 and summary["size"] == 32
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["preset"] == "tiny" and config["sample"]["steps"] == 2
    assert config["video"] == "videos/clips/ski.mp4"  # relative: the workspace is the CLIs' folder
    assert (ws / config["video"]).read_bytes() == clip.read_bytes()
    assert (engine / "manifest.json").is_file()
    assert not list(engine.glob("unet_shallow*"))  # exported without the DeepCache graphs, as asked
    on_disk = json.loads((ws / "jobs" / f"{record['id']}.json").read_text())
    assert on_disk["state"] == "done" and on_disk["pid"] is None
    assert record["progress"]["step"] == TINY_TRAIN["steps"]


def test_generate_two_prompts_records_the_videos_and_settings(server, ski):
    client = server.client()
    info = client.predict("ski", "ort-cpu", "fp32", True, api_name="/model_info")
    assert "a man is skiing" in info and "32 x 32 px" in info
    message, record = generate(client, "ski", scheduler="unipc", steps=2, guidance=4.5,
                               guidance_interval="0:0.5")
    assert record is not None, message
    assert "2 videos" in message
    folder = server.workspace / "videos" / "generated" / "ski" / "0001"
    assert record["folder"] == str(folder)
    assert record["settings"] == {"steps": 2, "guidance": 4.5, "scheduler": "unipc",
                                  "guidance_interval": [0.0, 0.5], "cache_interval": 1,
                                  "cache_schedule": "uniform", "frames": None, "negative_prompt": "",
                                  "from_noise": False}
    assert record["seconds"] > 0 and record["stages"]["unet"] > 0
    frames = []
    for video, prompt in zip(record["videos"], SKI_PROMPTS):
        assert (video["prompt"], video["seed"], video["scheduler"], video["steps"], video["guidance"],
                video["guidance_interval"]) == (prompt, 3, "unipc", 2, 4.5, [0.0, 0.5])
        assert (video["frames"], video["width"], video["height"]) == (4, 32, 32)
        path = folder / video["file"]
        clip = read_video(path)
        assert clip.shape == (4, 32, 32, 3)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            duration = float(stream.duration * stream.time_base)
        assert duration == pytest.approx(4 / video["fps"], abs=1.5 / video["fps"])
        assert video["duration_s"] == pytest.approx(4 / video["fps"])
        frames.append(clip)
    assert not np.array_equal(frames[0], frames[1])  # the prompt reached the model
    saved = json.loads((folder / "result.json").read_text())
    assert saved == {k: v for k, v in record.items() if k != "folder"}
    (listed,) = client.predict("ski", api_name="/results")
    assert listed["id"] == "ski/0001" and listed["videos"] == record["videos"]


def test_bad_uploads_and_settings_answer_one_line_and_change_nothing(server, ski, tmp_path):
    client = server.client()
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video\n")
    too_big = tmp_path / "big.mp4"
    too_big.write_bytes(os.urandom(int(1.5 * 2**20)))  # the test server takes 1 MiB
    wrong_kind = tmp_path / "clip.txt"
    wrong_kind.write_text("text")
    _, clip = ski
    before = snapshot(server.workspace)
    train_cases = [
        ({"clip": not_video}, "notes.mp4 is not a readable video"),
        ({"clip": too_big}, "more than the 1 MiB"),
        ({"clip": wrong_kind}, "clip.txt is not a video file"),
        ({"clip": None}, "no clip"),
        ({"clip": clip, "frames": 60}, "n_frames=60 need 119"),  # too short for 60 frames at stride 2
        ({"clip": clip, "size": 30}, "data.size 30 must be a multiple of"),
        ({"clip": clip, "steps": 0}, "train.steps must be at least 1"),
        ({"clip": clip, "advanced": "train.lr=-1"}, "train.lr must be positive"),
        ({"clip": clip, "advanced": "train.no_such_key=1"}, "no_such_key"),
        ({"clip": clip, "advanced": "steps 10"}, "--set expects key=value"),
        ({"clip": clip, "prompt": "  "}, "the prompt is empty"),
        ({"clip": clip, "name": "ski"}, "the name 'ski' is taken"),
        ({"clip": clip, "name": "../up"}, "must be 1-64 letters"),
        ({"clip": clip, "model": SD_LABEL, "pretrained": str(tmp_path / "no-such-sd")},
         "is not a folder, nor a Hugging Face repo id"),
        ({"clip": clip, "model": SD_LABEL, "pretrained": "nobody/no-such-model"},
         "HF_HUB_OFFLINE is set"),  # a Hub id is looked up in the cache only, never downloaded
    ]
    for case, expected in train_cases:
        form = dict(case)
        message, job_id = train(client, form.pop("clip"), **form)
        assert message.startswith("**Error:**") and expected in message, (case, message)
        assert job_id == "" and "\n" not in message and "Traceback" not in message
    generate_cases = [
        ({"steps": 0}, "--steps must be"),
        ({"guidance_interval": "0.8:0.2"}, "--guidance-interval must be LO:HI"),
        ({"seeds": "one"}, "seeds must be whole numbers"),
        ({"prompts": " \n"}, "give at least one prompt"),
        ({"cache_interval": "2"}, "cache"),  # exported without the DeepCache graphs
        ({"engine": "no-such-model"}, "engines/no-such-model is not an engine folder"),
        ({"engine": "../runs"}, "must be 1-64 letters"),
    ]
    for case, expected in generate_cases:
        message, record = generate(client, case.pop("engine", "ski"), **case)
        assert record is None and message.startswith("**Error:**") and expected in message, (case, message)
    assert snapshot(server.workspace) == before


def test_jobs_queue_never_share_a_folder_and_resume_after_a_kill_and_a_restart(server, ski, skiing):
    client = server.client()
    message, job_id = train(client, skiing, name="killed", steps=8, export=False,
                            advanced="train.checkpoint_every=2\nsample.steps=2\nsample.inversion_steps=2")
    assert job_id, message
    # a second job waits its turn, visibly; a job on the training's folders is refused
    queued = client.predict("ski", "ski-copy", False, False, api_name="/export")
    assert "queued" in queued, queued
    waiting = [j for j in client.predict(api_name="/jobs") if j["name"] == "ski-copy"][0]
    assert waiting["state"] == "queued"
    assert "Job" in client.predict(waiting["id"], api_name="/cancel")
    assert job(client, waiting["id"])["state"] == "cancelled"
    refused = client.predict("killed", "", False, False, api_name="/export")
    assert refused.startswith("**Error:**") and "runs/killed" in refused, refused

    run = server.workspace / "runs" / "killed"
    wait_for("the first checkpoint", lambda: list((run / "checkpoints").glob("step-*")), 300, 0.1)
    pid = json.loads((server.workspace / "jobs" / f"{job_id}.json").read_text())["pid"]
    os.killpg(pid, signal.SIGSTOP)  # held where it is while apla-ui restarts
    try:
        jobs = [(j["id"], j["state"]) for j in client.predict(api_name="/jobs")]
        results = client.predict("ski", api_name="/results")
        server.stop()
        server.start()
        client = server.client()
        # every earlier job and video is listed again, and the running job is taken up
        assert [(j["id"], j["state"]) for j in client.predict(api_name="/jobs")] == jobs
        assert client.predict("ski", api_name="/results") == results
        record = job(client, job_id)
        assert record["state"] == "training" and record["pid"] == pid, record
    finally:
        os.killpg(pid, signal.SIGKILL)
    record = wait_for("the kill to be seen", lambda: (lambda j: j if j["state"] == "interrupted" else None)(
        job(client, job_id)), 60)
    assert "resume continues from there" in record["message"], record
    assert not (run / "summary.json").exists()
    assert "queued again" in client.predict(job_id, api_name="/resume")
    record = wait_job(client, job_id)
    assert record["state"] == "done" and record["resumes"] == 1, record
    log = client.predict(job_id, api_name="/log")
    assert "--resume" in log and "resumed from checkpoints/step-" in log, log
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # each step once: the killed run's extra lines were cut
    assert json.loads((run / "summary.json").read_text())["steps"] == 8


def test_cancel_a_running_export_keeps_nothing(server, ski):
    client = server.client()
    message = client.predict("ski", "ski-cancelled", False, False, api_name="/export")
    job_id = message.split()[1]
    wait_for("the export to start", lambda: job(client, job_id)["state"] == "exporting", 120, 0.5)
    assert "cancelling" in client.predict(job_id, api_name="/cancel")
    record = wait_job(client, job_id, timeout=60)
    assert record["state"] == "cancelled", record
    engines = server.workspace / "engines"
    assert sorted(p.name for p in engines.iterdir() if not p.name.startswith(".")) == ["ski"]
    assert not [p for p in engines.iterdir() if p.name.endswith(".partial")]


def test_public_host_needs_auth(tmp_path):
    from apla_ui.cli import is_loopback, main

    # documentation addresses (RFC 5737, RFC 3849): no interface here has them, so even a broken
    # refusal could not listen anywhere
    for args, expected in ((["--host", "192.0.2.7"], "--host 192.0.2.7 would open the page beyond this machine"),
                           (["--host", "192.0.2.8", "--auth", "admin"], "--auth must be USER:PASSWORD"),
                           (["--host", "2001:db8::7", "--auth", ":secret"], "--auth must be USER:PASSWORD")):
        result = CliRunner().invoke(main, ["--workspace", str(tmp_path / "ws"), *args])
        assert result.exit_code == 2 and result.output.strip().startswith(f"error: {expected}"), result.output
        assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "ws").exists()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.0.2.7") and not is_loopback("2001:db8::7") and not is_loopback("example.org")
