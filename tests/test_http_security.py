"""The HTTP API's transport and key hardening: HTTPS with the gRPC certificate (driven by
the official ``openai`` client trusting a self-signed certificate), no plain HTTP on a
network address while TLS is configured, the KubeRay manifest's TLS, and the key checked
before a byte of the body is read (a raw socket, which can stop sending mid-body)."""

from __future__ import annotations

import asyncio
import http.client
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from openai import OpenAI

from server.service.app import SwitchboardServer
from server.service.auth import KeyChecker
from server.service.calls import CallRunner, ServiceState
from server.service.config import REPO_ROOT, ServerConfig, load_config
from server.service.http_api import HttpApi, HttpServer
from server.service.metrics import ServiceMetrics
from server.service.tls import TlsFiles, cleartext_warning
from tests.service_fixtures import LiveServer, server_config, start_server

GEN_KEY = "https-gen-key-1234"
needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None,
                                   reason="needs the openssl CLI")


def self_signed(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for localhost and 127.0.0.1, as the gRPC TLS test makes them."""
    cert, private = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(private), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, private


# -- HTTPS ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_server(tiny_model_dir, service_library, tmp_path_factory):
    root, routing, _ = service_library
    cert, private = self_signed(tmp_path_factory.mktemp("tls"))
    server = start_server(server_config(tiny_model_dir, root, routing, metrics_port=-1,
                                        api_keys=(GEN_KEY,), tls_cert=str(cert),
                                        tls_key=str(private)))
    yield server, cert
    server.stop()


@needs_openssl
def test_tls_serves_the_openai_api_over_https_with_the_grpc_certificate(tls_server):
    server, cert = tls_server
    url = server.server.http_url
    assert url.startswith("https://"), url
    trusting = ssl.create_default_context(cafile=str(cert))
    with openai.DefaultHttpxClient(verify=trusting) as http:
        api = OpenAI(base_url=url, api_key=GEN_KEY, max_retries=0, timeout=60,
                     http_client=http)
        reply = api.completions.create(model="wuyu", prompt="hi", max_tokens=2)
        assert reply.usage.completion_tokens > 0
        assert "wuyu" in [m.id for m in api.models.list()]
        with pytest.raises(openai.AuthenticationError):  # keys still apply over TLS
            OpenAI(base_url=url, api_key="wrong-key", max_retries=0, timeout=60,
                   http_client=http).models.list()
    with openai.DefaultHttpxClient() as untrusting, pytest.raises(openai.APIConnectionError):
        OpenAI(base_url=url, api_key=GEN_KEY, max_retries=0, timeout=30,
               http_client=untrusting).models.list()  # an unknown certificate is refused


@needs_openssl
def test_the_https_port_answers_no_plain_http(tls_server):
    server, _ = tls_server
    plain = f"http://127.0.0.1:{server.server.http_port}/health"
    refused = (urllib.error.URLError, http.client.HTTPException, ConnectionError)
    with pytest.raises(refused), urllib.request.urlopen(plain, timeout=30) as response:
        response.read()


def _http_server(**settings: Any) -> HttpServer:
    config = ServerConfig(**settings)
    runner = CallRunner(ServiceState(), KeyChecker((), ""), ServiceMetrics(), config)
    return HttpServer(HttpApi(runner, config))


async def _start_and_stop(server: HttpServer, host: str) -> int:
    port = await server.start(host, 0)
    await server.stop()
    return port


def test_plain_http_on_a_network_address_is_refused_while_tls_is_configured():
    server = _http_server(tls_cert="cert.pem", tls_key="key.pem")
    with pytest.raises(OSError, match=r"refusing plain HTTP on 0\.0\.0\.0:0: tls_cert") as caught:
        asyncio.run(_start_and_stop(server, "0.0.0.0"))
    assert "\n" not in str(caught.value)
    assert asyncio.run(_start_and_stop(server, "127.0.0.1")) > 0  # loopback stays allowed
    # Without TLS configured, any host may serve plain HTTP (a proxy may terminate TLS).
    assert asyncio.run(_start_and_stop(_http_server(), "127.0.0.1")) > 0


def test_missing_tls_files_are_named_before_anything_is_served(tmp_path):
    with pytest.raises(OSError, match="tls_cert"):
        TlsFiles.of(ServerConfig(tls_cert=str(tmp_path / "none.pem"),
                                 tls_key=str(tmp_path / "none.key")))


def test_keys_in_clear_on_a_network_address_are_warned_about():
    assert cleartext_warning(ServerConfig(host="0.0.0.0", api_keys=("k" * 12,)))
    assert cleartext_warning(ServerConfig(host="10.0.0.5", admin_key="a" * 12))
    assert cleartext_warning(ServerConfig(host="127.0.0.1", api_keys=("k" * 12,))) is None
    assert cleartext_warning(ServerConfig(host="0.0.0.0")) is None  # no keys to leak
    assert cleartext_warning(ServerConfig(host="0.0.0.0", api_keys=("k" * 12,),
                                          tls_cert="c.pem", tls_key="k.pem")) is None


def test_the_http_url_names_https_when_tls_is_configured():
    server = SwitchboardServer(ServerConfig(tls_cert="c.pem", tls_key="k.pem"))
    server.http_port = 8443
    assert server.http_url == "https://127.0.0.1:8443/v1"


# -- the KubeRay manifest ---------------------------------------------------------------
def test_the_manifest_serves_both_ports_with_tls_from_a_mounted_secret(tmp_path):
    documents = list(yaml.safe_load_all((REPO_ROOT / "deploy" / "rayservice.yaml").read_text()))
    config_map = next(d for d in documents if d["kind"] == "ConfigMap")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(config_map["data"]["config.yaml"])
    config = load_config(config_file, environ={})
    assert config.host == "0.0.0.0" and config.port > 0 and config.http_port > 0
    assert config.tls_cert and config.tls_key  # both ports then speak TLS only
    service = next(d for d in documents if d["kind"] == "RayService")
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    for path in (config.tls_cert, config.tls_key):
        folder = str(Path(path).parent)
        assert folder in mounts, f"{path} is not on a mounted volume"
        assert "secret" in volumes[mounts[folder]], f"{path} does not come from a Secret"
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert (ports["grpc"], ports["http"]) == (config.port, config.http_port)


# -- the key before the body ------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_model_dir, service_library):
    root, routing, _ = service_library
    server = start_server(server_config(tiny_model_dir, root, routing, metrics_port=-1,
                                        api_keys=(GEN_KEY,)))
    yield server
    server.stop()


def refused_http_calls(server: LiveServer) -> float:
    total = 0.0
    for metric in server.server.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "switchboard_requests_total" and \
                    sample.labels.get("status") == "UNAUTHENTICATED" and \
                    sample.labels.get("protocol") == "http":
                total += sample.value
    return total


def _head_of_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _closed(sock: socket.socket) -> bool:
    """True once the server has closed the connection (EOF or a reset)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return True


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key"])
def test_a_request_without_a_valid_key_gets_401_before_its_body_is_read(keyed, authorization):
    before = refused_http_calls(keyed)
    declared, sent = 8_000_000, 64 * 1024  # within the drain limit: once read in full
    head = ("POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n"
            + (f"Authorization: {authorization}\r\n" if authorization else "") + "\r\n")
    with socket.create_connection(("127.0.0.1", keyed.server.http_port), timeout=15) as sock:
        sock.sendall(head.encode() + b"x" * sent)  # ... and never the rest
        reply = _head_of_response(sock)
        status_line, _, headers = reply.partition(b"\r\n")
        assert status_line.startswith(b"HTTP/1.1 401"), reply[:200]
        assert b"connection: close" in headers.lower()
        assert _closed(sock)  # the server reads no more of it
    assert refused_http_calls(keyed) == before + 1  # recorded like any refused call


def test_a_keyed_request_is_still_read_and_served(keyed):
    body = b'{"model": "wuyu", "prompt": "hi", "max_tokens": 2}'
    connection = http.client.HTTPConnection("127.0.0.1", keyed.server.http_port, timeout=60)
    try:
        connection.request("POST", "/v1/completions", body, {
            "content-type": "application/json", "authorization": f"Bearer {GEN_KEY}"})
        response = connection.getresponse()
        assert response.status == 200, response.read()[:200]
    finally:
        connection.close()
