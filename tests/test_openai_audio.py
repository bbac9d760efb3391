"""Audio (issue 27, item 3) with the real ``openai`` SDK against the proxy and the mock: speech
priced per character (binary, streamed to a file) and per token (``sse``), transcriptions of
a WAV and an MP3 generated here, per second (``whisper-1``) and per token (streamed too), a
translation, and uploads whose duration cannot be read refused with a 400 before the
upstream. Books exact to the nano against the mock's reported usage."""

from __future__ import annotations

import io
import math
import time
import wave
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from conftest import Proxy, eventually, usage_record

from proxy.catalog.pricing import cost_nano
from proxy.config import ModelConfig, PriceConfig
from proxy.dialects.openai_audio import AUDIO_TOKENS_PER_SECOND
from proxy.gateway.state import GATEWAY
from proxy.tools.mock.records import REPORTED

P = "bp:{o:acme}:"
MODELS = [
    ModelConfig(name="gpt-4o-mini", upstream="mock", max_output_tokens=1000),
    ModelConfig(  # $15 per 1M characters
        name="tts-1", upstream="mock", kind="speech", price=PriceConfig(input="15", output="0")
    ),
    ModelConfig(name="gpt-4o-mini-tts", upstream="mock", kind="speech", max_output_tokens=2000),
    ModelConfig(  # $0.006 a minute: $0.0001 a second, 100 per 1M seconds
        name="whisper-1",
        upstream="mock",
        kind="transcription",
        price=PriceConfig(input="100", output="0"),
    ),
    ModelConfig(
        name="gpt-4o-transcribe", upstream="mock", kind="transcription", max_output_tokens=500
    ),
]


