"""Offline encodings and prompt counting (proxy.catalog.tokenizer)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry
from tiktoken_ext import openai_public

from proxy.catalog import tokenizer
from proxy.catalog.tokenizer import (
    IMAGE_TOKENS,
    EncodingUnavailable,
    count_chat_prompt,
    count_completion_prompt,
    count_embedding_input,
    count_prompt,
    count_responses_input,
    count_text,
    get_encoding,
    preload,
)

# The example of OpenAI's cookbook "How to count tokens with tiktoken", section 6.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# Section 7 of the same cookbook.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


@pytest.fixture
def fresh_cache() -> Iterator[None]:
    """Force real loads, and do not leak patched encodings into other tests."""
    get_encoding.cache_clear()
    yield
    get_encoding.cache_clear()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """tiktoken can neither download nor find anything in its (empty) cache directory."""

    def refuse(blobpath: str) -> bytes:
        raise ConnectionError(f"network disabled in tests: {blobpath}")

    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tiktoken.load, "read_file", refuse)
    return cache


@pytest.fixture(scope="module")
def o200k() -> tiktoken.Encoding:
    return get_encoding("o200k_base")


@pytest.fixture(scope="module")
def cl100k() -> tiktoken.Encoding:
    return get_encoding("cl100k_base")


# --- loading ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("fresh_cache", "no_network")
def test_vendored_encodings_load_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_registry(name: str) -> tiktoken.Encoding:
        raise AssertionError(f"vendored {name} must not go through tiktoken's registry")

    monkeypatch.setattr(tiktoken, "get_encoding", no_registry)
    assert get_encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert get_encoding("o200k_base") is get_encoding("o200k_base")  # cached


def test_known_token_ids(o200k: tiktoken.Encoding, cl100k: tiktoken.Encoding) -> None:
    # Figures published in the cookbook's compare_encodings("お誕生日おめでとう").
    text = "お誕生日おめでとう"
    assert cl100k.encode_ordinary(text) == [
        33334,
        45918,
        243,
        21990,
        9080,
        33334,
        62004,
        16556,
        78699,
    ]
    assert o200k.encode_ordinary(text) == [8930, 9697, 243, 128225, 8930, 17693, 4344, 48669]
    assert o200k.n_vocab == 200019
    assert cl100k.n_vocab == 100277


@pytest.mark.parametrize("name", ["cl100k_base", "o200k_base"])
def test_identical_to_tiktoken_constructor(
    name: str, monkeypatch: pytest.MonkeyPatch, no_network: Path
) -> None:
    """Run tiktoken's own constructor with its rank-file loader stubbed out, and compare."""
    ours = get_encoding(name)
    asked: list[str | None] = []

    def fake_load(path: str, expected_hash: str | None = None) -> dict[bytes, int]:
        asked.append(expected_hash)
        return ours._mergeable_ranks

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    assert asked == [tokenizer._VENDORED[name].sha256]
    assert set(spec) == {"name", "pat_str", "mergeable_ranks", "special_tokens"}
    assert ours.name == spec["name"]
    assert ours._pat_str == spec["pat_str"]
    assert ours._special_tokens == spec["special_tokens"]
    decompressed = gzip.decompress(
        (tokenizer._ENCODINGS_DIR / tokenizer._VENDORED[name].filename).read_bytes()
    )
    assert hashlib.sha256(decompressed).hexdigest() == asked[0]


@pytest.mark.usefixtures("fresh_cache", "no_network")
@pytest.mark.parametrize("damage", ["flipped-byte", "truncated-gzip", "missing"])
def test_corrupted_vendored_file_refused(
    damage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    copy = tmp_path / "encodings"
    shutil.copytree(tokenizer._ENCODINGS_DIR, copy)
    target = copy / "o200k_base.tiktoken.gz"
    if damage == "flipped-byte":
        data = bytearray(gzip.decompress(target.read_bytes()))
        data[1000] ^= 0x01
        target.write_bytes(gzip.compress(bytes(data)))
    elif damage == "truncated-gzip":
        target.write_bytes(target.read_bytes()[:5000])
    else:
        target.unlink()
    monkeypatch.setattr(tokenizer, "_ENCODINGS_DIR", copy)
    with pytest.raises(EncodingUnavailable) as info:
        get_encoding("o200k_base")
    assert info.value.name == "o200k_base"
    if damage == "flipped-byte":
        assert "sha256" in str(info.value)
    assert get_encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]


