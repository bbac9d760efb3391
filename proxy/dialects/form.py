"""``multipart/form-data`` bodies (OpenAI's uploads: image edits, transcriptions), read into
the same kind of dict a JSON body gives the dialects, and re-encoded when a field must change.

The proxy prices its own reading of a form and forwards the client's bytes, so a form is
accepted only when every parser must read it alike: no preamble, one boundary, given in the
header and between 1 and 70 characters (RFC 2046); every part with a
``Content-Disposition: form-data`` and a name; each field once (``image[]``-style names
excepted, which collect into a list); a closing delimiter; at most ``MAX_PARTS`` parts, text
fields at most ``MAX_FIELD_BYTES``. The whole body is bounded before this runs
(``server.max_body_bytes``: 413 past it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.errors import bad_request

MAX_PARTS = 64
MAX_FIELD_BYTES = 1 << 20
_BOUNDARY = re.compile(r'boundary="?([0-9A-Za-z\'()+_,./:=? -]{1,70})"?(?:;|$)')
_DISPOSITION = re.compile(rb'\bform-data\b(?P<params>.*)', re.I | re.S)
_PARAM = re.compile(rb';\s*(name|filename)="([^"\r\n]*)"', re.I)


@dataclass(frozen=True, slots=True)
class FormFile:
    """An uploaded file: its bytes stay in the body they came in (a view, not a copy)."""

    filename: str
    content_type: str
    data: memoryview

    @property
    def size(self) -> int:
        return len(self.data)


def boundary_of(content_type: str) -> str | None:
    """The boundary a ``multipart/form-data`` Content-Type names, or None."""
    media, _, params = content_type.partition(";")
    if media.strip().lower() != "multipart/form-data":
        return None
    found = _BOUNDARY.search(params.strip())
    return found.group(1).rstrip(" ") if found else None


def parse_form(raw: bytes, content_type: str) -> dict[str, Any]:
    """Fields as strings, files as ``FormFile``; a 400 saying what is wrong otherwise."""
    boundary = boundary_of(content_type)
    if boundary is None:
        raise bad_request(
            "This endpoint takes multipart/form-data with a boundary in the Content-Type."
        )
    delimiter = b"--" + boundary.encode()
    view = memoryview(raw)
    if not raw.startswith(delimiter + b"\r\n"):  # no preamble: the SDKs send none
        raise bad_request("The multipart body must begin with the declared boundary.")
    start = 0
    form: dict[str, Any] = {}
    at = start + len(delimiter)
    parts = 0
    while True:
        if raw.startswith(b"--", at):
            return form
        if not raw.startswith(b"\r\n", at):
            raise bad_request("The multipart body is malformed after a boundary.")
        head_end = raw.find(b"\r\n\r\n", at + 2)
        following = raw.find(b"\r\n" + delimiter, at + 2)
        if head_end < 0 or following < 0 or following < head_end:
            raise bad_request("The multipart body has a part without an end or headers.")
        parts += 1
        if parts > MAX_PARTS:
            raise bad_request(f"The multipart body has more than {MAX_PARTS} parts.")
        _add(form, raw[at + 2 : head_end], view[head_end + 4 : following])
        at = following + 2 + len(delimiter)


def _add(form: dict[str, Any], head: bytes, value: memoryview) -> None:
    disposition = b""
    content_type = "application/octet-stream"
    for line in head.split(b"\r\n"):
        name, _, rest = line.partition(b":")
        if name.strip().lower() == b"content-disposition":
            disposition = rest
        elif name.strip().lower() == b"content-type":
            content_type = rest.strip().decode("latin-1")
    matched = _DISPOSITION.search(disposition)
    found = _PARAM.findall(matched.group("params") if matched else b"")
    params = {key.lower(): val for key, val in found}
    if b"name" not in params or not params[b"name"]:
        raise bad_request("Each part of the multipart body needs a form-data name.")
    name = params[b"name"].decode("utf-8", "replace")
    item: Any
    if b"filename" in params:
        item = FormFile(params[b"filename"].decode("utf-8", "replace"), content_type, value)
    else:
        if len(value) > MAX_FIELD_BYTES:
            raise bad_request(f"The field '{name[:64]}' is too long.", param=name[:64])
        try:
            item = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise bad_request(f"The field '{name[:64]}' is not UTF-8.", param=name[:64]) from None
    if name.endswith("[]"):
        form.setdefault(name, []).append(item)
    elif name in form:
        raise bad_request(f"The field '{name[:64]}' is sent more than once.", param=name[:64])
    else:
        form[name] = item


def replace_field(raw: bytes, name: str, value: str) -> bytes:
    """The form (parsed before: it begins with its delimiter) with the text field ``name``
    set to ``value`` (an upstream's model name); the other parts' bytes as they came."""
    delimiter = raw[: raw.index(b"\r\n")]
    encoded = value.encode()
    if delimiter in encoded:
        raise bad_request("The model's upstream name cannot be sent in this form.")
    head = re.compile(
        rb"(\r\nContent-Disposition:\s*form-data;\s*name=\"" + re.escape(name.encode())
        + rb"\"\r\n(?:[^\r\n]+\r\n)*\r\n)(.*?)(\r\n" + re.escape(delimiter) + rb")",
        re.I | re.S,
    )
    replaced, count = head.subn(lambda m: m.group(1) + encoded + m.group(3), raw, count=1)
    if count != 1:
        raise bad_request(f"The form has no '{name}' field to send upstream.", param=name)
    return replaced
