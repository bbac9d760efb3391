"""OpenAI's Responses API as the mock speaks it. A request whose cap cuts the output ends as
OpenAI's does: ``status "incomplete"`` with ``incomplete_details``, streamed as a
``response.incomplete`` event instead of ``response.completed``. Both carry usage."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

from aiohttp import web

from proxy.tools.mock.controls import BadRequest, answer_tokens, requested_cap
from proxy.tools.mock.core import Handler, Mock, error_response, stream_answer
from proxy.tools.mock.openai import content_words
from proxy.tools.mock.text import dumps, visible_words_json, words_text


def _responses_prompt_tokens(value: Any) -> int:
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        total = 0
        for item in value:
            if isinstance(item, str):
                total += len(item.split())
            elif isinstance(item, dict):
                total += content_words(item.get("content"))
        return total
    raise BadRequest("'input' must be a string or an array", "input")


def _event(kind: str, seq: itertools.count[int], **fields: Any) -> bytes:
    data = json.dumps({"type": kind, "sequence_number": next(seq), **fields}, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


class Responses:
    """The handler of ``/v1/responses`` (and Azure's paths to it)."""

    def __init__(self, mock: Mock) -> None:
        self.mock = mock

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", "/v1/responses", self.responses),
            ("POST", "/openai/responses", self.responses),
            ("POST", "/openai/v1/responses", self.responses),
        ]

    async def responses(self, request: web.Request) -> web.StreamResponse:
        begun = await self.mock.begin(request)
        if isinstance(begun, web.Response):
            return begun
        plan, body = begun
        try:
            if "input" not in body:
                raise BadRequest("'input' is required", "input")
            prompt = _responses_prompt_tokens(body["input"])
            tokens = answer_tokens(plan, prompt, requested_cap(body, ("max_output_tokens",)))
        except BadRequest as exc:
            return error_response(400, exc.message, param=exc.param)
        ident, msg_id = self.mock.next_id("resp_"), self.mock.next_id("msg_")
        text = words_text(tokens.visible)
        final_part = {"type": "output_text", "text": text, "annotations": []}
        message = {
            "id": msg_id,
            "type": "message",
            "status": "incomplete" if tokens.capped else "completed",
            "role": "assistant",
            "content": [final_part],
        }
        response: dict[str, Any] = {
            "id": ident,
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete" if tokens.capped else "completed",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if tokens.capped else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": body["model"],
            "output": [message],
            "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None},
            "store": body.get("store", True),
            "temperature": body.get("temperature", 1.0),
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": body.get("top_p", 1.0),
            "truncation": "disabled",
            "usage": None if plan.omit_usage else tokens.responses_usage(),
            "user": None,
            "metadata": body.get("metadata") or {},
        }
        if response["store"]:
            self.mock.store_response(response, body["input"])
        streamed = bool(body.get("stream"))
        if not plan.omit_usage and (not streamed or plan.fail_after_chunks is None):
            self.mock.report(request, body["model"], tokens)
        if not streamed:
            return web.Response(body=dumps(response), content_type="application/json")

        seq = itertools.count()
        started = {
            **response,
            "status": "in_progress",
            "incomplete_details": None,
            "output": [],
            "usage": None,
        }
        item_ref = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        empty_item = {**message, "status": "in_progress", "content": []}
        empty_part = {"type": "output_text", "text": "", "annotations": []}
        pre = [
            _event("response.created", seq, response=started),
            _event("response.in_progress", seq, response=started),
            _event("response.output_item.added", seq, output_index=0, item=empty_item),
            _event("response.content_part.added", seq, **item_ref, part=empty_part),
        ]
        delta_head = (
            'event: response.output_text.delta\ndata: {"type":"response.output_text.delta",'
            '"sequence_number":'
        )
        delta_mid = f',"item_id":"{msg_id}","output_index":0,"content_index":0,"delta":'
        chunks = [
            f'{delta_head}{next(seq)}{delta_mid}{w},"logprobs":[]}}\n\n'.encode()
            for w in visible_words_json(tokens.visible)
        ]
        last = "response.incomplete" if tokens.capped else "response.completed"
        trailer = [
            _event("response.output_text.done", seq, **item_ref, text=text, logprobs=[]),
            _event("response.content_part.done", seq, **item_ref, part=final_part),
            _event("response.output_item.done", seq, output_index=0, item=message),
            _event(last, seq, response=response),
        ]
        return await stream_answer(request, plan, pre, chunks, trailer)
