"""Config: the spec's defaults, --set parsing, validation naming the key, and precedence
defaults < preset < --config FILE < --set < first-class flags."""

from __future__ import annotations

import json

import pytest

from apla_rt.errors import ConfigError
from apla_rt.sampling.schedule import SchedulerConfig
from apla_train.cli import build_config
from apla_train.config import AplaConfig, from_dict, load_file, parse_override, tiny_preset


def test_defaults_are_the_spec_settings():
    cfg = AplaConfig()
    t, loss, d, v, s = cfg.train, cfg.loss, cfg.disc, cfg.vgt, cfg.sample
    # Tune-A-Video's reference settings (spec section 2)
    assert (cfg.data.n_frames, cfg.data.size, cfg.data.stride) == (24, 512, 2)
    assert (t.steps, t.lr, t.betas, t.weight_decay, t.grad_clip, t.seed) == (500, 3e-5, (0.9, 0.999), 1e-2, 1.0, 33)
    assert cfg.model.trainable == "tav" and cfg.model.temporal and cfg.model.preset == "sd"
    # Hyper-Loss and the adversarial term (spec section 4)
    assert t.vgt_lr == 1e-4
    assert (loss.l_mse, loss.l_l1, loss.l_per, loss.l_adv, loss.adv_start) == (1.0, 1.0, 0.1, 0.01, 50)
    assert (loss.per_t_max, loss.per_frames) == (500, 2)
    assert (d.lr, d.betas, d.spectral_norm) == (1e-4, (0.5, 0.999), True)
    # VGT (spec section 3)
    assert (v.kind, v.mask, v.patch) == ("hyper", "causal", 4)
    assert (v.dim, v.heads, v.spatial_layers, v.temporal_layers, v.mlp_ratio) == (256, 8, 2, 2, 4.0)
    assert v.max_frames >= 64 and not v.source
    # sampling (spec section 5) and the SD 1.x noise schedule
    assert (s.steps, s.guidance, s.inversion_steps) == (50, 12.5, 50)
    sched = SchedulerConfig()
    assert (sched.num_train_timesteps, sched.beta_start, sched.beta_end, sched.beta_schedule) == \
        (1000, 0.00085, 0.012, "scaled_linear")
    assert (sched.steps_offset, sched.set_alpha_to_one, sched.clip_sample, sched.timestep_spacing) == \
        (1, False, False, "leading")


def test_defaults_need_a_pretrained_folder_and_round_trip():
    with pytest.raises(ConfigError, match="--pretrained"):
        AplaConfig().validate()
    cfg = from_dict({"model": {"pretrained": "/sd"}}).validate()
    assert from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    tiny = from_dict(tiny_preset()).validate()
    assert tiny.model.preset == "tiny" and tiny.disc.hidden == (32, 64)


@pytest.mark.parametrize("item,expected", [
    ("train.lr=1e-4", {"train": {"lr": 1e-4}}),
    ("train.steps=7", {"train": {"steps": 7}}),
    ("vgt.source=true", {"vgt": {"source": True}}),
    ("model.pretrained=null", {"model": {"pretrained": None}}),
    ("disc.hidden=[8, 16]", {"disc": {"hidden": [8, 16]}}),
    ("vgt.kind=pure", {"vgt": {"kind": "pure"}}),  # not JSON: read as a string
    ("prompt=a man = skiing", {"prompt": "a man = skiing"}),  # split on the first '=' only
    (" loss.lpips_weights=/w/alex.pth", {"loss": {"lpips_weights": "/w/alex.pth"}}),
])
def test_parse_override(item, expected):
    assert parse_override(item) == expected


@pytest.mark.parametrize("item", ["train.lr", "train..lr=1", "=5", ".lr=1"])
def test_parse_override_rejects_malformed_items(item):
    with pytest.raises(ConfigError, match="--set"):
        parse_override(item)


def test_overrides_become_typed_fields():
    cfg = from_dict(parse_override("disc.hidden=[8, 16]") | parse_override("train.lr=1"))
    assert cfg.disc.hidden == (8, 16) and isinstance(cfg.train.lr, float) and cfg.train.lr == 1.0
    assert from_dict(parse_override("model.pretrained=null")).model.pretrained is None


@pytest.mark.parametrize("data,key", [
    ({"train": {"lrr": 1}}, "train.lrr"),
    ({"trian": {}}, "trian"),
    ({"vgt": {"dim": 64, "depth": 2}}, "vgt.depth"),
])
def test_unknown_keys_are_errors_naming_the_key(data, key):
    with pytest.raises(ConfigError, match=rf"unknown config key {key}\b") as info:
        from_dict(data)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("data,key,what", [
    ({"train": {"steps": "abc"}}, "train.steps", "integer"),
    ({"train": {"steps": 1.5}}, "train.steps", "integer"),
    ({"train": {"steps": True}}, "train.steps", "integer"),
    ({"train": {"lr": "fast"}}, "train.lr", "number"),
    ({"train": {"betas": [0.9]}}, "train.betas", "2 items"),
    ({"train": {"betas": 0.9}}, "train.betas", "list"),
    ({"vgt": {"kind": "big"}}, "vgt.kind", "one of"),
    ({"vgt": {"source": "yes"}}, "vgt.source", "true or false"),
    ({"model": {"pretrained": 3}}, "model.pretrained", "string"),
    ({"prompt": 5}, "prompt", "string"),
    ({"train": 5}, "train", "mapping"),
])
def test_wrong_types_are_errors_naming_the_key(data, key, what):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert key in str(info.value) and what in str(info.value)


