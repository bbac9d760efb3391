"""OpenAI's audio: ``/v1/audio/speech``, ``transcriptions`` and ``translations``.

Which unit a model is priced in follows from its price: a model with no output price is
priced per unit of input — per character for speech (``tts-1``: configure its ``input`` price
per 1M characters), per second of audio for transcription (``whisper-1``: its ``input`` price
per 1M seconds, $0.006 a minute being ``input = "100"``) — and a model with an output price
is priced in tokens (``gpt-4o-mini-tts``, ``gpt-4o-transcribe``).

A transcription's worst case needs the upload's duration, read from its container with
``mutagen`` (WAV, MP3, FLAC, Ogg, M4A/MP4, ...); an upload whose duration cannot be
established is refused with a 400, never guessed. Token-priced transcriptions reserve
``AUDIO_TOKENS_PER_SECOND`` per second of audio plus the prompt and the output cap, and
settle from the reported usage (streamed: the ``transcript.text.done`` event's);
per-second models settle at the reported ``seconds`` (``usage.type: duration``), else at the
duration read. Speech priced per character is charged exactly the input's characters;
priced in tokens, it settles from the usage of an ``sse`` stream, or the whole reservation
for a binary answer (which reports none).
"""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

import mutagen

from proxy.catalog.pricing import reserve_cost_nano
from proxy.catalog.routes import ModelRoute
from proxy.catalog.tokenizer import count_text
from proxy.dialects import openai_usage
from proxy.dialects.base import Reservation, Usage, event_data
from proxy.dialects.form import FormFile
from proxy.errors import bad_request
from proxy.providers.upstream import split_events

SPEECH = "audio/speech"
TRANSCRIBING = frozenset({"audio/transcriptions", "audio/translations"})
AUDIO_TOKENS_PER_SECOND = 20
"""A bound on the input tokens a second of audio costs a token-priced model (OpenAI's audio
models count about 10)."""
MAX_SPEECH_CHARS = 4096
"""OpenAI's own limit on ``input``."""
_OFFLOAD_BYTES = 1 << 20


def per_unit(route: ModelRoute) -> bool:
    """Priced per character or second (no output price), rather than in tokens."""
    return route.price.output_nano_per_m == 0


def _flag(body: dict[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if isinstance(value, str) and value in ("true", "false"):
        return value == "true"
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be a boolean.", param=name)
    return value


def _duration(upload: FormFile) -> float | None:
    try:
        found = mutagen.File(io.BytesIO(upload.data))
    except Exception:
        return None
    length = getattr(getattr(found, "info", None), "length", None)
    if not isinstance(length, int | float) or not math.isfinite(length) or length <= 0:
        return None
    return float(length)


async def seconds_of(body: dict[str, Any]) -> int:
    """The upload's duration in whole seconds (rounded up), or a 400."""
    upload = body.get("file")
    if not isinstance(upload, FormFile):
        raise bad_request("Upload the audio as the 'file' field.", param="file")
    if upload.size > _OFFLOAD_BYTES:
        length = await asyncio.to_thread(_duration, upload)
    else:
        length = _duration(upload)
    if length is None:
        raise bad_request(
            "The duration of the uploaded audio could not be established (a WAV, MP3, FLAC, "
            "Ogg or M4A file is expected), so its cost cannot be bounded.",
            param="file",
            code="invalid_audio",
        )
    return math.ceil(length)


async def reserve(endpoint: str, body: dict[str, Any], route: ModelRoute) -> Reservation:
    if endpoint == SPEECH:
        text = body.get("input")
        if not isinstance(text, str) or not text or len(text) > MAX_SPEECH_CHARS:
            raise bad_request(
                f"'input' must be a string of 1 to {MAX_SPEECH_CHARS} characters.", "input"
            )
        stream = body.get("stream_format", "audio") == "sse"
        if per_unit(route):
            return Reservation(len(text), 0, reserve_cost_nano(route.price, len(text), 0), stream)
        prompt = count_text(route.encoding, text)
        cap = route.max_output_tokens
        return Reservation(prompt, cap, reserve_cost_nano(route.price, prompt, cap), stream)
    seconds = await seconds_of(body)
    stream = _flag(body, "stream")
    if per_unit(route):
        if stream:
            raise bad_request("This model does not stream transcriptions.", param="stream")
        return Reservation(seconds, 0, reserve_cost_nano(route.price, seconds, 0))
    prompt_text = body.get("prompt")
    prompt = seconds * AUDIO_TOKENS_PER_SECOND
    if isinstance(prompt_text, str):
        prompt += count_text(route.encoding, prompt_text)
    cap = route.max_output_tokens
    return Reservation(prompt, cap, reserve_cost_nano(route.price, prompt, cap), stream)


def usage_of(endpoint: str, data: Any) -> Usage | None:
    """Reported usage: tokens, or a transcription's ``{"type": "duration", "seconds": n}``."""
    usage = data.get("usage") if isinstance(data, dict) else None
    if isinstance(usage, dict) and usage.get("type") == "duration":
        seconds = usage.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
            return Usage(math.ceil(seconds), 0)
        return None
    return openai_usage.usage_from_body(endpoint, data)


def buffered_usage(
    endpoint: str, route: ModelRoute, prompt_tokens: int, output_cap: int, data: bytes
) -> Usage:
    """As reported; per-unit models at the units reserved (characters, seconds read); token
    models without usage (a binary or plain-text answer) at the whole reservation."""
    if endpoint == SPEECH and per_unit(route):
        return Usage(prompt_tokens, 0)  # characters: exact, whatever the answer
    parsed: Any = None
    if data[:1] == b"{":
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
    usage = usage_of(endpoint, parsed)
    if usage is not None:
        return usage
    return Usage(prompt_tokens, output_cap, reported=False)


class StreamMeter:
    """A speech (``sse``) or transcription stream: the usage its last event reports, else the
    whole reservation."""

    def __init__(self, endpoint: str, route: ModelRoute, prompt: int, output_cap: int) -> None:
        self.endpoint = endpoint
        self.bound = Usage(prompt, 0 if per_unit(route) else output_cap, reported=False)
        self.exact = endpoint == SPEECH and per_unit(route)
        self.reported: Usage | None = None

    def relay(self, block: bytes) -> bytes:
        if b'"usage"' not in block:
            return block
        for event in split_events(block):
            payload = event_data(event) if b'"usage"' in event else None
            try:
                parsed = json.loads(payload) if payload else None
            except ValueError:
                continue
            usage = usage_of(self.endpoint, parsed)
            if usage is not None:
                self.reported = usage
        return block

    def usage(self) -> Usage:
        if self.exact:
            return Usage(self.bound.input_tokens, 0)
        return self.reported or self.bound
