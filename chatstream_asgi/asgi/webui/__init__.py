"""The chat page (DESIGN §7): plain HTML, CSS and JavaScript files shipped in the package.

No build step, no CDN, no request leaves the server the page came from, so it works offline and
behind a firewall. The files are read once, when the page object is made (at start-up, not on
the event loop of a request), and served from memory. ChatStream injected its `web_ui_params`
by replacing `const opts = {}` in the script; here the options go into a JSON data block of the
page instead (`<` escaped, so no option value can close the block), which the script reads
with `JSON.parse`. A strict Content-Security-Policy allows only the page's own script and
style, so even a bug that inserted text as markup could not run a script. Replies are rendered
as markdown by a small renderer of the page's own (markdown.js, markdown-inline.js) that builds
DOM nodes and never parses HTML: no third-party code, no licence file to ship beside it.
"""

from __future__ import annotations

import importlib.resources
import json
from typing import Any

from starlette.responses import Response

#: The page's files by path, with their content types. "/" and "/chatstream.js" are ChatStream's paths.
PAGE_FILES: dict[str, tuple[str, str]] = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/chatstream.js": ("chatstream.js", "text/javascript; charset=utf-8"),
    "/chatstream.css": ("chatstream.css", "text/css; charset=utf-8"),
    # Modules chatstream.js imports: the conversation's DOM, and the markdown renderer it uses.
    "/messages.js": ("messages.js", "text/javascript; charset=utf-8"),
    "/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/markdown-inline.js": ("markdown-inline.js", "text/javascript; charset=utf-8"),
}

#: Where the page's "New chat" asks for a fresh session (POST; served with the page).
NEW_CHAT_PATH = "/new_chat"
#: What a refused `POST /new_chat` without JSON's `Content-Type` is told.
NEW_CHAT_NEEDS_JSON = "POST /new_chat takes Content-Type: application/json (as the page sends it)"

_OPTIONS_BLOCK = '<script id="chatstream-options" type="application/json">{}</script>'

_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The page is tiny; revalidating it means an upgraded server never runs an old script.
    "Cache-Control": "no-cache",
}


class ChatPage:
    """The page's files in memory, with `params` (ChatStream's `web_ui_params`) injected.

    `params` may set `title` (header and tab), `placeholder` (the message box) and `greeting`
    (shown while the conversation is empty). `model` (the model's name, shown in the header),
    and `chat_path` (where the page posts chats) come from the server, and `params` may override
    them; `system_prompt` (whether the server takes a chat's `system` text, so the settings offer
    the field) comes from the server only.
    """

    def __init__(
        self,
        params: dict[str, Any] | None = None,
        *,
        model: str = "",
        chat_path: str = "/chat_stream",
        system_prompt: bool = False,
    ) -> None:
        # Relative to the page, so the page keeps working when the app is mounted under a prefix.
        merged = {"model": model, "chat_path": chat_path.lstrip("/"), **(params or {})}
        merged["system_prompt"] = system_prompt  # the server's to say: the page must not offer what it refuses
        options = json.dumps(merged, ensure_ascii=False).replace("<", "\\u003c")
        folder = importlib.resources.files(__name__)
        self._bodies: dict[str, bytes] = {}
        for path, (name, _) in PAGE_FILES.items():
            text = folder.joinpath(name).read_text(encoding="utf-8")
            if path == "/":
                if _OPTIONS_BLOCK not in text:
                    raise RuntimeError("index.html lost its options block")
                text = text.replace(_OPTIONS_BLOCK, _OPTIONS_BLOCK.replace("{}", options))
            self._bodies[path] = text.encode()

    def response(self, path: str) -> Response | None:
        """The file served at `path`, or None if the page has none there."""
        body = self._bodies.get(path)
        if body is None:
            return None
        return Response(body, media_type=PAGE_FILES[path][1], headers=_HEADERS)