def wav(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(rate)
        writer.writeframes(b"\x00\x00" * int(rate * seconds))
    return out.getvalue()


def mp3(frames: int) -> bytes:
    """Silent MPEG-1 Layer III frames, 128 kb/s at 44.1 kHz mono: 1152 samples (26.1 ms)
    each."""
    return (b"\xff\xfb\x90\xc0" + b"\x00" * 413) * frames


@pytest.fixture
async def proxy(start_proxy: Any) -> Proxy:
    started: Proxy = await start_proxy(models=MODELS)
    return started


async def records(store: aioredis.Redis, count: int) -> list[dict[str, Any]]:
    async def settled() -> bool:
        return int(await store.xlen(P + "usage")) >= count

    await eventually(settled, what="settle")
    return [usage_record(fields) for _, fields in await store.xrange(P + "usage")]


def reported(proxy: Proxy) -> list[Any]:
    mock_app: web.Application = proxy.mock.app
    answers = mock_app[REPORTED]
    return list(answers)


def price(proxy: Proxy, model: str, inp: int, out: int) -> int:
    route = proxy.app[GATEWAY].routes.get(model)
    assert route is not None
    return cost_nano(route.price, inp, out)


async def test_speech_per_character_streams_binary_to_a_file_and_is_charged_exactly(
    proxy: Proxy, store: aioredis.Redis, tmp_path: Path
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    text = "The quick brown fox jumps over the lazy dog."
    target = tmp_path / "speech.mp3"
    async with client.audio.speech.with_streaming_response.create(
        model="tts-1", voice="alloy", input=text
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        await response.stream_to_file(target)
    assert target.read_bytes() == b"ID3\x04" + b"\x00" * (16 * len(text))
    [usage] = reported(proxy)
    [record] = await records(store, 1)
    assert (record["endpoint"], record["in"], record["out"]) == ("audio/speech", len(text), 0)
    assert usage.prompt_tokens == len(text)
    assert record["cost_nano"] == price(proxy, "tts-1", len(text), 0) == 15_000 * len(text)


async def test_binary_speech_is_relayed_as_it_arrives_not_buffered(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    text = "x" * 1024  # 16 kB of audio: four writes, 300 ms apart
    headers = {"Authorization": f"Bearer {key}", "x-mock-chunk-delay-ms": "300"}
    body = {"model": "tts-1", "voice": "alloy", "input": text}
    async with proxy.session.post(
        proxy.url + "/v1/audio/speech", json=body, headers=headers
    ) as response:
        assert response.headers["Content-Type"] == "audio/mpeg"
        started = time.monotonic()
        first = await response.content.readany()
        first_at = time.monotonic() - started
        rest = await response.read()
        total = time.monotonic() - started
    assert len(first) + len(rest) == 4 + 16 * len(text)
    assert first_at < 0.3 < total, (first_at, total)


async def test_speech_per_token_settles_from_the_sse_usage(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    async with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="alloy",
        input="hello there friend",
        stream_format="sse",
        extra_headers={"x-mock-output-tokens": "321"},
    ) as response:
        body = await response.read()
    assert b"speech.audio.done" in body
    [usage] = reported(proxy)
    [record] = await records(store, 1)
    assert (record["in"], record["out"]) == (usage.prompt_tokens, 321)
    assert record["cost_nano"] == price(proxy, "gpt-4o-mini-tts", usage.prompt_tokens, 321)


@pytest.mark.parametrize(
    ("name", "audio", "seconds"),
    [("a.wav", wav(3.2), 4), ("a.mp3", mp3(115), 3)],  # 115 frames: 3.0 s
)
async def test_whisper_transcribes_a_wav_and_an_mp3_charged_per_second(
    proxy: Proxy, store: aioredis.Redis, name: str, audio: bytes, seconds: int
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    answer = await client.audio.transcriptions.create(model="whisper-1", file=(name, audio))
    assert answer.text
    [usage] = reported(proxy)
    assert usage.prompt_tokens == seconds
    [record] = await records(store, 1)
    assert (record["endpoint"], record["in"], record["out"]) == (
        "audio/transcriptions",
        seconds,
        0,
    )
    assert record["cost_nano"] == price(proxy, "whisper-1", seconds, 0) == seconds * 100_000


async def test_token_transcription_settles_from_usage_buffered_and_streamed(
    proxy: Proxy, store: aioredis.Redis
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    mock = {"x-mock-output-tokens": "12", "x-mock-audio-tokens": "9"}
    await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("a.wav", wav(2.5)), extra_headers=mock
    )
    stream = await client.audio.transcriptions.create(
        model="gpt-4o-transcribe", file=("b.mp3", mp3(77)), stream=True, extra_headers=mock
    )
    kinds = [event.type async for event in stream]
    assert kinds[-1] == "transcript.text.done" and "transcript.text.delta" in kinds
    await client.audio.translations.create(model="whisper-1", file=("c.wav", wav(1.0)))
    got = await records(store, 3)
    usages = reported(proxy)
    assert [u.prompt_tokens for u in usages] == [27, 27, 1]  # 3 s x 9; 2.01 s -> 3 s x 9; 1 s
    for record, usage in zip(got, usages, strict=True):
        assert (record["in"], record["out"]) == (usage.prompt_tokens, usage.completion_tokens)
        assert record["cost_nano"] == price(
            proxy, record["model"], usage.prompt_tokens, usage.completion_tokens
        )
    assert [r["endpoint"] for r in got][-1] == "audio/translations"


async def test_an_upload_without_a_readable_duration_is_refused_before_the_upstream(
    proxy: Proxy,
) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    for model in ("whisper-1", "gpt-4o-transcribe"):
        with pytest.raises(openai.BadRequestError) as refused:
            await client.audio.transcriptions.create(model=model, file=("a.wav", b"RIFFnope"))
        assert refused.value.code == "invalid_audio" and refused.value.param == "file"
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("model", "whisper-1")
    async with proxy.session.post(
        proxy.url + "/v1/audio/transcriptions",
        data=data(),
        headers={"Authorization": f"Bearer {key}"},
    ) as response:
        answer = await response.json()
        assert response.status == 400 and answer["error"]["param"] == "file", answer
    assert reported(proxy) == []


async def test_a_token_transcription_reserves_its_duration_bound(proxy: Proxy) -> None:
    """A budget below the bound of a long upload refuses it before the upstream."""
    kid, key = await proxy.create_key("acme")
    bound = 60 * AUDIO_TOKENS_PER_SECOND + 500
    status, answer = await proxy.admin(
        "PUT",
        f"/api/v1/llm/budgets/apikey/{kid}",
        {
            "period": "daily",
            "limit_kind": "tokens",
            "limit": bound - 1,
            "thresholds": [{"pct": 100, "action": "block"}],
        },
    )
    assert status == 200, answer
    client = proxy.openai(key)
    with pytest.raises(openai.RateLimitError):
        await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", wav(60)))
    await client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", wav(59)))
    assert math.ceil(59) * AUDIO_TOKENS_PER_SECOND + 500 < bound


async def test_a_form_names_the_model_as_its_upstream_knows_it(start_proxy: Any) -> None:
    """Only the ``model`` field changes on the way upstream."""
    aliased = ModelConfig(
        name="house-whisper",
        upstream="mock",
        upstream_model="whisper-1",
        kind="transcription",
        price=PriceConfig(input="100", output="0"),
    )
    proxy: Proxy = await start_proxy(models=[*MODELS, aliased])
    _, key = await proxy.create_key("acme")
    audio = wav(2.0)
    answer = await proxy.openai(key).audio.transcriptions.create(
        model="house-whisper", file=("a.wav", audio)
    )
    assert answer.text
    [usage] = reported(proxy)
    assert (usage.model, usage.prompt_tokens) == ("whisper-1", 2)
