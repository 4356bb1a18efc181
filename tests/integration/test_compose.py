"""The deployment files say only what the software can do.

``docker-compose.yml`` is checked against the Compose Specification schema
(``tests/data/compose-spec.json``); every ``gateway`` command it runs must
exist in the CLI; every host path it mounts must exist in the repository or
be key material that git keeps out; every ``GATEWAY_*`` variable it sets must
load as a real setting. The Dockerfile's health probe is run against a real
socket.
"""

from __future__ import annotations

import fnmatch
import http.server
import json
import os
import re
import shlex
import shutil
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from click.testing import CliRunner

from gateway.cli.main import cli
from gateway.settings import load_settings
from tests.packaging import build_wheel, wheel_files
from tests.pki import Authority

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SCHEMA_FILE = REPO / "tests" / "data" / "compose-spec.json"
NOT_SETTINGS = {"GATEWAY_HOME", "GATEWAY_PASSPHRASE", "GATEWAY_TOKEN"}
NODE_OF_SERVICE = {"tokyo": "jp", "islamabad": "pk"}


def interpolate(value: str) -> str:
    """Compose interpolation with an empty environment: defaults apply, ``$$`` is ``$``."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        default = match.group("default")
        if default is None:
            raise AssertionError(f"{value!r} needs a variable without a default")
        return default

    return re.sub(
        r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}", substitute, value
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(loaded)
    return dict(loaded)


def gateway_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Services that run the gateway image (their entrypoint ends in ``gateway``)."""
    found = {}
    for name, service in compose["services"].items():
        entrypoint = service.get("entrypoint") or []
        if service.get("image", "").startswith("ssw-gateway") and entrypoint:
            found[name] = service
    return found


def entrypoint_script(service: dict[str, Any]) -> str:
    entrypoint = service["entrypoint"]
    assert entrypoint[:2] == ["/bin/sh", "-c"], entrypoint
    assert entrypoint[3] == "gateway", "the command list must be passed to gateway as $@"
    return interpolate(entrypoint[2])


# ---------------------------------------------------------------- the schema


def test_compose_file_satisfies_the_compose_specification(
    compose: dict[str, Any], schema: dict[str, Any]
) -> None:
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(compose)
    ]
    assert problems == []


BAD_DOCUMENTS = [
    pytest.param({"services": {"a": {"image": "x", "imagee": "typo"}}}, id="unknown-service-key"),
    pytest.param({"servics": {}}, id="unknown-top-level-key"),
    pytest.param(
        {"services": {"a": {"image": "x", "depends_on": {"b": {"condition": "service_ready"}}}}},
        id="unknown-depends-on-condition",
    ),
    pytest.param(
        {"services": {"a": {"image": "x", "depends_on": {"b": {}}}}},
        id="depends-on-without-condition",
    ),
    pytest.param(
        {"services": {"a": {"image": "x", "volumes": [{"source": "./k", "target": "/k"}]}}},
        id="long-volume-without-type",
    ),
    pytest.param(
        {"services": {"a": {"image": "x", "volumes": [{"type": "bind", "bind": {"create": 1}}]}}},
        id="unknown-bind-option",
    ),
    pytest.param(
        {"services": {"a": {"image": "x", "healthcheck": {"test": 5}}}},
        id="healthcheck-test-number",
    ),
    pytest.param(
        {"services": {"a": {"image": "x", "command": {"serve": True}}}}, id="command-mapping"
    ),
    pytest.param({"secrets": {"s": {"path": "./x"}}}, id="secret-with-unknown-key"),
    pytest.param({"volumes": {"v": {"drivr": "local"}}}, id="volume-with-unknown-key"),
    pytest.param({"networks": {"n": {"internal": [True]}}}, id="network-internal-list"),
    pytest.param(
        {"services": {"a": {"image": "x", "environment": {"A": {"b": 1}}}}}, id="environment-nested"
    ),
]


@pytest.mark.parametrize("document", BAD_DOCUMENTS)
def test_schema_rejects_malformed_compose_documents(
    document: dict[str, Any], schema: dict[str, Any]
) -> None:
    assert not jsonschema.Draft7Validator(schema).is_valid(document)


# ------------------------------------------------------------- the services


