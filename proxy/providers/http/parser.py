"""HTTP/1.1 response parsing: the callbacks of ``httptools`` (llhttp, the parser Node.js
uses), fed by the connection's ``data_received``. Interim answers are skipped, the body is
decoded and queued for the caller, and the socket stops being read while too much of it is
unread (back-pressure)."""

from __future__ import annotations

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.providers.http.decoding import decode, decoder_for
from proxy.providers.http.errors import UpstreamError
from proxy.providers.http.state import ConnectionState

_HIGH_WATER = 256 * 1024
"""Unread response bytes past which the socket stops being read (back-pressure)."""


class ResponseParser(ConnectionState):
    """The parser part of a connection: ``httptools.HttpResponseParser(self)`` calls these."""

    def on_message_begin(self) -> None:
        if self.complete:  # a second answer to one request: neither body nor reusable
            raise UpstreamError("the upstream sent more than one answer")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        response = self._response
        assert response is not None
        status = self._parser.get_status_code()
        if status == 101:  # else httptools raises HttpParserUpgrade out of data_received
            raise UpstreamError("the upstream switched protocols unasked")
        if 100 <= status < 200:
            # An interim answer (100 Continue, 103 Early Hints): clients must skip even
            # unexpected ones (RFC 9110 15.2); the final answer follows on the same parser.
            self._interim = True
            self._raw_headers = []
            return
        response.status = status
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in self._raw_headers
        )
        response.headers = CIMultiDictProxy(headers)
        self.keep_alive = self._parser.should_keep_alive()
        framed = (
            "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        )
        self._until_close = not framed
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            self._decoder = decoder_for(encoding)
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            body = decode(self._decoder, body)
            if not body:
                return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._flush_decoder()
        self.complete = True
        self._finish()
        self._wake()

    def _flush_decoder(self) -> None:
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._chunks.append(rest)
