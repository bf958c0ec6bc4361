"""Without starting Ray: ``apla-rt serve --print-config`` writes a config that Serve's own
schema (``ray.serve.schema.ServeDeploySchema``) accepts and that carries the CLI's options;
the KubeRay manifest's ``serveConfigV2`` (docs/kuberay-rayservice.yaml) validates against the
same schema with token authentication on; and ``apla_rt.service.raycluster`` resolves addresses and
finds tokens where Ray does."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import require

require("ray.serve")
yaml = require("yaml")

from ray.serve.schema import ServeDeploySchema  # noqa: E402

from apla_rt.errors import AplaError  # noqa: E402
from apla_rt.service.raycluster import resolve_address, token_source  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _validate(config: dict) -> ServeDeploySchema:
    return ServeDeploySchema.model_validate(config)


def _print_config(fake_engine: Path, *args: str) -> dict:
    from click.testing import CliRunner

    from apla_rt.cli import main

    result = CliRunner().invoke(main, ["serve", "--engine-dir", str(fake_engine), "--print-config", *args])
    assert result.exit_code == 0, result.output
    return yaml.safe_load(result.stdout)


def test_print_config_is_serves_schema_with_the_cli_options(fake_engine):
    config = _print_config(fake_engine, "--replicas", "3", "--max-batch", "2", "--max-queue", "5",
                           "--num-gpus", "0.5", "--port", "8123", "--from-noise",
                           "--proxy-location", "HeadOnly")
    schema = _validate(config)
    app, = schema.applications
    assert app.import_path == "apla_rt.serve:build_app" and app.name == "apla" and app.route_prefix == "/"
    assert app.args == {"engine_dir": str(fake_engine.resolve()), "replicas": 3, "max_batch": 2,
                        "max_queue": 5, "num_gpus": 0.5, "from_noise": True}
    deployment, ingress = app.deployments
    assert deployment.name == "AplaServer" and deployment.num_replicas == 3
    assert ingress.name == "AplaIngress" and ingress.num_replicas == 1
    assert ingress.ray_actor_options.num_cpus == 0  # pinned to the head, holding no CPU
    assert ingress.ray_actor_options.resources == {"node:__internal_head__": 0.001}
    assert ingress.max_ongoing_requests >= 3 * 15 + 15  # every request the replicas can hold
    assert (deployment.ray_actor_options.num_cpus, deployment.ray_actor_options.num_gpus) == (1.0, 0.5)
    assert deployment.max_ongoing_requests == 2 + 5 + 8 and deployment.max_queued_requests == 3 * 15
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123}
    assert config["proxy_location"] == "HeadOnly"


def test_the_printed_deployment_is_what_build_app_applies(fake_engine):
    """``deployments`` in the file repeats ``build_app``'s options: the same numbers both ways."""
    from apla_rt.service.serve import ServeOptions, build_app, deployment_options, ingress_options

    options = ServeOptions(str(fake_engine), replicas=2, max_batch=3, max_queue=1, num_cpus=0.5)
    app = build_app({"engine_dir": str(fake_engine), "replicas": 2, "max_batch": 3, "max_queue": 1,
                     "num_cpus": 0.5})
    ingress = app._bound_deployment
    assert ingress.name == "AplaIngress"
    want = ingress_options(options)
    assert ingress._deployment_config.num_replicas == 1
    assert ingress._deployment_config.max_ongoing_requests == want["max_ongoing_requests"]
    assert ingress.ray_actor_options == want["ray_actor_options"]
    server = ingress.init_args[1]._bound_deployment  # the model deployment, bound as its argument
    assert server.name == "AplaServer"
    config = server._deployment_config
    want = deployment_options(options)
    assert config.num_replicas == want["num_replicas"] == 2
    assert config.max_ongoing_requests == want["max_ongoing_requests"]
    assert config.max_queued_requests == want["max_queued_requests"]
    assert server.ray_actor_options["num_cpus"] == 0.5


def test_the_kuberay_manifest_carries_a_valid_serve_config_and_token_auth():
    manifest = yaml.safe_load((ROOT / "docs" / "kuberay-rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"].startswith("ray.io/")
    spec = manifest["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    schema = _validate(config)
    app, = schema.applications
    assert app.import_path == "apla_rt.serve:build_app"
    from apla_rt.service.serve import ServeOptions, deployment_options, ingress_options, serve_config

    options = ServeOptions(**app.args).check()  # the args are build_app's
    assert [d.name for d in app.deployments] == ["AplaServer", "AplaIngress"]
    printed = serve_config(options, "127.0.0.1", 8000)["applications"][0]["deployments"]
    assert config["applications"][0]["deployments"] == printed  # what --print-config prints
    assert printed == [{"name": "AplaServer", **deployment_options(options)},
                       {"name": "AplaIngress", **ingress_options(options)}]
    cluster = spec["rayClusterConfig"]
    assert cluster["authOptions"]["mode"] == "token"


def test_addresses_resolve_as_documented():
    assert resolve_address(None, {}) is None
    assert resolve_address(None, {"RAY_ADDRESS": " "}) is None
    assert resolve_address(None, {"RAY_ADDRESS": "10.0.0.2:6379"}) == "10.0.0.2:6379"
    assert resolve_address("auto", {"RAY_ADDRESS": "10.0.0.2:6379"}) == "auto"  # the flag wins
    for bad in ("10.0.0.2", "host:port", ":6379", "host:70000"):
        with pytest.raises(AplaError, match="HOST:PORT or auto"):
            resolve_address(bad, {})


def test_tokens_are_found_where_ray_looks(tmp_path):
    home = tmp_path / "home"
    assert token_source({"HOME": str(home)}) is None
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("abc\n")
    assert token_source({"HOME": str(home)}) == "~/.ray/auth_token"
    named = tmp_path / "token"
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) is None  # named, missing
    named.write_text("xyz")
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(named)}) == f"RAY_AUTH_TOKEN_PATH={named}"
    assert token_source({"HOME": str(home), "RAY_AUTH_TOKEN": "t", "RAY_AUTH_TOKEN_PATH": str(named)}) == "RAY_AUTH_TOKEN"
