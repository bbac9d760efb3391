"""The cost of a request on its own answer (``[metering] cost_in_answers``): headers on a
buffered answer, a ``cost`` field in a stream's final usage object.

The figure is the settle's: ``Usage.cost_nano`` of the usage the answer reports, the same
integer ``pipeline.settle`` charges, computed here from the answer instead of read back from
Redis (no round trip; the settle runs after the answer is sent). A stream's figure is only
added where the answer states its full usage (OpenAI's usage chunk, Anthropic's
``message_delta``): a stream cut short is charged a bound the client never sees a usage for.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from decimal import Decimal

from proxy.catalog.pricing import Price
from proxy.dialects.base import StreamMeter, Usage

COST_HEADER = "x-llm-cost"
"""Major currency units (``0.000123``), exact: the nano integer scaled, never a float."""
COST_NANO_HEADER = "x-llm-cost-nano"
CURRENCY_HEADER = "x-llm-cost-currency"


def major_units(nano: int) -> str:
    return format(Decimal(nano).scaleb(-9).normalize(), "f")


def add_cost_headers(
    headers: MutableMapping[str, str], usage: Usage | None, price: Price, currency: str | None
) -> None:
    """``usage`` None (no answer with usage): charged as zero, said as zero."""
    nano = usage.cost_nano(price) if usage is not None else 0
    headers[COST_HEADER] = major_units(nano)
    headers[COST_NANO_HEADER] = str(nano)
    if currency:
        headers[CURRENCY_HEADER] = currency


_MARKERS = {
    # An object, not OpenAI's ``"usage":null`` on every chunk: before the usage chunk the
    # meter's usage() would count every delta so far.
    "openai": (b'"usage":{', b'"usage": {'),
    "anthropic": (b'"message_delta"', b'"message_delta"'),
}


class CostingMeter:
    """Wraps a dialect's SSE meter: after the block that carries the final usage passes the
    meter, the cost of that usage goes into the last usage object of the block, as JSON
    numbers (``"cost": 0.000123, "cost_nano": 123``) the SDKs keep as extra fields."""

    __slots__ = ("_inner", "_marker", "_price")

    def __init__(self, inner: StreamMeter, dialect: str, price: Price) -> None:
        self._inner = inner
        self._marker = _MARKERS[dialect]
        self._price = price

    def relay(self, block: bytes) -> bytes:
        data = self._inner.relay(block)
        tight, spaced = self._marker
        if tight not in data and spaced not in data:
            return data
        usage = self._inner.usage()
        if not usage.reported:
            return data
        return with_cost(data, usage.cost_nano(self._price))

    def usage(self) -> Usage:
        return self._inner.usage()


def with_cost(data: bytes, nano: int) -> bytes:
    """``data`` with the cost put first into its last usage object (unchanged if none)."""
    at = max(data.rfind(b'"usage":{'), data.rfind(b'"usage": {'))
    if at < 0:
        return data
    brace = data.index(b"{", at) + 1
    fields = f'"cost":{major_units(nano)},"cost_nano":{nano}'.encode()
    if data[brace : brace + 1] != b"}":
        fields += b","
    return data[:brace] + fields + data[brace:]


def costing(meter: StreamMeter, dialect: str, price: Price) -> StreamMeter:
    """The meter itself for a dialect whose streams this cannot edit (Bedrock's binary
    frames carry CRCs)."""
    return CostingMeter(meter, dialect, price) if dialect in _MARKERS else meter
