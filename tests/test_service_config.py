"""Server configuration: YAML, env and flags, each bad key or value named."""

from __future__ import annotations

import filecmp
import subprocess
import sys

import pytest

from server.errors import InvalidOption
from server.service.config import DEFAULT_CONFIG_PATH, REPO_ROOT, load_config, parse_assignments


def test_shipped_config_loads_with_its_documented_values():
    config = load_config(DEFAULT_CONFIG_PATH, environ={})
    assert config.host == "127.0.0.1"  # loopback by default
    assert config.preload == ("all",)
    assert config.engine.max_lora_rank == 64
    assert config.log_payloads is False


def test_precedence_file_then_env_then_flags(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("port: 6000\nengine:\n  max_loras: 3\n")
    env = {"SWITCHBOARD_PORT": "6001", "SWITCHBOARD_ENGINE__MAX_LORAS": "5",
           "SWITCHBOARD_API_KEYS": "k1,k2", "SWITCHBOARD_CACHE_DIR": "/tmp/x"}
    config = load_config(path, parse_assignments(["port=6002"]), environ=env)
    assert config.port == 6002
    assert config.engine.max_loras == 5
    assert config.api_keys == ("k1", "k2")
    assert "k1" not in str(config.public_dict())  # secrets are masked in the start-up log


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("prot: 1\n", r"unknown setting 'prot' \(valid: host, port"),
    ("engine:\n  max_lora: 4\n", r"unknown setting engine.'max_lora'"),
    ("port: fifty\n", "setting port must be an integer"),
    ("port: 70000\n", "setting port must be a port number"),
    ("log_json: maybe\n", "setting log_json must be true or false"),
    ("engine:\n  max_loras: 0\n", "max_loras must be > 0"),
    ("tls_cert: cert.pem\n", "tls_cert and tls_key must be given together"),
    ("- a list\n", "top level must be a mapping"),
    ("port: [1\n", "not valid YAML"),
])
def test_bad_settings_are_named(tmp_path, yaml_text, message):
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    with pytest.raises(InvalidOption, match=message):
        load_config(path, environ={})


def test_bad_env_value_is_named():
    with pytest.raises(InvalidOption, match=r"setting engine\.max_batch_size must be an integer"):
        load_config(None, environ={"SWITCHBOARD_ENGINE__MAX_BATCH_SIZE": "lots"})


def test_serve_cli_reports_a_bad_setting_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve", "--set", "engine.max_lora=4"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        result.stderr.strip()]  # one line, no traceback
    assert "unknown setting engine.'max_lora'" in result.stderr


def test_generated_stubs_match_the_proto(tmp_path):
    """`make protos` output is committed; regenerate and compare."""
    proto = "protos/switchboard/v1/switchboard.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", ".",
                    f"--python_out={tmp_path}", f"--grpc_python_out={tmp_path}", proto],
                   check=True, cwd=REPO_ROOT, timeout=120)
    for name in ("switchboard_pb2.py", "switchboard_pb2_grpc.py"):
        generated = tmp_path / "protos/switchboard/v1" / name
        assert filecmp.cmp(generated, REPO_ROOT / "protos/switchboard/v1" / name,
                           shallow=False), f"{name} is stale: run `make protos`"
