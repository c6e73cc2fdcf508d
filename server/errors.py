"""Domain errors, defined once for the whole product.

Every error carries a one-line message that names the problem; the CLI prints it as
``error: <message>`` and the gRPC service maps each class to one status code in one
place (``server/service/status.py``). Messages never quote more than a short slice of user input.
"""

from __future__ import annotations

MAX_QUOTED_CHARS = 80


def quote(value: object, limit: int = MAX_QUOTED_CHARS) -> str:
    """repr() of ``value`` cut to ``limit`` characters, for error messages."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SwitchboardError(Exception):
    """Base of every error Switchboard raises on purpose."""

    def __init__(self, message: str) -> None:
        # One line: callers print this verbatim, logs index it.
        super().__init__(" ".join(message.split("\n")))


class InvalidOption(SwitchboardError):
    """A setting has a value outside its documented set (quantize, dtype, device...)."""


class DeviceUnavailable(SwitchboardError):
    """The requested accelerator is not present on this machine."""


class BaseModelNotFound(SwitchboardError):
    """The base-model source is neither an HF folder, a .gguf file nor 'default'."""


class UnsupportedArchitecture(SwitchboardError):
    """The base model is not a LLaMA-family model with the linear layers LoRA targets."""




class PromptTemplateError(SwitchboardError):
    """A prompt template does not hold exactly one ``{text}`` placeholder."""


class InvalidRequest(SwitchboardError):
    """A generation request has a field outside its allowed range; the message names it.

    ``param`` is that field's name where one field is at fault (the HTTP API reports it
    in the OpenAI error body; each front-end renames it to its own field names).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFull(SwitchboardError):
    """The engine's wait queue is at its limit; the caller may retry later."""


class AdapterNotFound(SwitchboardError):
    """No adapter of that name (or no adapter files at that path)."""


class InvalidAdapterName(InvalidRequest):
    """An adapter name is not a plain identifier ``[a-z0-9][a-z0-9_-]{0,63}``."""


class AdapterIncompatible(SwitchboardError):
    """An adapter exists but is refused; each subclass is one reason, named in the message."""


class ManifestError(AdapterIncompatible):
    """A switchboard.json manifest is missing, unparsable or has a bad field."""


class AdapterConfigError(AdapterIncompatible):
    """adapter_config.json is missing, unparsable or not a LoRA config."""


class AdapterPickleRefused(AdapterIncompatible):
    """Weights come as pickle (.bin), which can run code when loaded."""


class AdapterCorrupt(AdapterIncompatible):
    """adapter_model.safetensors is missing, truncated or not valid safetensors."""


class AdapterDigestMismatch(AdapterIncompatible):
    """The weight files are not the ones whose sha256 the manifest records."""


class AdapterTargetMismatch(AdapterIncompatible):
    """The adapter targets modules the base model does not have (or does not serve)."""


class AdapterShapeMismatch(AdapterIncompatible):
    """A LoRA matrix does not fit the base layer it targets."""


class AdapterRankError(AdapterIncompatible):
    """Rank 0, negative, or above max_lora_rank."""


class AdapterNonFinite(AdapterIncompatible):
    """The weights hold NaN or infinite values."""


class AdapterBaseMismatch(AdapterIncompatible):
    """The manifest's base_fingerprint is not the loaded base model's."""


class AdapterUnsupportedOption(AdapterIncompatible):
    """A PEFT option that changes the math and is not served (DoRA, modules_to_save...)."""


class AdapterRefused(AdapterIncompatible):
    """The adapter folder is outside the configured roots (e.g. a symlink leading out)."""


class EngineStopped(SwitchboardError):
    """The engine is shutting down or stopped and takes no new requests."""


class EngineFault(SwitchboardError):
    """An unexpected failure inside an engine step; only the rows of that step end."""


class ServiceUnavailable(SwitchboardError):
    """The server is starting or shutting down; the caller may retry elsewhere or later."""


class Unauthenticated(SwitchboardError):
    """A call lacks a valid API key."""


class PermissionDenied(SwitchboardError):
    """A call's key is valid but not for this rpc (admin rpcs need the admin key)."""


class DeadlineExceeded(SwitchboardError):
    """The caller's deadline passed before the call finished."""


class CallCancelled(SwitchboardError):
    """The call was cancelled (by its client, or when its engine row was ended)."""


class InternalError(SwitchboardError):
    """A bug or an unexpected failure; the message holds the request id, never a traceback."""
