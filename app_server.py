"""How `streamlit run streamlit_app.py` serves the dashboard: Streamlit's own server (an st.App) with one
middleware.

Streamlit's page, opened at a page's address such as /Thresholds, first probes /Thresholds/_stcore/health and
/Thresholds/_stcore/host-config, in case the whole app is served under /Thresholds/, and only then the server's
root: two 404s in the browser's console on every page opened by its address or reloaded (streamlit#7074). The page
skips that guess when it is told where its server is (window.__streamlit.BACKEND_BASE_URL, which Streamlit reads for
apps embedded elsewhere): the middleware writes that into the HTML page, as this origin at server.baseUrlPath."""

from __future__ import annotations

import json

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def base_url_script(base_path: str) -> bytes:
    """A script that tells Streamlit's page where its server is: this origin, at `base_path`."""
    path = "/" + base_path.strip("/") + "/" if base_path.strip("/") else "/"
    return (f"<script>window.__streamlit = Object.assign(window.__streamlit || {{}}, "
            f"{{BACKEND_BASE_URL: window.location.origin + {json.dumps(path)}}});</script>").encode()


def is_page_request(path: str) -> bool:
    """A page's address (/, /Thresholds, /index.html), not a script, style sheet or image."""
    last_segment = path.rstrip("/").rsplit("/", 1)[-1]
    return "." not in last_segment or last_segment.endswith(".html")


class BackendBaseUrl:
    """ASGI middleware: writes base_url_script into every HTML page the server sends, first in its <head>."""

    def __init__(self, app: ASGIApp, base_path: str = ""):
        self.app = app
        self.script = base_url_script(base_path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_page_request(scope["path"]):
            await self.app(scope, receive, send)
            return
        # Asked for uncompressed, so that the script can be written in (the page is 8 KB, 2 KB compressed).
        scope = {**scope, "headers": [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]}
        start: Message | None = None
        body = b""

        async def send_with_script(message: Message) -> None:
            nonlocal start, body
            if message["type"] == "http.response.start":
                headers = MutableHeaders(raw=list(message.get("headers", [])))
                if headers.get("content-type", "").startswith("text/html") and "content-encoding" not in headers:
                    start = message  # held until the whole page is read, to rewrite it and its length
                    return
                await send(message)
            elif start is not None and message["type"] == "http.response.body":
                body += message.get("body", b"")
                if message.get("more_body"):
                    return
                page = body.replace(b"<head>", b"<head>" + self.script, 1)
                headers = MutableHeaders(raw=list(start.get("headers", [])))
                headers["content-length"] = str(len(page))
                await send({**start, "headers": headers.raw})
                await send({"type": "http.response.body", "body": page})
            else:
                await send(message)

        await self.app(scope, receive, send_with_script)
