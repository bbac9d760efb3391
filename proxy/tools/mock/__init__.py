"""A deterministic fake upstream for tests, demos and load tests: OpenAI's API, Anthropic's
Messages API and Azure OpenAI's paths.

It stays independent of the proxy's own modules (including ``proxy.errors``), so a bug in the
proxy cannot also hide in the upstream it is tested against.

Generated text: the words of ``WORDS`` in order, repeating. Each one has a leading space and is
exactly one token in tiktoken's ``cl100k_base`` and ``o200k_base``, so tokenizing the text
gives exactly the visible completion tokens. ``completion_tokens = min(output_tokens, cap)``.
The cap is ``max_completion_tokens`` (or else ``max_tokens``) for chat and completions, and
``max_output_tokens`` for responses. ``finish_reason`` is ``"length"`` only when the cap is
below the tokens the mock wanted to produce. Reasoning tokens are counted inside completion
tokens and produce no text, as with OpenAI. So the visible words are
``completion - reasoning``.

Prompt tokens are a cheap count the mock does itself, not tiktoken's. "words" means
``len(text.split())``:

* chat: the sum over messages of (words of the string content, or of the ``text`` of its
  parts) + 4, then + 3;
* completions and embeddings: the words of ``prompt`` / ``input`` (a list of strings is
  summed; a token-id list counts its length; a list of token-id lists sums their lengths);
* responses: the words of ``input``. It may be a string, or a list of items whose
  ``content`` is a string or a list of parts with ``text``. ``instructions`` are not counted.

Headers that change one request (invalid values are a 400):

* ``x-mock-output-tokens: N`` sets the tokens wanted when the request sets no lower cap;
* ``x-mock-cached-tokens: N`` sets cached prompt tokens (at most the prompt tokens);
* ``x-mock-reasoning-tokens: N`` sets reasoning tokens (at most the completion tokens);
* ``x-mock-latency-ms`` / ``x-mock-chunk-delay-ms`` set the delay before the response starts
  and the delay between streamed chunks;
* ``x-mock-status: <400-599>`` sends that status with an OpenAI-shaped error body;
* ``x-mock-fail-after-chunks: N`` sends N content chunks of a stream, then drops the
  connection without the terminating chunk;
* ``x-mock-stall-after-chunks: N`` sends N content chunks of a stream, then goes silent
  (keeps the connection open and sends nothing more until the client leaves);
* ``x-mock-omit-usage: 1`` sends no usage at all (responses: ``"usage": null``).

``app[EXCHANGES]`` records, per request, what the mock wrote and whether its client (the
proxy) went away before the answer was complete (``MockExchange``): tests compare what the
proxy charged with what the upstream actually sent.

A Responses request whose cap cuts the output ends as OpenAI's does: ``status
"incomplete"`` with ``incomplete_details``, and streamed as a ``response.incomplete`` event
instead of ``response.completed``. Both carry usage.

**Anthropic** (``POST /v1/messages`` and ``/v1/messages/count_tokens``): requests need
``x-api-key`` (else 401) and ``anthropic-version`` (else 400); ``max_tokens`` caps the output.
Prompt tokens are the words of ``system`` (a string or text blocks) plus, per message, 4 + the
words of its text (string content, ``text`` blocks, and the text of ``tool_result`` blocks),
plus 3. ``x-mock-cached-tokens`` sets cache reads, ``x-mock-cache-write-tokens`` and
``x-mock-cache-write-1h-tokens`` cache writes (5-minute and 1-hour), each carved out of the
prompt tokens in that order; ``input_tokens`` is the rest. With ``tool_choice`` ``any`` or
``tool`` the answer is a ``tool_use`` block (the chosen or first tool) whose input is
``{"text": <the words>}``. Streams follow Anthropic's event sequence (``message_start`` with the
input usage, ``content_block_start``, ``ping``, one ``content_block_delta`` per word,
``content_block_stop``, ``message_delta`` with the output usage, ``message_stop``). Errors are
in Anthropic's shape. Answers carry an upstream account's ``anthropic-ratelimit-*`` and
``anthropic-organization-id`` headers, which the proxy must not pass on.

**Azure** (``/openai/deployments/{deployment}/{chat/completions,completions,embeddings}``
with an ``api-version`` query, ``/openai/responses`` likewise, and ``/openai/v1/…``): the
OpenAI handlers behind Azure's paths, requiring an ``api-key`` header (else 401).

``MockOptions(status=…)`` answers every request with that error status, for upstreams that
must fail (fallback tests).

Modules: ``app`` (the application, its routes and the command line), ``core`` (the state and
first steps every request shares, error shapes, streaming), ``controls`` (the ``x-mock-*``
headers and token arithmetic), ``records`` (options and what tests inspect), ``text`` (the
generated words), and one module per protocol: ``openai``, ``openai_responses``,
``anthropic``. A new protocol is a new module whose handler class lists its ``routes()``.
"""

from proxy.tools.mock.app import build_mock_app, main, run_mock
from proxy.tools.mock.records import (
    EXCHANGES,
    RECEIVED,
    REPORTED,
    MockExchange,
    MockOptions,
    ReceivedRequest,
    ReportedUsage,
)
from proxy.tools.mock.text import WORDS

__all__ = [
    "EXCHANGES",
    "RECEIVED",
    "REPORTED",
    "WORDS",
    "MockExchange",
    "MockOptions",
    "ReceivedRequest",
    "ReportedUsage",
    "build_mock_app",
    "main",
    "run_mock",
]
