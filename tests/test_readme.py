"""The README's examples, run as written against a live server, and what running them
turned up.

Every ```python block of README.md runs in its own interpreter, and every `switchboard`
and `curl` line of its ```bash blocks runs as a command, against a real server on free
loopback ports (tiny model). The examples name the documented addresses, 127.0.0.1:50051
(gRPC) and 127.0.0.1:8000 (HTTP): the test substitutes the live server's, textually in
the Python blocks and the curl lines, and through ``SWITCHBOARD_TARGET`` for the CLI
lines (what the CLI reads when no ``--target`` is given), which otherwise run exactly as
written, from the repository root (``.venv/bin/switchboard``, or the one beside this
interpreter where the tests run from another environment). The server's library stands
in for the shipped adapters: random tiny-model LoRAs named as the README's (wuyu at
default scale 0.8, cantonese, telecom_terms) and the routing table of
``tests/service_fixtures.py`` (+86 21 → wuyu, +852 and CN-HK → cantonese), so the
examples route as the README says; the answers are noise. Each snippet's output is
checked for what the README promises of it (the streamed answer printed once, scales as
given, the model list on a line of its own), not only for a zero exit.

Left out, each named in ``SKIPPED`` with the reason: the ``make`` lines (``make serve``
is what the live server stands for, ``make test`` is this suite, ``make serve-cluster``
needs a Ray cluster, ``make train`` trains on the real base model for minutes),
``switchboard train`` (the same) and ``switchboard model info`` (inspects the real base
model, no server involved; ``tests/test_basemodel.py`` runs it). A command that is
neither run nor named there fails the test, so a new README line is not skipped
silently. Inline code in prose (the LangChain one-liner) is not run.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from clients.cli import main as cli
from clients.client import SwitchboardClient
from clients.errors import SwitchboardError
from clients.messages import GenerateResult, StreamChunk
from protos.switchboard.v1 import switchboard_pb2 as pb
from server.service.config import REPO_ROOT
from tests.service_fixtures import LiveServer, server_config, start_server
from tests.support import ALL_TARGETS, add_manifest, make_random_adapter
from tests.test_http_api import raw

README = REPO_ROOT / "README.md"
GRPC_ADDRESS, HTTP_ADDRESS = "127.0.0.1:50051", "127.0.0.1:8000"
SKIPPED = {
    "make": "make serve is the live server itself, make test this suite; serve-cluster "
            "needs Ray, train trains on the real base model for minutes",
    "switchboard train": "trains on the real base model for minutes",
    "switchboard model": "inspects the real base model, no server; tests/test_basemodel.py",
}
RUN = ("switchboard generate", "switchboard adapters", "switchboard callcenter",
       "switchboard loadtest", "switchboard health", "curl")
TIMEOUT_S = 300


@pytest.fixture(scope="module")
def readme_server(tiny_model_dir, tiny_model, service_library, tmp_path_factory):
    """The shared library (wuyu, cantonese, plain, broken) plus telecom_terms in a second
    adapter root, on free gRPC, HTTP and metrics ports."""
    root, routing, _ = service_library
    extra = tmp_path_factory.mktemp("readme-adapters")
    make_random_adapter(str(tiny_model_dir), extra / "telecom_terms", 8, ALL_TARGETS, seed=7,
                        b_std=0.5)
    add_manifest(extra / "telecom_terms", tiny_model.base_fingerprint,
                 prompt_template="Translate with telecom terms: {text}\n")
    server = start_server(server_config(tiny_model_dir, root, routing,
                                        adapter_roots=(str(root), str(extra))))
    yield server
    server.stop()


def http_address(server: LiveServer) -> str:
    return f"127.0.0.1:{server.server.http_port}"


def localize(text: str, server: LiveServer) -> str:
    """The documented addresses → the live server's (the only change made to a snippet)."""
    return text.replace(GRPC_ADDRESS, server.address).replace(HTTP_ADDRESS,
                                                              http_address(server))


