"""Pushes of API notifications rendered from the catalog's templates (the `PushRenderer` port).

A notification's push is rendered in the item's `locale`, falling back to its language and then
to the template's default locale (`operators.notify.templates.render_push`); the payload is kept
within the providers' 4096 bytes by shortening the body with an ellipsis (then the title), with
the ids beside the texts counted. A post's push comes from the PushTemplate, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

from operators.delivery.model import SendRequest
from operators.delivery.payloads import (
    MAX_PAYLOAD_BYTES,
    PushRenderer,
    PushTemplate,
    UnrenderablePush,
    post_texts,
)
from operators.notify.templates import RenderError, Template, render_push


class TemplatePushRenderer(PushRenderer):
    """Renders pushes with the catalog's templates (one per worker; compiled once at load)."""

    def __init__(self, post: PushTemplate, templates: Mapping[str, Template]) -> None:
        self.post = post
        self._templates = templates

    def texts(self, request: SendRequest) -> tuple[str, str, dict[str, str]]:
        """(title, body, data) of a push; UnrenderablePush if its template cannot render."""
        message = request.message
        if message is None:
            return post_texts(self.post, request)
        template = self._templates.get(message["template_id"])
        if template is None:
            raise UnrenderablePush(f"template {message['template_id']!r} is not in the catalog")
        item = request.item
        data = {
            "notification_id": item["notification_id"],
            "device_id": item["device_id"],
            "post_id": request.post_id,
            "category": message["category"],
        }
        try:
            rendered = render_push(
                template, item.get("locale"), message["data"], extra=data, limit=MAX_PAYLOAD_BYTES
            )
        except RenderError as exc:
            raise UnrenderablePush(f"render: {exc}") from None
        if rendered.link is not None:
            data["link"] = rendered.link
        return rendered.title, rendered.body, data
