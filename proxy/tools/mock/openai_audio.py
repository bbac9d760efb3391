"""OpenAI's audio as the mock speaks it. ``/v1/audio/speech``: a fake MP3 body of 16 bytes per
input character (``tts-*`` models report their characters), or with ``stream_format: sse``
``speech.audio.delta`` events and a ``speech.audio.done`` carrying token usage (the input's
words, ``x-mock-output-tokens`` out). Transcriptions and translations: a multipart upload
whose duration is read with ``mutagen``; ``whisper-*`` models report ``{"type": "duration"}``
usage (whole seconds, rounded up), the others tokens (``x-mock-audio-tokens`` per second of
audio, default 10, as input; ``x-mock-output-tokens`` as output), streamed as
``transcript.text.delta`` events and a ``transcript.text.done`` with usage."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
from typing import Any

import mutagen
from aiohttp import web

from proxy.tools.mock.controls import Tokens
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.text import dumps, words_text


def _event(kind: str, **fields: Any) -> bytes:
    return f"data: {json.dumps({'type': kind, **fields}, separators=(',', ':'))}\n\n".encode()


class Audio:
    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/audio/speech", self.speech),
            ("POST", "/v1/audio/transcriptions", self.transcriptions),
            ("POST", "/v1/audio/translations", self.transcriptions),
        ]

    async def speech(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        text, model = body.get("input"), body["model"]
        if not isinstance(text, str) or not text:
            return error_response(400, "'input' is required", param="input")
        if body.get("stream_format") == "sse":
            prompt, output = len(text.split()), plan.output_tokens
            self.mock.report(request, model, Tokens(prompt, 0, output, 0, False))
            chunk = base64.b64encode(b"\x00" * 64).decode()
            deltas = [_event("speech.audio.delta", audio=chunk) for _ in range(4)]
            usage = {"input_tokens": prompt, "output_tokens": output}
            done = _event("speech.audio.done", usage={**usage, "total_tokens": prompt + output})
            return await stream_answer(request, plan, [], deltas, [done])
        if model.startswith("tts-"):
            self.mock.report(request, model, Tokens(len(text), 0, 0, 0, False))
        audio = b"ID3\x04" + b"\x00" * (16 * len(text))
        response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
        await response.prepare(request)
        for at in range(0, len(audio), 4096):  # binary, trickled as a real upstream does
            if at and plan.chunk_delay_s:
                await asyncio.sleep(plan.chunk_delay_s)
            await response.write(audio[at : at + 4096])
        await response.write_eof()
        return response

    async def transcriptions(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request, json_body=False)
        if isinstance(begun, web.Response):
            return begun
        plan, _ = begun
        if not request.content_type.startswith("multipart/form-data"):
            return error_response(400, "expected multipart/form-data")
        form = await request.post()
        upload = form.get("file")
        model = form.get("model")
        if not isinstance(upload, web.FileField) or not isinstance(model, str):
            return error_response(400, "'file' and 'model' are required", param="file")
        try:
            found = mutagen.File(io.BytesIO(upload.file.read()))
            seconds = math.ceil(found.info.length) if found is not None else 0
        except Exception:
            seconds = 0
        if seconds <= 0:
            return error_response(400, "Invalid file format.", param="file")
        text = words_text(plan.output_tokens).strip()
        usage: dict[str, Any]
        if model.startswith("whisper"):
            usage = {"type": "duration", "seconds": seconds}
            self.mock.report(request, model, Tokens(seconds, 0, 0, 0, False))
        else:
            audio_tokens = seconds * int(request.headers.get("x-mock-audio-tokens", "10"))
            output = plan.output_tokens
            usage = {
                "type": "tokens",
                "input_tokens": audio_tokens,
                "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
                "output_tokens": output,
                "total_tokens": audio_tokens + output,
            }
            self.mock.report(request, model, Tokens(audio_tokens, 0, output, 0, False))
        if form.get("stream") == "true":
            deltas = [_event("transcript.text.delta", delta=w) for w in text.split(" ")]
            done = _event("transcript.text.done", text=text, usage=usage)
            return await stream_answer(request, plan, [], deltas, [done])
        if form.get("response_format") == "text":
            return web.Response(text=text, content_type="text/plain")
        answer = dumps({"text": text, "usage": usage})
        return web.Response(body=answer, content_type="application/json")