def blocks(language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", README.read_text(), re.M | re.S)


def bash_commands() -> list[str]:
    """The commands of the bash blocks: continued (``\\``) and open-quoted lines joined,
    comment lines dropped."""
    commands: list[str] = []
    pending = ""
    for block in blocks("bash"):
        for line in block.splitlines():
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.endswith("\\"):
                pending = pending[:-1]
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # a quote still open: the command goes on
                continue
            commands.append(pending)
            pending = ""
    assert not pending, pending
    return commands


def kind(argv: list[str]) -> str:
    program = Path(argv[0]).name
    return f"{program} {argv[1]}" if program == "switchboard" else program


def run_python(code: str, server: LiveServer) -> str:
    result = subprocess.run([sys.executable, "-c", localize(code, server)], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=TIMEOUT_S,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert result.returncode == 0, (code, result.stderr[-3000:])
    return result.stdout


# -- the examples -------------------------------------------------------------------------
def test_readme_has_the_examples_this_test_runs():
    assert len(blocks("python")) == 3, "a new python block in README.md: run it here too"
    kinds = {kind(shlex.split(c, comments=True)) for c in bash_commands()}
    assert set(RUN) <= kinds
    assert kinds <= set(RUN) | set(SKIPPED), kinds - set(RUN) - set(SKIPPED)


def test_the_client_snippet_prints_the_streamed_answer_once(readme_server):
    snippet = next(b for b in blocks("python") if "client.stream(" in b)
    out = run_python(snippet, readme_server)
    with SwitchboardClient(readme_server.address) as client:
        reply = client.generate("侬今朝吃饭伐?", caller_number="+86 21 5555 1234")
        items = list(client.stream("我張單幾時到期呀?", region="CN-HK"))
    final = items[-1]
    assert isinstance(final, GenerateResult) and final.adapter == "cantonese"
    assert final.text and "".join(i.text for i in items if isinstance(i, StreamChunk)) \
        == final.text
    assert out.startswith(f"{reply.text} caller_number wuyu\n"), out
    assert out.count(final.text) == 1, out  # the chunks, not the chunks and then the result


def test_the_composition_snippet_runs_alone_and_prints_scales_as_given(readme_server):
    snippet = next(b for b in blocks("python") if "adapters=[" in b)
    out = run_python(snippet, readme_server)
    assert "[('wuyu', 0.8), ('telecom_terms', 0.5)]" in out, out


def test_the_openai_snippet_prints_the_model_list_on_its_own_line(readme_server):
    snippet = next(b for b in blocks("python") if "from openai import" in b)
    out = run_python(snippet, readme_server)
    ids = ast.literal_eval(out.splitlines()[-1])
    assert {"wuyu", "cantonese", "telecom_terms"} <= set(ids), out
    assert out.splitlines()[0].endswith(" explicit"), out


def test_every_cli_and_curl_line_runs(readme_server):
    env = dict(os.environ, HF_HUB_OFFLINE="1", SWITCHBOARD_TARGET=readme_server.address)
    ran: dict[str, list[str]] = {}
    for command in bash_commands():
        argv = shlex.split(localize(command, readme_server), comments=True)
        if kind(argv) not in RUN:
            assert kind(argv) in SKIPPED, command
            continue
        if argv[0].endswith("/switchboard") and not (REPO_ROOT / argv[0]).exists():
            argv[0] = str(Path(sys.executable).parent / "switchboard")  # another venv's
        result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True,
                                env=env, timeout=TIMEOUT_S)
        assert result.returncode == 0, (command, result.stdout[-2000:], result.stderr[-2000:])
        ran.setdefault(kind(argv), []).append(result.stdout + result.stderr)
    generated = "\n".join(ran["switchboard generate"])
    assert "wuyu" in generated and "caller_number" in generated
    assert "wuyu@0.8" in generated and "telecom_terms@0.5" in generated  # the composition
    assert "telecom_terms" in ran["switchboard adapters"][0]
    assert ran["switchboard health"] == ["SERVING\n"]
    assert json.loads(ran["curl"][0])["model"] == "wuyu"
    assert ran["curl"][1].rstrip().endswith("data: [DONE]")


# -- what running them turned up ----------------------------------------------------------
def test_a_misspelled_adapter_lists_the_adapters_once(readme_server, capsys):
    """The store's NOT_FOUND names what is on disk; nothing on the way adds it again."""
    with pytest.raises(grpc.RpcError) as raw_error:
        readme_server.stub().Generate(pb.GenerateRequest(text="hi", dialect="wuuy"),
                                      timeout=30)
    assert raw_error.value.code() == grpc.StatusCode.NOT_FOUND
    messages = {"grpc": raw_error.value.details()}
    with SwitchboardClient(readme_server.address) as client, \
            pytest.raises(SwitchboardError) as client_error:
        client.generate("hi", dialect="wuuy")
    messages["client"] = str(client_error.value)
    assert cli(["generate", "--target", readme_server.address, "--dialect", "wuuy", "hi"]) == 5
    messages["cli"] = capsys.readouterr().err
    status, _, body = raw(readme_server, "POST", "/v1/completions",
                          b'{"model": "wuuy", "prompt": "hi"}')
    assert status == 404
    messages["http"] = body["error"]["message"]
    for surface, message in messages.items():
        assert "no adapter named 'wuuy'" in message, (surface, message)
        assert message.count("available:") == 1 and message.count("telecom_terms") == 1, \
            (surface, message)


def test_http_errors_say_where_to_go_instead(readme_server):
    chat = json.dumps({"model": "wuyu", "messages": [{"role": "user", "content": "hi"}]})
    status, _, body = raw(readme_server, "POST", "/v1/completions", chat.encode())
    assert status == 400 and body["error"]["param"] == "prompt"
    assert "/v1/chat/completions" in body["error"]["message"], body
    completion = b'{"model": "wuyu", "prompt": "hi"}'
    status, _, body = raw(readme_server, "POST", "/v1/chat/completions", completion)
    assert status == 400 and body["error"]["param"] == "messages"
    assert "/v1/completions" in body["error"]["message"], body
    status, _, body = raw(readme_server, "POST", "/completions", completion)  # no /v1
    assert status == 404 and "/v1/completions" in body["error"]["message"], body
    assert "http://HOST:PORT/v1" in body["error"]["message"]
    status, _, body = raw(readme_server, "GET", "/nowhere")
    assert status == 404 and "POST /v1/chat/completions" in body["error"]["message"], body
    status, _, body = raw(readme_server, "GET", "/v1/completions")
    assert status == 405 and "use POST" in body["error"]["message"], body


def test_the_grpc_client_on_the_http_port_says_to_use_the_grpc_port(readme_server, capsys):
    target = http_address(readme_server)
    assert cli(["generate", "--target", target, "--timeout", "20", "hi"]) == 14
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Expected SETTINGS" not in err, err
    assert "not in gRPC" in err and "gRPC port" in err and f"http://{target}/v1" in err, err
    with SwitchboardClient(target) as client, pytest.raises(SwitchboardError) as error:
        client.generate("hi")
    assert "gRPC port" in str(error.value)
    assert client.retries == 0  # a port that answers HTTP/1 will not start to speak gRPC


def test_the_help_says_serve_runs_the_http_api_too(capsys):
    from server.serve_cmd import build_parser

    assert cli(["--help"]) == 0
    serve = next(line for line in capsys.readouterr().out.splitlines()
                 if line.strip().startswith("serve "))
    assert "gRPC" in serve and "HTTP API" in serve, serve
    assert "HTTP API" in (build_parser().description or "")
