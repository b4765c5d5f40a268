"""app_server.py: the middleware that tells Streamlit's page where its server is, so that a page opened by its
address makes no request that 404s (its two probes under the page's own path)."""

from __future__ import annotations

import asyncio

from app_server import BackendBaseUrl, base_url_script, is_page_request

PAGE = b"<!doctype html><html><head><meta charset='utf-8'></head><body><div id='root'></div></body></html>"


def serve(path: str, content_type: bytes, body: bytes, encoding: bytes | None = None, chunks: int = 1,
          base_path: str = "") -> tuple[dict, bytes, list]:
    """Run one GET through the middleware in front of an app that answers `body`; returns the response's headers,
    its body and the request headers the app saw."""
    seen = []

    async def app(scope, receive, send):
        seen.extend(scope["headers"])
        headers = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())]
        if encoding:
            headers.append((b"content-encoding", encoding))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        step = max(1, len(body) // chunks)
        parts = [body[i:i + step] for i in range(0, len(body), step)] or [b""]
        for i, part in enumerate(parts):
            await send({"type": "http.response.body", "body": part, "more_body": i < len(parts) - 1})

    sent = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "method": "GET", "path": path,
             "headers": [(b"accept-encoding", b"gzip"), (b"host", b"localhost")]}
    asyncio.run(BackendBaseUrl(app, base_path=base_path)(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body_out = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return {k.decode(): v.decode() for k, v in start["headers"]}, body_out, seen


def test_a_page_gets_the_servers_address_first_in_its_head_and_its_length_fixed():
    headers, body, seen = serve("/Thresholds", b"text/html; charset=utf-8", PAGE, chunks=3)
    assert body.startswith(b"<!doctype html><html><head>" + base_url_script(""))
    assert body.endswith(PAGE[len(b"<!doctype html><html><head>"):])
    assert int(headers["content-length"]) == len(body)
    assert b"accept-encoding" not in dict(seen)  # asked uncompressed, so that it can be rewritten


def test_scripts_styles_and_other_answers_pass_untouched():
    script = b"console.log('<head>')"
    headers, body, seen = serve("/static/js/index.js", b"application/javascript", script)
    assert body == script and dict(seen)[b"accept-encoding"] == b"gzip"
    _, health, _ = serve("/_stcore/health", b"text/plain", b"ok")
    assert health == b"ok"
    _, compressed, _ = serve("/", b"text/html", b"\x1f\x8b<head>", encoding=b"gzip")
    assert compressed == b"\x1f\x8b<head>"  # never rewritten once compressed


def test_the_address_follows_the_base_url_path():
    assert b'window.location.origin + "/"' in base_url_script("")
    assert b'window.location.origin + "/cxr/"' in base_url_script("/cxr/")
    _, body, _ = serve("/cxr/Mistakes", b"text/html", PAGE, base_path="cxr")
    assert b'"/cxr/"' in body
    assert is_page_request("/") and is_page_request("/Mistakes") and is_page_request("/index.html")
    assert not is_page_request("/static/css/index.css") and not is_page_request("/favicon.png")