def test_each_node_has_its_own_postgres_with_volume_and_healthcheck(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for node in ("tokyo", "islamabad"):
        db = services[f"{node}-db"]
        assert db["image"] == "postgres:15"
        assert db["healthcheck"]["test"][0] in ("CMD", "CMD-SHELL")
        assert any(str(v).startswith(f"{node}-db-data:") for v in db["volumes"])
        assert f"{node}-db-data" in compose["volumes"]
        assert "POSTGRES_PASSWORD" not in db["environment"], "the password comes from a secret file"
        assert db["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
        url = interpolate(services[node]["environment"]["GATEWAY_DATABASE_URL"])
        assert f"@{node}-db:" in url
        assert services[node]["depends_on"][f"{node}-db"]["condition"] == "service_healthy"
        assert (
            services[node]["depends_on"][f"{node}-migrate"]["condition"]
            == "service_completed_successfully"
        )
        assert services[node]["restart"] == "unless-stopped"
        # The container is healthy when the node is ready: /readyz on its local API.
        health = urlsplit(interpolate(services[node]["environment"]["SSW_HEALTH_URL"]))
        api_port = int(services[node]["environment"]["GATEWAY_SERVER_API_LISTEN"].rsplit(":", 1)[1])
        assert (health.hostname, health.port, health.path) == ("127.0.0.1", api_port, "/readyz")
        assert health.scheme == "https", "the local API serves TLS when the node has TLS settings"


def test_a_database_is_reachable_only_from_its_own_node(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for node, other in (("tokyo", "islamabad"), ("islamabad", "tokyo")):
        (db_network,) = services[f"{node}-db"]["networks"]
        assert compose["networks"][db_network]["internal"] is True
        assert db_network in services[node]["networks"]
        assert db_network not in services[other]["networks"]


def test_peer_urls_point_each_node_at_the_other(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert (
        interpolate(services["tokyo"]["environment"]["GATEWAY_SERVER_PEER_URL"])
        == "https://islamabad:8701"
    )
    assert (
        interpolate(services["islamabad"]["environment"]["GATEWAY_SERVER_PEER_URL"])
        == "https://tokyo:8701"
    )


def test_every_gateway_command_the_compose_file_runs_exists(compose: dict[str, Any]) -> None:
    services = gateway_services(compose)
    commands = {name: service["command"] for name, service in services.items()}
    assert {tuple(c[:1]) for c in commands.values()} >= {("serve",), ("init",), ("db",)}
    runner = CliRunner()
    for name, command in commands.items():
        result = runner.invoke(cli, [*command, "--help"], env={}, catch_exceptions=False)
        assert result.exit_code == 0, f"{name}: gateway {' '.join(command)}: {result.output}"
        assert "Usage:" in result.stdout


def test_entrypoint_reads_only_declared_secrets_and_execs_gateway(compose: dict[str, Any]) -> None:
    for name, service in gateway_services(compose).items():
        script = entrypoint_script(service)
        subprocess.run(["/bin/sh", "-n", "-c", script], check=True)
        assert script.rstrip().endswith('exec gateway "$@"')
        read = set(re.findall(r"cat /run/secrets/([a-z_]+)", script))
        declared = {secret["target"] for secret in service["secrets"]}
        assert read == declared, name
        for secret in service["secrets"]:
            assert secret["source"] in compose["secrets"], name


def test_no_secret_value_is_written_into_the_compose_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, raw in (service.get("environment") or {}).items():
            value = interpolate(str(raw))
            if any(word in key for word in ("PASSWORD", "PASSPHRASE", "TOKEN", "SECRET")):
                assert key.endswith("_FILE"), f"{name}: {key} holds a secret value"
                assert value.startswith("/run/secrets/"), f"{name}: {key}"
            if "://" in value:
                assert urlsplit(value).password is None, f"{name}: {key} holds a password"


def host_paths(compose: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for name, service in compose["services"].items():
        build = service.get("build")
        if isinstance(build, dict):
            yield name, build["context"]
            yield name, f"./{Path(build['context']) / build['dockerfile']}"
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict) and volume["type"] == "bind":
                yield name, volume["source"]
            elif isinstance(volume, str) and volume.startswith((".", "/")):
                yield name, volume.split(":")[0]
    for name, secret in compose["secrets"].items():
        yield f"secret {name}", secret["file"]


def test_every_mounted_host_path_exists_or_is_key_material_git_keeps_out(
    compose: dict[str, Any],
) -> None:
    seen = set()
    for owner, raw in host_paths(compose):
        assert raw.startswith("./") or raw == ".", (
            f"{owner}: {raw} must be relative to the repository"
        )
        path = (REPO / raw).resolve()
        assert path.is_relative_to(REPO), f"{owner}: {raw} leaves the repository"
        seen.add(raw)
        if path.exists():
            continue
        # Made by the deployment during the key ceremony (docs/operations.md):
        # it must live under keys/ and be ignored by git, so it is never committed.
        assert path.is_relative_to(REPO / "keys"), f"{owner}: {raw} does not exist"
        ignored = subprocess.run(
            ["git", "-C", str(REPO), "check-ignore", "--no-index", "-q", raw], check=False
        )
        assert ignored.returncode == 0, f"{owner}: {raw} is key material but git would track it"
    assert {"./keys/jp", "./keys/pk", "./policies", "./Dockerfile"} <= seen


def test_keys_and_policies_are_mounted_where_the_settings_look(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for node, node_id in NODE_OF_SERVICE.items():
        service = services[node]
        env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
        mounts = {v["source"]: v for v in service["volumes"] if isinstance(v, dict)}
        home = "/var/lib/ssw-gateway"
        assert mounts[f"./keys/{node_id}"]["target"] == f"{home}/keys"
        assert mounts["./policies"]["read_only"] is True
        assert mounts["./policies"]["target"] == env["GATEWAY_POLICY_DIR"]
        for key in ("GATEWAY_SERVER_TLS_CERT", "GATEWAY_SERVER_TLS_KEY", "GATEWAY_SERVER_TLS_CA"):
            assert env[key].startswith(f"{home}/keys/"), key


@pytest.mark.parametrize("service_name", ["tokyo", "islamabad", "tokyo-migrate", "islamabad-init"])
def test_gateway_variables_load_as_real_settings(
    compose: dict[str, Any], service_name: str, tmp_path: Path
) -> None:
    service = compose["services"][service_name]
    env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
    gateway_vars = {k: v for k, v in env.items() if k.startswith("GATEWAY_")}
    assert not set(gateway_vars) & NOT_SETTINGS
    node_id = "jp" if service_name.startswith("tokyo") else "pk"
    (tmp_path / "gateway.toml").write_text(f'[node]\nid = "{node_id}"\n', encoding="utf-8")
    settings = load_settings(tmp_path, environ=gateway_vars)
    assert settings.server.listen == env["GATEWAY_SERVER_LISTEN"]
    assert settings.server.peer_url == env["GATEWAY_SERVER_PEER_URL"]
    assert settings.database_url == env["GATEWAY_DATABASE_URL"]
    assert settings.server.tls_cert == Path(env["GATEWAY_SERVER_TLS_CERT"])
    assert settings.server.tls_key == Path(env["GATEWAY_SERVER_TLS_KEY"])
    assert settings.server.tls_ca == Path(env["GATEWAY_SERVER_TLS_CA"])
    assert settings.policy_dir == Path(env["GATEWAY_POLICY_DIR"])
    assert settings.log.format == env["GATEWAY_LOG_FORMAT"]


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text(encoding="utf-8").replace("\\\n", " ")
    pairs = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            pairs.append((keyword.upper(), rest.strip()))
    return pairs


def test_dockerfile_runs_gateway_as_a_non_root_user_from_python_slim() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users
    assert users[-1].split(":")[0] not in ("root", "0")
    (entrypoint,) = [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["gateway"]
    assert any(keyword == "RUN" and "pip install ." in rest for keyword, rest in instructions)


def dockerfile_health_probe() -> list[str]:
    (healthcheck,) = [
        rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK"
    ]
    command = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert command[:2] == ["python", "-c"]
    return [sys.executable, "-c", command[2]]


class _Health(http.server.BaseHTTPRequestHandler):
    status_for_health = 200

    def do_GET(self) -> None:
        status = self.status_for_health if self.path == "/v1/health" else 404
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        return


@pytest.mark.parametrize(
    ("status", "path", "expected_exit"),
    [(200, "/v1/health", 0), (503, "/v1/health", 1), (200, "/nothing", 1)],
)
def test_dockerfile_health_probe_reports_what_the_endpoint_answers(
    status: int, path: str, expected_exit: int
) -> None:
    handler = type("Handler", (_Health,), {"status_for_health": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}{path}"
        result = subprocess.run(
            dockerfile_health_probe(),
            env={"SSW_HEALTH_URL": url},
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == expected_exit, shlex.join(["probe", url]) + result.stderr.decode()


# ----------------------------------------------- the compose probe over mutual TLS


def compose_health_probe(compose: dict[str, Any], service: str) -> list[str]:
    test = compose["services"][service]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    return [sys.executable, "-c", test[3]]


@pytest.mark.parametrize(("client_ca_matches", "expected_exit"), [(True, 0), (False, 1)])
def test_compose_health_probe_passes_mutual_tls_only_with_the_node_certificate(
    compose: dict[str, Any], tmp_path: Path, client_ca_matches: bool, expected_exit: int
) -> None:
    pair_ca = Authority(tmp_path, "pair-ca")
    other_ca = Authority(tmp_path, "other-ca")
    server = pair_ca.issue("tokyo", server=True, client=True, dns="tokyo")
    probe = (pair_ca if client_ca_matches else other_ca).issue(
        "tokyo-probe", server=True, client=True, dns="tokyo-probe"
    )
    server_cert, server_key = server.cert, server.key
    node_cert, node_key = probe.cert, probe.key
    ca_file = pair_ca.path
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(server_cert, server_key)
    context.load_verify_locations(cafile=ca_file)
    context.verify_mode = ssl.CERT_REQUIRED
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        env = {
            "SSW_HEALTH_URL": f"https://127.0.0.1:{server.server_address[1]}/v1/health",
            "GATEWAY_SERVER_TLS_CERT": str(node_cert),
            "GATEWAY_SERVER_TLS_KEY": str(node_key),
        }
        result = subprocess.run(
            compose_health_probe(compose, "tokyo"),
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == expected_exit, result.stderr.decode()


@pytest.mark.parametrize("missing", [None, "gateway_passphrase", "db_password"])
def test_entrypoint_hands_the_secrets_to_gateway_and_refuses_without_them(
    compose: dict[str, Any], tmp_path: Path, missing: str | None
) -> None:
    """The entrypoint, run for real with the secrets folder moved into tmp_path
    and a stand-in ``gateway`` that reports what it was given."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    values = {"gateway_passphrase": "pass phrase with spaces $HOME", "db_password": "pg-secret"}
    for name, value in values.items():
        if name != missing:
            (secrets_dir / name).write_text(value + "\n", encoding="utf-8")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "gateway"
    stand_in.write_text(
        '#!/bin/sh\nprintf "%s\\n" "$GATEWAY_PASSPHRASE" "$PGPASSWORD" "$#" "$@"\n',
        encoding="utf-8",
    )
    stand_in.chmod(0o755)
    script = entrypoint_script(compose["services"]["tokyo"]).replace(
        "/run/secrets/", f"{secrets_dir}/"
    )
    result = subprocess.run(
        ["/bin/sh", "-c", script, "gateway", "serve", "--json"],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if missing is None:
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == [*values.values(), "2", "serve", "--json"]
    else:
        assert result.returncode != 0
        assert result.stdout == "", "gateway must not start without its secrets"


# ------------------------------------------- the image carries its default policy


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored_by_docker(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: a pattern matches from the context root; ``**/`` any depth;
    an excluded folder takes everything under it."""
    parts = relative.split("/")
    for end in range(1, len(parts) + 1):
        candidate = "/".join(parts[:end])
        for pattern in patterns:
            if fnmatch.fnmatchcase(candidate, pattern):
                return True
            if pattern.startswith("**/"):
                tail = pattern[3:]
                if any(
                    fnmatch.fnmatchcase("/".join(parts[start:end]), tail) for start in range(end)
                ):
                    return True
    return False


def build_stage_copies() -> list[tuple[list[str], str]]:
    """``COPY`` sources and destination of the image's build stage (before the second FROM)."""
    copies: list[tuple[list[str], str]] = []
    stages = 0
    for keyword, rest in dockerfile_instructions():
        if keyword == "FROM":
            stages += 1
        elif keyword == "COPY" and stages == 1:
            *sources, destination = rest.split()
            copies.append((sources, destination))
    return copies


def copy_as_docker_does(source: Path, target: Path, patterns: list[str]) -> None:
    relative = source.relative_to(REPO).as_posix()
    if ignored_by_docker(relative, patterns):
        return
    if source.is_symlink():
        target.symlink_to(os.readlink(source))
    elif source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted(source.iterdir()):
            copy_as_docker_does(child, target / child.name, patterns)
    else:
        shutil.copy2(source, target)


def test_the_image_build_stage_gets_the_policies_into_the_wheel(tmp_path: Path) -> None:
    """The build context (.dockerignore applied) and the build stage's COPY lines,
    replayed into a folder, give a wheel that carries policies/ unchanged, so
    `docker run ... init` needs no policy mount."""
    patterns = dockerignore_patterns()
    stage = tmp_path / "src"
    stage.mkdir()
    for sources, destination in build_stage_copies():
        for source in sources:
            into_folder = destination.endswith("/") or len(sources) > 1
            target = stage / destination / Path(source).name if into_folder else stage / destination
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_as_docker_does(REPO / source, target, patterns)
    wheel = build_wheel(stage, tmp_path / "dist")
    shipped = {p.name: p.read_bytes() for p in (REPO / "policies").iterdir() if p.is_file()}
    assert wheel_files(wheel, "gateway/policies/") == shipped
    assert not any(
        keyword == "ENV" and "GATEWAY_POLICY_DIR" in rest
        for keyword, rest in dockerfile_instructions()
    ), "the image must find its policy without a mount"


@pytest.mark.parametrize(
    ("path", "ignored"),
    [
        ("keys/jp/operational.key", True),
        ("gateway/node/__pycache__/x.pyc", True),
        ("data/gateway.sqlite3", True),
        ("policies/policy.toml", False),
        ("gateway/policies", False),
        ("gateway/node/own_keys.py", False),
    ],
)
def test_the_build_context_keeps_key_material_out_and_the_policies_in(
    path: str, ignored: bool
) -> None:
    assert ignored_by_docker(path, dockerignore_patterns()) is ignored


# ---------------------------------------------------------------- pull mode override

PULL_FILE = REPO / "docker-compose.pull.yml"


class _ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: ``!reset`` empties a value, ``!override`` replaces it."""


class _Reset:
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> _Reset:
    return _Reset()


_ComposeLoader.add_constructor("!reset", _reset)


def _merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file: mappings merge key by key, ``!reset``
    removes, other values (sequences included, for ``ports``) replace."""
    if isinstance(override, _Reset):
        return None
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = _merge(base.get(key), value)
            if result is None:
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    return override


@pytest.fixture(scope="module")
def pull_compose(compose: dict[str, Any]) -> dict[str, Any]:
    override = yaml.load(PULL_FILE.read_text(encoding="utf-8"), Loader=_ComposeLoader)
    assert set(override) == {"services"}
    assert set(override["services"]) <= set(compose["services"])
    merged = _merge(compose, override)
    assert isinstance(merged, dict)
    return merged


def test_the_pull_variant_satisfies_the_compose_specification(
    pull_compose: dict[str, Any], schema: dict[str, Any]
) -> None:
    validator = jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker())
    problems = [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(pull_compose)
    ]
    assert problems == []


def test_in_the_pull_variant_islamabad_publishes_no_peer_port(
    pull_compose: dict[str, Any], compose: dict[str, Any]
) -> None:
    assert "ports" not in pull_compose["services"]["islamabad"]
    assert pull_compose["services"]["tokyo"]["ports"] == compose["services"]["tokyo"]["ports"]


def test_the_pull_variant_settings_load_and_pair(
    pull_compose: dict[str, Any], tmp_path: Path
) -> None:
    from gateway.core.pull import Modes, mode_mismatch  # noqa: PLC0415

    modes = {}
    for service_name, node_id in NODE_OF_SERVICE.items():
        service = pull_compose["services"][service_name]
        env = {k: interpolate(str(v)) for k, v in service["environment"].items()}
        home = tmp_path / node_id
        home.mkdir()
        (home / "gateway.toml").write_text(f'[node]\nid = "{node_id}"\n', encoding="utf-8")
        settings = load_settings(
            home, environ={k: v for k, v in env.items() if k.startswith("GATEWAY_")}
        )
        modes[node_id] = Modes(settings.server.peer_mode, settings.server.peer_delivery)
    assert modes["pk"] == Modes("pull", "push")
    assert modes["jp"] == Modes("push", "hold")
    assert mode_mismatch(modes["pk"], modes["jp"], us="pk", peer="jp") is None
    assert mode_mismatch(modes["jp"], modes["pk"], us="jp", peer="pk") is None
