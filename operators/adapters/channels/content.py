"""What a channel message says: rendered at send time from the dispatch item, like a push.

An API notification's dispatch batch carries its `message` (category, template, tier, data);
its item carries the user's `locale`. The text comes from the template through
`operators.notify.templates.render_push` (locale fallback, Jinja2 sandbox). A post's batch
carries no message: its text is the push's (FANFARE_PUSH_TITLE/BODY/LINK), category
`new_post`, tier social.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from operators.delivery.model import SendRequest
from operators.delivery.payloads import PayloadTooLarge, PushTemplate
from operators.notify.catalog import Catalog
from operators.notify.templates import RenderError, render_push
from schemas.records import Tier

POST_CATEGORY = "new_post"
"""The category of a post's notification (the fan-out's own)."""


class Unrenderable(PayloadTooLarge):
    """A request that cannot be rendered (its template is gone, its data does not render).

    A PayloadTooLarge, so the engine records it as it records an oversized push: `failed` and a
    dead letter, never sent, never retried (it would fail the same way).
    """


@dataclass(frozen=True, slots=True)
class Content:
    """A rendered notification, before a channel puts it in its own format."""

    notification_id: str
    user_id: str
    category: str
    tier: Tier
    title: str
    body: str
    link: str | None
    locale: str | None
    collapse_key: str

    @property
    def tag(self) -> str:
        """A short stable id for replacing a notification (web push Topic, the browser's tag)."""
        return hashlib.sha256(self.collapse_key.encode()).hexdigest()[:24]


class ChannelRenderer:
    """Renders requests for the channel senders (one per worker; templates compiled once)."""

    def __init__(self, catalog: Catalog | None, post_template: PushTemplate) -> None:
        self._catalog = catalog
        self._post = post_template

    def category_of(self, request: SendRequest) -> str:
        """The request's category (a post's is `new_post`)."""
        return request.message["category"] if request.message is not None else POST_CATEGORY

    def sms_eligible(self, request: SendRequest) -> bool:
        """Whether the category may use SMS (unknown categories may not)."""
        if self._catalog is None:
            return False
        category = self._catalog.categories.get(self.category_of(request))
        return category is not None and category.sms_eligible

    def content(self, request: SendRequest, limit: int = 64 * 1024) -> Content:
        """The request's title, body and link; Unrenderable if it cannot be rendered."""
        item = request.item
        message = request.message
        if message is None:
            title, body, link = self._post.fill(request)
            return Content(
                item["notification_id"],
                item["user_id"],
                POST_CATEGORY,
                "social",
                title,
                body,
                link,
                item.get("locale"),
                request.post_id,
            )
        template = (
            None if self._catalog is None else self._catalog.templates.get(message["template_id"])
        )
        if template is None:
            raise Unrenderable(f"template {message['template_id']!r} is not in the catalog")
        try:
            rendered = render_push(template, item.get("locale"), message["data"], limit=limit)
        except RenderError as exc:
            raise Unrenderable(f"render: {exc}") from None
        return Content(
            item["notification_id"],
            item["user_id"],
            message["category"],
            message["tier"],
            rendered.title,
            rendered.body,
            rendered.link,
            rendered.locale,
            message.get("collapse_key") or item["notification_id"],
        )