@pytest.mark.usefixtures("fresh_cache", "no_network")
@pytest.mark.parametrize("name", ["no_such_encoding", "r50k_base"])
def test_unavailable_encoding(name: str) -> None:
    """Unknown to tiktoken, or known but neither cached nor downloadable."""
    with pytest.raises(EncodingUnavailable, match="TIKTOKEN_CACHE_DIR") as info:
        get_encoding(name)
    assert info.value.name == name
    with pytest.raises(EncodingUnavailable):
        preload(["o200k_base", name])


@pytest.mark.usefixtures("fresh_cache")
def test_other_encodings_come_from_tiktoken_cache_dir(
    monkeypatch: pytest.MonkeyPatch, no_network: Path
) -> None:
    """A deployment provides a non-vendored encoding by filling TIKTOKEN_CACHE_DIR."""
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    rank_file = gzip.decompress((tokenizer._ENCODINGS_DIR / "o200k_base.tiktoken.gz").read_bytes())
    (no_network / hashlib.sha1(url.encode()).hexdigest()).write_bytes(rank_file)  # noqa: S324
    harmony = get_encoding("o200k_harmony")
    assert harmony.name == "o200k_harmony"
    assert harmony.encode_ordinary("hello world") == [24912, 2375]


@pytest.mark.usefixtures("fresh_cache")
def test_preload_warms_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    preload(["o200k_base", "cl100k_base", "o200k_base"])
    assert get_encoding.cache_info().currsize == 2
    loads: list[str] = []
    monkeypatch.setattr(tokenizer, "_load_vendored", lambda name, spec: loads.append(name))
    get_encoding("o200k_base")
    assert loads == []


# --- text -----------------------------------------------------------------------------------------


def test_special_tokens_in_user_text_are_ordinary_text(o200k: tiktoken.Encoding) -> None:
    text = "<|endoftext|> and <|endofprompt|>"
    assert count_text(o200k, text) == len(o200k.encode_ordinary(text)) > 2
    assert count_text(o200k, "") == 0
    assert count_text(o200k, "lone surrogate \ud800 here") > 0


# --- chat -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("encoding", "published"), [("cl100k_base", 129), ("o200k_base", 124)])
def test_chat_matches_cookbook(encoding: str, published: int) -> None:
    """129 for gpt-3.5-turbo / gpt-4 (cl100k), 124 for gpt-4o / gpt-4o-mini (o200k): both the
    cookbook's function and the API's reported prompt_tokens."""
    assert count_chat_prompt(get_encoding(encoding), {"messages": COOKBOOK_MESSAGES}) == published


def test_chat_tools_overestimate_cookbook(
    o200k: tiktoken.Encoding, cl100k: tiktoken.Encoding
) -> None:
    """The API reported 101 (gpt-4o) and 105 (gpt-4) prompt tokens for this request; the compact
    JSON estimate gives 111 with both encodings: on the safe side, and close."""
    body = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
    assert count_chat_prompt(o200k, body) == 111
    assert count_chat_prompt(cl100k, body) == 111
    legacy = {"messages": COOKBOOK_TOOL_MESSAGES, "functions": [COOKBOOK_TOOLS[0]["function"]]}
    assert count_chat_prompt(o200k, legacy) == 111


