"""ServerConfig: every server setting, documented once, from YAML, env and flags.

Precedence, lowest first: the dataclass defaults, the YAML file (``server/config.yaml``
by default), ``SWITCHBOARD_<KEY>`` environment variables (``SWITCHBOARD_ENGINE__MAX_LORAS``
for a key of the ``engine`` section), then ``--set key=value`` / named CLI flags.
Unknown keys are errors naming the valid ones; values are checked for type and range.
Secrets (API keys) are best given by environment, never in a committed file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from server.engine.config import EngineConfig
from server.errors import InvalidOption
from server.formats.files import read_yaml_mapping
from server.service.cluster_settings import ClusterConfig

ENV_PREFIX = "SWITCHBOARD_"
NOT_CONFIG_ENV = {"SWITCHBOARD_CACHE_DIR", "SWITCHBOARD_TARGET", "SWITCHBOARD_API_KEY",
                  "SWITCHBOARD_TLS_ROOT_CERT"}
"""Variables of the same prefix that are not server settings (model cache, client CLI).
``SWITCHBOARD_ADMIN_KEY`` is both: the server's admin key and the one the CLI sends."""
MAX_MESSAGE_BYTES = 2**31 - 1
"""grpc channel options are 32-bit signed integers."""
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG_PATH = REPO_ROOT / "server" / "config.yaml"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback by default. 0.0.0.0 exposes the server to the network."""
    port: int = 50051
    """gRPC port; 0 picks a free one (printed at start)."""
    metrics_port: int = 9400
    """Prometheus metrics over HTTP on ``host``; 0 picks a free one, -1 turns them off."""
    http_port: int = 8000
    """OpenAI-compatible HTTP API (``/v1/...``) on ``host``; 0 picks a free one, -1: off.
    HTTPS only when ``tls_cert`` is set; plain HTTP otherwise."""
    http_max_body_bytes: int = 1 << 20
    """Largest HTTP request body; a larger one gets 413."""
    cors_origins: tuple[str, ...] = ()
    """Origins browsers may call the HTTP API from (``*`` for any); empty: CORS off."""
    base_model: str = "default"
    """``default`` (SmolLM2-135M-Instruct), a ``.gguf`` file or an HF model folder."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cpu`` or ``cuda[:N]``."""
    dtype: str = "auto"
    """``auto`` (fp32 on CPU, bf16 on CUDA), ``float32``, ``bfloat16`` or ``float16``."""
    quantize: str = "none"
    """``none``, ``int8`` or ``nf4`` (bitsandbytes)."""
    adapter_roots: tuple[str, ...] = ("adapters",)
    """Folders holding one folder per adapter; relative paths are from the repository."""
    preload: tuple[str, ...] = ("all",)
    """Adapters loaded before health turns SERVING; ``all`` means every one on disk."""
    routing_table: str = "server/routing.yaml"
    """The routing table (YAML); reloaded when it changes."""
    max_cpu_adapters: int = 32
    """Adapters kept validated in host memory (LRU beyond that)."""
    poll_interval_s: float = 2.0
    """How often adapter folders and the routing table are checked for changes."""
    default_max_new_tokens: int = 128
    """max_new_tokens of requests that do not set it."""
    api_keys: tuple[str, ...] = ()
    """Keys accepted for generation (``authorization: Bearer <key>``); empty: no auth."""
    admin_key: str = ""
    """Key for admin rpcs (also accepted for generation); empty: admin rpcs are open."""
    tls_cert: str = ""
    """PEM certificate chain; with ``tls_key``, the server speaks TLS only: the gRPC port
    and the HTTP API (HTTPS) both serve this certificate, and plain HTTP is never served
    on a non-loopback address (the server refuses to start rather than do so). The
    metrics port stays plain HTTP: it carries no keys. Without TLS, keys configured on a
    non-loopback ``host`` cross the network in clear, which start-up warns about."""
    tls_key: str = ""
    """PEM private key for ``tls_cert``."""
    max_message_bytes: int = 1 << 20
    """Largest request or response message."""
    grace_period_s: float = 30.0
    """On SIGTERM/SIGINT, how long in-flight calls may take to finish."""
    log_json: bool = False
    """One JSON object per log line."""
    log_level: str = "info"
    """debug, info, warning or error."""
    log_payloads: bool = False
    """Log utterance text (off: logs never hold what callers said)."""
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(max_lora_rank=64))
    """The engine's settings (see ``server/engine/config.py``)."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Scale-out on Ray Serve (``switchboard serve --cluster``; see docs/cluster.md)."""

    def __post_init__(self) -> None:
        for name in ("port", "metrics_port", "http_port"):
            value = getattr(self, name)
            if not -1 <= value <= 65535 or (name == "port" and value < 0):
                raise InvalidOption(f"setting {name} must be a port number, got {value}")
        for name in ("max_cpu_adapters", "default_max_new_tokens", "max_message_bytes",
                     "http_max_body_bytes"):
            if getattr(self, name) <= 0:
                raise InvalidOption(f"setting {name} must be > 0, got {getattr(self, name)}")
        for name in ("poll_interval_s", "grace_period_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or not 0 < value <= 86400:
                raise InvalidOption(f"setting {name} must be in (0, 86400] seconds, got {value}")
        if self.http_max_body_bytes > MAX_MESSAGE_BYTES:
            raise InvalidOption(f"setting http_max_body_bytes must be <= {MAX_MESSAGE_BYTES}, "
                                f"got {self.http_max_body_bytes}")
        if self.max_message_bytes > MAX_MESSAGE_BYTES:
            raise InvalidOption(f"setting max_message_bytes must be <= {MAX_MESSAGE_BYTES}, "
                                f"got {self.max_message_bytes}")
        if self.default_max_new_tokens > self.engine.max_new_tokens_limit:
            raise InvalidOption(
                f"setting default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"engine.max_new_tokens_limit ({self.engine.max_new_tokens_limit})"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise InvalidOption("settings tls_cert and tls_key must be given together")
        if self.log_level not in ("debug", "info", "warning", "error"):
            raise InvalidOption(f"setting log_level must be debug, info, warning or error, "
                                f"got {self.log_level!r}")
        if not self.adapter_roots:
            raise InvalidOption("setting adapter_roots must name at least one folder")

    def resolve(self, path: str) -> Path:
        """A configured path; relative ones are taken from the repository root."""
        p = Path(path).expanduser()
        return p if p.is_absolute() else REPO_ROOT / p

    def public_dict(self) -> dict[str, Any]:
        """The resolved settings for the start-up log, secrets masked."""
        data = dataclasses.asdict(self)
        data["api_keys"] = [f"…{k[-2:]}" if len(k) > 8 else "…" for k in self.api_keys]
        data["admin_key"] = "set" if self.admin_key else ""
        return data


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, kind: Any, key: str) -> Any:
    """``value`` (from YAML, env or a flag: maybe a string) as ``kind``, or an error."""
    origin = typing.get_origin(kind)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple):
            raise InvalidOption(f"setting {key} must be a list, got {type(value).__name__}")
        item = typing.get_args(kind)[0]
        return tuple(_coerce(v, item, key) for v in value)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise InvalidOption(f"setting {key} must be true or false, got {str(value)[:20]!r}")
    if kind is int:
        if isinstance(value, bool):
            raise InvalidOption(f"setting {key} must be an integer, got {value}")
        try:
            return int(value) if isinstance(value, int | str) else _bad(key, "an integer", value)
        except ValueError:
            return _bad(key, "an integer", value)
    if kind is float:
        if isinstance(value, bool):
            return _bad(key, "a number", value)
        try:
            number = float(value)
        except (TypeError, ValueError):
            return _bad(key, "a number", value)
        return number if math.isfinite(number) else _bad(key, "a finite number", value)
    if kind is str:
        if isinstance(value, str | int | float) and not isinstance(value, bool):
            return str(value)
        return _bad(key, "a string", value)
    raise InvalidOption(f"setting {key}: unsupported type")


