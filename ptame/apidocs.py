"""An HTTP API's reference as one self-contained HTML page, made from its OpenAPI schema.

FastAPI's ``/docs`` (Swagger UI) loads its script and stylesheet from a CDN and stays blank
offline; this page has no script and no external stylesheet: endpoints, parameters, request
bodies, responses and an example ``curl`` line each.
"""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["curl_example", "openapi_html"]

_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
h2 { margin-top: 2em; border-bottom: 1px solid #ccc; }
.method { display: inline-block; min-width: 4em; padding: 0 .4em; border-radius: 3px; color: #fff; background: #555;
          text-align: center; font-size: 80%; }
.post { background: #2a7a3b; } .get { background: #1f5fa8; }
table { border-collapse: collapse; margin: .5em 0; } td, th { border: 1px solid #ddd; padding: .25em .6em; text-align: left; }
pre, code { background: #f4f4f4; } pre { padding: .6em; overflow-x: auto; }
"""


def _type(schema: dict[str, Any]) -> str:
    """A short type name of a JSON schema: ``integer``, ``string | null``, ``array of integer``."""
    if "anyOf" in schema:
        return " | ".join(_type(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    kind = schema.get("type", "any")
    if kind == "array":
        return f"array of {_type(schema.get('items', {}))}"
    if "enum" in schema:
        return " | ".join(repr(v) for v in schema["enum"])
    return f"{kind} ({schema['format']})" if "format" in schema else str(kind)


def curl_example(base_url: str, path: str, method: str, operation: dict[str, Any]) -> str:
    """One ``curl`` line calling ``operation``: an image file for binary bodies, ``-d`` for JSON."""
    parts = ["curl"] + ([] if method == "get" else ["-X", method.upper()])
    content = operation.get("requestBody", {}).get("content", {})
    form = content.get("multipart/form-data", {}).get("schema", {}).get("properties", {})
    files = [name for name, s in form.items() if s.get("format") == "binary"]
    images = [kind for kind in content if kind.startswith("image/")]
    if images:
        parts += ["--data-binary", "@image.jpg", "-H", "'Content-Type: image/jpeg'"]
    elif files:
        parts += ["-F", f"{files[0]}=@image.jpg"]
    elif "application/json" in content:
        parts += ["-H", "'Content-Type: application/json'", "-d", "'{...}'"]
    return " ".join(parts + [f"'{base_url}{path}'"])


def _parameters(operation: dict[str, Any]) -> str:
    rows = []
    for p in operation.get("parameters", []):
        schema = p.get("schema", {})
        default = f"<code>{escape(repr(schema['default']))}</code>" if "default" in schema else ""
        required = " (required)" if p.get("required") else ""
        rows.append(
            f"<tr><td><code>{escape(p['name'])}</code>{required}</td><td>{escape(p.get('in', ''))}</td>"
            f"<td>{escape(_type(schema))}</td><td>{default}</td>"
            f"<td>{escape(p.get('description') or schema.get('description') or '')}</td></tr>"
        )
    if not rows:
        return ""
    head = "<tr><th>parameter</th><th>in</th><th>type</th><th>default</th><th>meaning</th></tr>"
    return f"<table>{head}{''.join(rows)}</table>"


def _operation(base_url: str, path: str, method: str, operation: dict[str, Any]) -> str:
    out = [f'<h3><span class="method {method}">{method.upper()}</span> <code>{escape(path)}</code></h3>']
    text = operation.get("description") or operation.get("summary") or ""
    if text:
        out.append(f"<p>{escape(text)}</p>")
    out.append(_parameters(operation))
    body = operation.get("requestBody", {}).get("content", {})
    if body:
        out.append("<p>Request body: " + ", ".join(f"<code>{escape(k)}</code>" for k in body) + "</p>")
    responses = operation.get("responses", {})
    if responses:
        items = "".join(
            f"<li><code>{escape(str(code))}</code>: {escape(r.get('description', ''))}"
            + (" (" + ", ".join(escape(k) for k in r.get("content", {})) + ")" if r.get("content") else "")
            + "</li>"
            for code, r in responses.items()
        )
        out.append(f"<p>Responses:</p><ul>{items}</ul>")
    out.append(f"<pre>{escape(curl_example(base_url, path, method, operation))}</pre>")
    return "\n".join(out)


def openapi_html(schema: dict[str, Any], base_url: str = "") -> str:
    """The page for an OpenAPI ``schema``; ``curl`` lines call ``base_url`` (e.g. ``http://host:8000``)."""
    info = schema.get("info", {})
    title = escape(str(info.get("title", "API")))
    sections = [
        _operation(base_url.rstrip("/"), path, method, operation)
        for path, item in schema.get("paths", {}).items()
        for method, operation in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]
    schemas = schema.get("components", {}).get("schemas", {})
    models = []
    for name, s in schemas.items():
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        fields = "".join(
            f"<tr><td><code>{escape(k)}</code></td><td>{escape(_type(v))}</td></tr>" for k, v in s.get("properties", {}).items()
        )
        models.append(f"<h3><code>{escape(name)}</code></h3><table>{fields}</table>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{title} {escape(str(info.get('version', '')))}: API</title><style>{_STYLE}</style></head><body>"
        f"<h1>{title} <small>{escape(str(info.get('version', '')))}</small></h1>"
        f"<p>{escape(str(info.get('description', '')))}</p>"
        '<p>The machine-readable schema: <a href="openapi.json"><code>openapi.json</code></a>.</p>'
        "<h2>Endpoints</h2>" + "\n".join(sections) + ("<h2>Answers</h2>" + "\n".join(models) if models else "")
        + "</body></html>\n"
    )
