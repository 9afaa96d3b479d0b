"""``GET /openapi.json``: the OpenAPI 3.1 description of the HTTP API, as shipped.

The document is ``openapi.json`` beside this module, written by hand and kept true
by ``tests/test_openapi.py`` (every route documented, every answer conforming).
It is read once and served byte for byte, to anyone, without a token.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from balancesim.gateway._handlers import ApiHandler

__all__ = ["OPENAPI_PATH", "OpenApiHandler", "openapi_document"]

OPENAPI_PATH = os.path.join(os.path.dirname(__file__), "openapi.json")


@functools.cache
def _document_bytes() -> bytes:
    with open(OPENAPI_PATH, "rb") as file:
        return file.read()


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document as a dict (a fresh copy)."""
    return json.loads(_document_bytes())


class OpenApiHandler(ApiHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.finish(_document_bytes())
