"""Stored responses (issue 27, item 4) through the real ``openai`` SDK: read back, listed,
cancelled and deleted by the org that created them; another org's id answers 404 and never
reaches the upstream."""

from __future__ import annotations

import openai
import pytest
from conftest import Proxy, eventually


async def test_a_stored_response_is_read_back_by_its_org_only(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    _, colleague = await proxy.create_key("acme")
    _, stranger = await proxy.create_key("other")
    mine = proxy.openai(key)
    created = await mine.responses.create(model="gpt-4o-mini", input="hello there")

    async def noted() -> bool:
        try:
            await mine.responses.retrieve(created.id)
        except openai.NotFoundError:
            return False
        return True

    await eventually(noted, what="the stored response noted")
    again = await proxy.openai(colleague).responses.retrieve(created.id)
    assert again.id == created.id and again.output_text == created.output_text
    items = await mine.responses.input_items.list(created.id)
    assert [item.type for item in items.data] == ["message"]
    with pytest.raises(openai.BadRequestError):  # not a background response: the upstream's
        await mine.responses.cancel(created.id)

    upstream_calls = len(proxy.received())
    theirs = proxy.openai(stranger)
    with pytest.raises(openai.NotFoundError) as hidden:
        await theirs.responses.retrieve(created.id)
    assert hidden.value.code == "response_not_found"
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.input_items.list(created.id)
    with pytest.raises(openai.NotFoundError):
        await theirs.responses.cancel(created.id)
    assert len(proxy.received()) == upstream_calls  # none of those was forwarded

    await mine.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await mine.responses.retrieve(created.id)


async def test_streamed_responses_are_noted_and_unstored_ones_are_not(proxy: Proxy) -> None:
    _, key = await proxy.create_key("acme")
    client = proxy.openai(key)
    stream = await client.responses.create(model="gpt-4o-mini", input="hi", stream=True)
    ids = {event.response.id async for event in stream if event.type == "response.completed"}
    [streamed] = ids

    async def noted() -> bool:
        try:
            await client.responses.retrieve(streamed)
        except openai.NotFoundError:
            return False
        return True

    await eventually(noted, what="the streamed response noted")
    unstored = await client.responses.create(model="gpt-4o-mini", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve("resp_../../v1/chat")
    with pytest.raises(openai.AuthenticationError):
        await proxy.openai("sk-nope").responses.retrieve(streamed)