@pytest.mark.parametrize("data,key", [
    ({"train": {"steps": 0}}, "train.steps"),
    ({"data": {"n_frames": -1}}, "data.n_frames"),
    ({"data": {"size": 0}}, "data.size"),
    ({"data": {"stride": 0}}, "data.stride"),
    ({"data": {"start": -1}}, "data.start"),
    ({"data": {"n_frames": 65}}, "vgt.max_frames"),
    ({"vgt": {"dim": 30, "heads": 8}}, "vgt.dim"),
    ({"loss": {"l_adv": -0.1}}, "loss.l_adv"),
    ({"train": {"lr": 0}}, "train.lr"),
])
def test_validation_names_the_field(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        from_dict({"model": {"pretrained": "/sd"}} | data).validate()


def test_precedence_defaults_preset_file_set_flags(tmp_path):
    cfg_file = tmp_path / "run.json"
    cfg_file.write_text(json.dumps({"train": {"steps": 11, "seed": 5}, "loss": {"adv_start": 3},
                                    "vgt": {"dim": 48}}))

    def build(model="tiny", config_file=str(cfg_file), overrides=("train.steps=12", "vgt.dim=40"),
              steps=13, pretrained=None):
        return build_config("v.mp4", "a man is skiing", model, pretrained, config_file, overrides,
                            {"train.steps": steps, "data.size": None})

    cfg = build()
    assert cfg.train.steps == 13  # flag beats --set
    assert cfg.vgt.dim == 40  # --set beats the file
    assert (cfg.train.seed, cfg.loss.adv_start) == (5, 3)  # the file beats the preset
    assert (cfg.model.trainable, cfg.vgt.heads, cfg.data.size) == ("all", 4, 64)  # the preset beats defaults
    assert cfg.loss.l_mse == 1.0  # set by nobody: the default
    assert (cfg.video, cfg.prompt) == ("v.mp4", "a man is skiing")
    assert build(steps=None).train.steps == 12
    assert build(steps=None, overrides=()).train.steps == 11
    assert build(steps=None, overrides=(), config_file=None).train.steps == 150  # tiny preset
    sd = build(model=None, steps=None, overrides=(), config_file=None, pretrained="/sd")
    assert (sd.train.steps, sd.model.preset, sd.model.pretrained, sd.model.trainable) == (500, "sd", "/sd", "tav")


def test_config_files(tmp_path):
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text("train:\n  steps: 9\nvgt:\n  kind: pure\n")
    assert load_file(yaml_file) == {"train": {"steps": 9}, "vgt": {"kind": "pure"}}
    cfg = build_config("v.mp4", "p", "tiny", None, str(yaml_file), (), {})
    assert (cfg.train.steps, cfg.vgt.kind) == (9, "pure")

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"bad\.json is not valid json: .*line 1"):
        load_file(bad)
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_file(listing)
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "nowhere.json")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  stepz: 9\n")
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        build_config("v.mp4", "p", "tiny", None, str(unknown), (), {})


def test_a_config_that_is_not_a_mapping_is_a_config_error():
    from apla_rt.errors import ConfigError
    from apla_train.config import from_dict

    for data in ([], "train", 3, None):
        with pytest.raises(ConfigError, match="must be a mapping"):
            from_dict(data)


# ---------------------------------------------------------------------------------------
# The run's own inversion and sample after training: by device unless set


def test_final_steps_follow_the_device_unless_set():
    from apla_train.config import CPU_FINAL_STEPS

    sample = AplaConfig().sample  # the spec's 50 + 50
    assert sample.final_steps == "auto"
    assert sample.final_step_counts("cuda") == (50, 50)
    assert sample.final_step_counts("cpu") == (CPU_FINAL_STEPS, CPU_FINAL_STEPS) and CPU_FINAL_STEPS < 50
    few = from_dict({"sample": {"steps": 4, "inversion_steps": 3}}).sample
    assert few.final_step_counts("cpu") == (3, 4)  # "auto" never adds steps
    every = from_dict({"sample": {"final_steps": "all"}}).sample
    assert every.final_step_counts("cpu") == every.final_step_counts("cuda") == (50, 50)
    capped = from_dict({"sample": {"final_steps": 20, "inversion_steps": 30, "steps": 8}}).sample
    assert capped.final_step_counts("cuda") == capped.final_step_counts("cpu") == (20, 8)
    tiny = from_dict(tiny_preset()).sample  # the CPU quickstart keeps its 25 + 25
    assert tiny.final_step_counts("cpu") == (25, 25)


@pytest.mark.parametrize("value, message", [
    (0, "sample.final_steps must be"), ("some", "sample.final_steps must be one of"),
    (2.5, "sample.final_steps must be one of"), (True, "sample.final_steps must be one of")])
def test_final_steps_must_be_auto_all_or_a_positive_count(value, message):
    data = {"model": {"preset": "tiny"}, "sample": {"final_steps": value}}
    with pytest.raises(ConfigError, match=message):
        from_dict(data).validate()
