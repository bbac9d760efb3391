"""``llm-proxy quote``: what a request would reserve and what would bind (admit, clamp or
refuse), without sending or charging it — ``POST /api/v1/llm/budgets/quote`` from the shell.

    llm-proxy quote key_0123 --model gpt-4o --max-tokens 2000 --prompt "Summarise ..."
    llm-proxy quote key_0123 --body request.json --endpoint messages --end-user alice
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

from proxy.tools.admin_http import AdminError, AdminHttp, add_connection_flags
from proxy.tools.tables import to_json

ENDPOINTS = ("chat/completions", "completions", "embeddings", "responses", "messages")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("api_key_id", help="the key the request would be sent with")
    parser.add_argument("--endpoint", default="chat/completions", choices=ENDPOINTS)
    parser.add_argument("--body", help="a JSON file with the request's body, as sent")
    parser.add_argument("--model", help="without --body: the model")
    parser.add_argument("--prompt", default="", help="without --body: one user message")
    parser.add_argument("--max-tokens", type=int, help="without --body: the output cap")
    parser.add_argument("--end-user", help="the X-On-Behalf-Of the request would carry")
    parser.add_argument("--clamp", action="store_true", help="ask for clamping (x-budget-clamp)")
    parser.add_argument("--json", action="store_true", help="the API's JSON answer")
    add_connection_flags(parser)


def _request(args: argparse.Namespace) -> dict[str, Any]:
    if args.body:
        try:
            body = json.loads(Path(args.body).read_text())
        except (OSError, ValueError) as exc:
            raise AdminError(f"--body {args.body}: {exc}", status=2) from None
        if not isinstance(body, dict):
            raise AdminError(f"--body {args.body}: not a JSON object", status=2)
        return body
    if not args.model:
        raise AdminError("give --model (and --prompt, --max-tokens) or --body FILE", status=2)
    body = {"model": args.model}
    if args.endpoint == "embeddings":
        body["input"] = args.prompt
    elif args.endpoint in ("completions",):
        body["prompt"] = args.prompt
    elif args.endpoint == "responses":
        body["input"] = args.prompt
    else:
        body["messages"] = [{"role": "user", "content": args.prompt}]
    if args.max_tokens is not None:
        name = {"responses": "max_output_tokens"}.get(args.endpoint, "max_tokens")
        body[name] = args.max_tokens
    return body


def _text(answer: dict[str, Any]) -> str:
    lines = [f"decision: {answer['decision']} (HTTP {answer['response']['status']})"]
    worst = answer.get("worst_case")
    if worst:
        lines.append(
            f"worst case: {worst['tokens']:,} tokens ({worst['prompt_tokens']:,} prompt + "
            f"{worst['output_tokens']:,} output), cost {worst['cost']:.9f}"
        )
    clamp = answer.get("clamp")
    if clamp and clamp.get("max_tokens"):
        lines.append(f"clamped to max_tokens {clamp['max_tokens']:,}")
    binding = answer.get("binding")
    if binding:
        if binding.get("kind") == "budget":
            text = (
                f"binding: {binding.get('scope')} {binding.get('scope_id')} "
                f"{binding.get('period')} {binding.get('limit_kind')} budget"
            )
            if binding.get("line") is not None:
                text += f", line {binding['line']}"
            if binding.get("remaining_after") is not None:
                text += f", {binding['remaining_after']} left after this request"
            lines.append(text)
        else:
            lines.append(
                f"binding: {binding.get('scope')} {binding.get('limit_name')} limit "
                f"{binding.get('limit')} (now {binding.get('current')})"
            )
    error = (answer["response"].get("body") or {}).get("error")
    if isinstance(error, dict):
        lines.append(f"refusal: {error.get('message')}")
    return "\n".join(lines)


async def _call(args: argparse.Namespace) -> str:
    body: dict[str, Any] = {
        "api_key_id": args.api_key_id,
        "endpoint": args.endpoint,
        "request": _request(args),
    }
    if args.end_user:
        body["external_user_id"] = args.end_user
    if args.clamp:
        body["headers"] = {"x-budget-clamp": "true"}
    async with AdminHttp(args) as http:
        answer = await http.call("POST", "/api/v1/llm/budgets/quote", body=body)
    return to_json(answer) if args.json else _text(answer)


def main(args: argparse.Namespace) -> int:
    print(asyncio.run(_call(args)))
    return 0