def test_chat_parts_images_names_and_tool_calls(o200k: tiktoken.Encoding) -> None:
    def n(text: str) -> int:
        return len(o200k.encode_ordinary(text))

    plain = {"messages": [{"role": "user", "content": "Describe this picture, please."}]}
    parts = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this picture, please."},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/x.png"}},
                    {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}},
                ],
            }
        ]
    }
    assert (
        count_chat_prompt(o200k, plain) == 3 + n("user") + n("Describe this picture, please.") + 3
    )
    assert count_chat_prompt(o200k, parts) == count_chat_prompt(o200k, plain) + 2 * IMAGE_TOKENS

    call = {"name": "get_current_weather", "arguments": '{"location":"Paris"}'}
    conversation = {
        "messages": [
            {"role": "user", "name": "alice", "content": "Weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]
    }
    expected = (
        (3 + n("user") + n("alice") + 1 + n("Weather?"))
        + (3 + n("assistant") + n("get_current_weather") + n('{"location":"Paris"}'))
        + (3 + n("tool") + n("call_1") + n("sunny"))
        + 3
    )
    assert count_chat_prompt(o200k, conversation) == expected


MALFORMED_BODIES: list[Any] = [
    None,
    [],
    "text",
    {},
    {"messages": None},
    {"messages": "hello"},
    {"messages": {"role": "user"}},
    {
        "messages": [
            None,
            1,
            "x",
            [],
            {},
            {"content": None},
            {"role": 5, "name": None, "content": 3.5},
            {"content": [None, 1, "bare string", [], {"type": "text", "text": None}, {}]},
            {"content": [{"type": "image_url"}, {"type": "refusal", "refusal": 7}]},
            {
                "tool_calls": [
                    None,
                    1,
                    {"function": None},
                    {"function": {"name": 1, "arguments": {}}},
                ]
            },
            {"tool_calls": "x", "function_call": "y"},
        ],
        "tools": [None, 1, "x", {"function": "x"}, {"type": "web_search"}],
        "functions": "x",
    },
    {"messages": [], "tools": {"not": "a list"}, "functions": [None, 1, {"a": float("nan")}]},
    {"prompt": [None, 1.5, {"x": 1}, [1, "a", None], ["a"], True], "suffix": 3},
    {"prompt": {"x": "y"}, "input": 12},
    {"input": [[1, 2], None, "a", 4.0]},
    {"instructions": 5, "input": [None, 1, "raw", {"type": "message", "content": None}]},
    {
        "input": [
            {"type": "function_call", "name": None, "arguments": 3},
            {"type": "function_call_output", "output": {"x": 1}},
            {"type": "reasoning", "summary": "not a list"},
            {"type": "unknown_item", "text": "ignored"},
            {"role": "user", "content": [{"type": "input_file", "file_data": "JVBER"}]},
        ],
        "tools": "x",
    },
]


@pytest.mark.parametrize("body", MALFORMED_BODIES)
@pytest.mark.parametrize("endpoint", ["chat/completions", "completions", "embeddings", "responses"])
async def test_malformed_bodies_never_raise(
    body: Any, endpoint: str, o200k: tiktoken.Encoding
) -> None:
    count = await count_prompt(o200k, endpoint, body)
    assert isinstance(count, int)
    assert count >= 0


# --- completions / embeddings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "hello"], 3),
        ([24912, 2375, 13], 3),
        ([[24912, 2375], [13]], 3),
        ([], 0),
        (None, 0),
        ("", 0),
    ],
)
def test_completion_and_embedding_shapes(
    value: Any, expected: int, o200k: tiktoken.Encoding
) -> None:
    assert count_completion_prompt(o200k, {"prompt": value}) == expected
    assert count_embedding_input(o200k, {"input": value}) == expected


def test_completion_counts_suffix(o200k: tiktoken.Encoding) -> None:
    assert count_completion_prompt(o200k, {"prompt": "hello", "suffix": " world"}) == 2


# --- responses ------------------------------------------------------------------------------------


def test_responses_input(o200k: tiktoken.Encoding) -> None:
    def n(text: str) -> int:
        return len(o200k.encode_ordinary(text))

    simple = {"instructions": "Be brief.", "input": "Hi there"}
    as_chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
        ]
    }
    assert count_responses_input(o200k, simple) == count_chat_prompt(o200k, as_chat)
    tool = {
        "type": "function",
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
    }
    body = {
        "input": [
            {"role": "user", "content": "Define 'gateway'."},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Calling the tool."}],
            },
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "lookup",
                "arguments": '{"word":"x"}',
            },
            {"type": "function_call_output", "call_id": "c1", "output": "a door"},
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "And this?"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"},
                ],
            },
        ],
        "tools": [tool],
    }
    expected = (
        (3 + n("user") + n("Define 'gateway'."))
        + (3 + n("assistant") + n("Calling the tool."))
        + (n("lookup") + n('{"word":"x"}'))
        + n("a door")
        + (3 + n("user") + n("And this?") + IMAGE_TOKENS)
        + 3
        + n(
            '{"type":"function","name":"lookup","description":"Look a word up",'
            '"parameters":{"type":"object","properties":{"word":{"type":"string"}}}}'
        )
    )
    assert count_responses_input(o200k, body) == expected


# --- count_prompt ---------------------------------------------------------------------------------


