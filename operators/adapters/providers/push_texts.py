"""Pushes of API notifications rendered from the catalog's templates (the `PushRenderer` port).

A notification's push is rendered in the item's `locale`, falling back to its language and then
to the template's default locale (`operators.notify.templates.render_push`); the payload is kept
within the providers' 4096 bytes by shortening the body with an ellipsis (then the title), with
the ids beside the texts counted. A post's push comes from the PushTemplate, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import orjson

from operators.delivery.model import SendRequest
from operators.delivery.payloads import (
    MAX_PAYLOAD_BYTES,
    PushRenderer,
    PushTemplate,
    UnrenderablePush,
    post_texts,
)
from operators.notify.templates import (
    DataValue,
    RenderError,
    Template,
    fit_payload,
    render_push,
)

CACHED_TEXTS = 4_096
"""Rendered texts kept per worker: every recipient of a notification in one locale shares them."""
SURE_FIT_BYTES = (MAX_PAYLOAD_BYTES - 400) // 6
"""Texts and ids of at most this many bytes fit without measuring: JSON escapes a byte into at
most six, and the rest of either provider's payload (keys, the collapse key) is under 400."""


class TemplatePushRenderer(PushRenderer):
    """Renders pushes with the catalog's templates (one per worker; compiled once at load).

    A notification's recipients in one locale share its texts, so they are rendered once and
    kept (Jinja2 and the payload measure cost about 100 µs a push, the cached path a few);
    only texts long enough to be near the limit are measured and shortened per push.
    """

    def __init__(self, post: PushTemplate, templates: Mapping[str, Template]) -> None:
        self.post = post
        self._templates = templates
        self._texts: dict[tuple[str, str, str | None, bytes], tuple[str, str, str | None]] = {}

    def texts(self, request: SendRequest) -> tuple[str, str, dict[str, str]]:
        """(title, body, data) of a push; UnrenderablePush if its template cannot render."""
        message = request.message
        if message is None:
            return post_texts(self.post, request)
        item = request.item
        locale = item.get("locale")
        key = (
            request.post_id,
            message["template_id"],
            locale,
            orjson.dumps(message["data"], option=orjson.OPT_SORT_KEYS),
        )
        texts = self._texts.get(key)
        if texts is None:
            texts = self._render(message["template_id"], locale, message["data"])
            if len(self._texts) >= CACHED_TEXTS:
                self._texts.clear()
            self._texts[key] = texts
        title, body, link = texts
        data = {
            "notification_id": item["notification_id"],
            "device_id": item["device_id"],
            "post_id": request.post_id,
            "category": message["category"],
        }
        if link is not None:
            data["link"] = link
        size = (
            len(title.encode()) + len(body.encode()) + sum(len(v.encode()) for v in data.values())
        )
        if size > SURE_FIT_BYTES:
            # The body gives way first (then the title), with an ellipsis.
            try:
                title, body, _ = fit_payload(title, body, data, MAX_PAYLOAD_BYTES)
            except RenderError as exc:
                raise UnrenderablePush(f"render: {exc}") from None
        return title, body, data

    def _render(
        self, template_id: str, locale: str | None, values: Mapping[str, DataValue]
    ) -> tuple[str, str, str | None]:
        template = self._templates.get(template_id)
        if template is None:
            raise UnrenderablePush(f"template {template_id!r} is not in the catalog")
        try:
            # Unshortened here: each push is fitted with its own ids beside the texts.
            rendered = render_push(template, locale, values, limit=1 << 30)
        except RenderError as exc:
            raise UnrenderablePush(f"render: {exc}") from None
        return rendered.title, rendered.body, rendered.link