def _bad(key: str, what: str, value: Any) -> Any:
    raise InvalidOption(f"setting {key} must be {what}, got {str(value)[:40]!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = _field_types(cls)
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)
    if unknown:
        raise InvalidOption(
            f"unknown setting {prefix}{unknown[0]!r} (valid: {', '.join(names)})"
        )
    values: dict[str, Any] = {}
    for name, raw in data.items():
        kind = hints[name]
        if dataclasses.is_dataclass(kind):
            if not isinstance(raw, dict):
                raise InvalidOption(f"setting {prefix}{name} must be a mapping")
            values[name] = _build(kind, raw, f"{prefix}{name}.")  # type: ignore[arg-type]
        else:
            values[name] = _coerce(raw, kind, prefix + name)
    try:
        return cls(**values)
    except InvalidOption as exc:
        if prefix and not str(exc).startswith("setting"):
            raise InvalidOption(f"setting {prefix.rstrip('.')}: {exc}") from None
        raise


def _set_nested(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InvalidOption(f"setting {part} is not a section")
        node = child
    node[parts[-1]] = value


def env_overrides(environ: typing.Mapping[str, str]) -> dict[str, Any]:
    """``SWITCHBOARD_PORT=50052`` → ``{"port": "50052"}``; ``__`` separates sections."""
    data: dict[str, Any] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX) and name not in NOT_CONFIG_ENV:
            key = name[len(ENV_PREFIX):].lower().replace("__", ".")
            _set_nested(data, key, value)
    return data


def parse_assignments(pairs: list[str]) -> dict[str, Any]:
    """``["engine.max_loras=16", "log_json=true"]`` → nested dict (values parsed as YAML)."""
    data: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InvalidOption(f"--set expects key=value, got {pair[:40]!r}")
        try:
            parsed = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            parsed = value
        _set_nested(data, key.strip(), parsed)
    return data


def _merge(into: dict[str, Any], extra: dict[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                environ: typing.Mapping[str, str] | None = None) -> ServerConfig:
    """The server configuration: YAML file, then environment, then ``overrides``."""
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml_mapping(path, "config file")
    _merge(data, env_overrides(os.environ if environ is None else environ))
    _merge(data, overrides or {})
    engine = data.get("engine")
    if isinstance(engine, dict) and "max_lora_rank" not in engine:
        engine["max_lora_rank"] = 64  # the server's default differs from the engine's
    config: ServerConfig = _build(ServerConfig, data, "")
    return config