@pytest.fixture
def to_thread_calls(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    real = asyncio.to_thread

    async def spy(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        calls.append(func)
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    return calls


async def test_count_prompt_dispatches_inline_for_small_bodies(
    o200k: tiktoken.Encoding, to_thread_calls: list[object]
) -> None:
    chat = {"messages": COOKBOOK_MESSAGES}
    assert await count_prompt(o200k, "chat/completions", chat) == 124
    assert await count_prompt(o200k, "completions", {"prompt": "hello world"}) == 2
    assert await count_prompt(o200k, "embeddings", {"input": [[1, 2, 3]]}) == 3
    assert await count_prompt(o200k, "responses", {"input": "hi"}) == count_responses_input(
        o200k, {"input": "hi"}
    )
    assert to_thread_calls == []
    with pytest.raises(ValueError, match="endpoint"):
        await count_prompt(o200k, "images/generations", {})


async def test_count_prompt_offloads_large_bodies(
    o200k: tiktoken.Encoding, to_thread_calls: list[object]
) -> None:
    body = {"messages": [{"role": "user", "content": "word " * 200_000}]}
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    counted = await count_prompt(o200k, "chat/completions", body)
    during = ticks - before
    stop.set()
    await task

    assert counted == count_chat_prompt(o200k, body) > 200_000
    assert to_thread_calls == [tokenizer.count_chat_prompt]
    assert during > 0  # the event loop kept running other tasks while the prompt was counted


async def test_long_token_id_arrays_are_offloaded(
    o200k: tiktoken.Encoding, to_thread_calls: list[object]
) -> None:
    body = {"input": [list(range(1000))] * 100}
    assert await count_prompt(o200k, "embeddings", body) == 100_000
    assert len(to_thread_calls) == 1


# --- counts of long texts are remembered --------------------------------------------------------


class CountingEncoding:
    """The real encoding, counting how often text is actually encoded."""

    def __init__(self, enc: tiktoken.Encoding) -> None:
        self.name = enc.name
        self._enc = enc
        self.encoded = 0

    def encode_ordinary(self, text: str) -> list[int]:
        self.encoded += 1
        return self._enc.encode_ordinary(text)

    @property
    def encoding(self) -> tiktoken.Encoding:
        """This, as what ``count_text`` takes: it reads only ``name`` and ``encode_ordinary``."""
        return cast(tiktoken.Encoding, self)


def history(seed: str, chars: int = tokenizer.CACHED_MIN_CHARS + 100) -> str:
    words = f"{seed} the proxy counts every message of a long conversation "
    return (words * (chars // len(words) + 1))[:chars]


def test_a_resent_long_message_is_encoded_once(o200k: tiktoken.Encoding) -> None:
    counting = CountingEncoding(o200k)
    text = history("resent-7f3a")
    first = count_text(counting.encoding, text)
    # An equal, distinct object:
    again = count_text(counting.encoding, "".join([text[:10], text[10:]]))
    assert first == again == len(o200k.encode_ordinary(text))
    assert counting.encoded == 1


def test_an_edited_long_message_is_counted_afresh(o200k: tiktoken.Encoding) -> None:
    counting = CountingEncoding(o200k)
    text = history("edited-91c2")
    edited = text[:-20] + "x" * 20  # same length, different text
    assert count_text(counting.encoding, text) == len(o200k.encode_ordinary(text))
    assert count_text(counting.encoding, edited) == len(o200k.encode_ordinary(edited))
    assert counting.encoded == 2


def test_short_texts_are_not_remembered(o200k: tiktoken.Encoding) -> None:
    counting = CountingEncoding(o200k)
    text = history("short-55d0", chars=tokenizer.CACHED_MIN_CHARS - 1)
    for _ in range(2):
        count_text(counting.encoding, text)
    assert counting.encoded == 2


def test_remembered_counts_are_bounded(
    o200k: tiktoken.Encoding, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenizer, "_CACHED_MAX", 8)
    monkeypatch.setattr(tokenizer, "_counts", {})
    counting = CountingEncoding(o200k)
    texts = [history(f"bounded-{n}") for n in range(12)]
    for text in texts:
        count_text(counting.encoding, text)
    assert len(tokenizer._counts) == 8
    count_text(counting.encoding, texts[-1])  # among the newest: remembered
    count_text(counting.encoding, texts[0])  # the oldest: evicted, encoded again
    assert counting.encoded == 12 + 1
