"""The self-contained API page: every endpoint with its parameters and a curl line, nothing from the network."""

from __future__ import annotations

import html
import re

from ptame.apidocs import curl_example, openapi_html

SCHEMA = {
    "openapi": "3.1.0",
    "info": {"title": "ptame", "version": "0.1.0", "description": "P-TAME <explanations>"},
    "paths": {
        "/explain": {
            "post": {
                "description": "Explain one image.",
                "parameters": [
                    {"name": "topk", "in": "query", "schema": {"anyOf": [{"type": "integer"}, {"type": "null"}]}},
                    {"name": "format", "in": "query", "schema": {"enum": ["json", "png"], "type": "string", "default": "json"}},
                ],
                "requestBody": {"content": {"multipart/form-data": {"schema": {"properties": {"file": {"type": "string", "format": "binary"}}}}}},
                "responses": {"200": {"description": "JSON", "content": {"image/png": {}}}, "413": {"description": "too big"}},
            }
        },
        "/healthz": {"get": {"summary": "Healthz", "responses": {"200": {"description": "ok"}}}},
    },
    "components": {"schemas": {"Error": {"properties": {"error": {"type": "string"}}}}},
}


def test_page_lists_endpoints_parameters_and_curl_lines_offline() -> None:
    page = openapi_html(SCHEMA, "http://127.0.0.1:8000/")
    text = html.unescape(page)
    assert "<script" not in page and not re.search(r"(href|src)=[\"']?(https?:)?//", page)
    assert "P-TAME &lt;explanations&gt;" in page  # schema text is escaped
    for needle in ("POST", "/explain", "topk", "integer | null", "'json' | 'png'", "413", "Error", "openapi.json"):
        assert needle in text, needle
    assert "curl -X POST -F file=@image.jpg 'http://127.0.0.1:8000/explain'" in text
    assert "curl 'http://127.0.0.1:8000/healthz'" in text


def test_curl_line_sends_raw_image_bodies() -> None:
    op = {"requestBody": {"content": {"image/*": {}}}}
    assert curl_example("http://h", "/x", "post", op) == "curl -X POST --data-binary @image.jpg -H 'Content-Type: image/jpeg' 'http://h/x'"
