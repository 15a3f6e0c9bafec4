"""Templates: a title, a body (and a deep link) per locale, rendered in Jinja2's sandbox.

A template is one TOML file in the templates directory; its file name is its id::

    category = "login_code"          # the category it may be sent under
    default_locale = "en"            # used when the user's locale has no text

    [locales.en]
    title = "Your login code"
    body = "{{ code }} is your code. It expires in {{ minutes }} minutes."
    link = "myapp://login"           # optional

    [locales.fr]
    title = "Votre code de connexion"
    body = "Votre code est {{ code }}."

Texts are compiled once when the directory is loaded (a syntax error stops `fanfare api`) in a
`SandboxedEnvironment` (templates cannot reach Python internals) with `StrictUndefined` (a
missing variable is an error, never an empty string). The variables any locale uses must all be
in a request's `data`: the API checks that, since it does not know the recipients' locales.

`render_push` is what the delivery side renders at dispatch: the user's locale, falling back to
its language (`pt-BR` to `pt`) and then to the default locale, and a payload kept under the
providers' 4096-byte limit (the body, then the title, is shortened with an ellipsis).
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from operators.notify.categories import NAME, CatalogError

PROVIDER_PAYLOAD_LIMIT = 4096
"""Bytes the providers accept in one push (APNs' and FCM's limit; the same figure as
`operators.delivery.payloads.MAX_PAYLOAD_BYTES`, which a unit test keeps equal)."""
ELLIPSIS = "…"
_KEYS = {"category", "default_locale", "description", "locales"}
_TEXT_KEYS = {"title", "body", "link"}
_ENV = SandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)

DataValue = str | int | float | bool | None


class RenderError(ValueError):
    """A template could not be rendered with the data given (or does not fit the payload)."""


class PayloadTooLarge(RenderError):
    """Even an empty title and body leave no room: the rest of the payload is over the limit."""


def normalize_locale(locale: str) -> str:
    """`pt_BR`, `PT-br` -> `pt-br` (BCP 47 tags compare case-insensitively)."""
    return locale.strip().replace("_", "-").lower()


@dataclass(frozen=True, slots=True)
class LocaleText:
    """One locale's compiled texts."""

    title: jinja2.Template
    body: jinja2.Template
    link: jinja2.Template | None


@dataclass(frozen=True, slots=True)
class Template:
    """A template: its category, default locale, texts per locale and the variables it uses."""

    template_id: str
    category: str
    default_locale: str
    locales: Mapping[str, LocaleText] = field(repr=False)
    variables: frozenset[str] = frozenset()
    description: str = ""

    def locale_chain(self, locale: str | None) -> list[str]:
        """The locales tried for a user's locale, best first, ending at the default."""
        chain: list[str] = []
        if locale:
            tag = normalize_locale(locale)
            chain += [tag, tag.split("-", 1)[0]]
        chain.append(self.default_locale)
        return [c for i, c in enumerate(chain) if c in self.locales and c not in chain[:i]]

    def missing_variables(self, data: Mapping[str, object]) -> list[str]:
        """Variables some locale uses that `data` does not have, sorted."""
        return sorted(self.variables - set(data))


def _compile(source: str, where: str, text: object) -> tuple[jinja2.Template, set[str]]:
    if not isinstance(text, str):
        raise CatalogError(f"{source}: {where} must be a string")
    try:
        ast = _ENV.parse(text)
        compiled = _ENV.from_string(text)
    except jinja2.TemplateSyntaxError as exc:
        raise CatalogError(f"{source}: {where}: template syntax error: {exc.message}") from None
    return compiled, set(meta.find_undeclared_variables(ast))


def parse_template(template_id: str, text: str, source: str) -> Template:
    """A template file's contents (TOML); CatalogError names the file and what is wrong."""
    if not NAME.match(template_id):
        raise CatalogError(
            f"{source}: template ids (file names) are 1-64 lower-case letters, digits or "
            "underscores"
        )
    try:
        doc: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"{source}: not valid TOML ({exc})") from None
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise CatalogError(f"{source}: unknown keys {unknown}; known: {', '.join(sorted(_KEYS))}")
    category = doc.get("category")
    if not isinstance(category, str) or not category:
        raise CatalogError(f'{source}: category = "NAME" is required')
    default = doc.get("default_locale")
    if not isinstance(default, str) or not default.strip():
        raise CatalogError(f'{source}: default_locale = "en" (a locale it has) is required')
    raw_locales = doc.get("locales")
    if not isinstance(raw_locales, dict) or not raw_locales:
        raise CatalogError(f"{source}: no [locales.TAG] tables")
    locales: dict[str, LocaleText] = {}
    variables: set[str] = set()
    for tag, entry in raw_locales.items():
        where = f"locales.{tag}"
        if not isinstance(entry, dict):
            raise CatalogError(f"{source}: {where} must be a table with title and body")
        bad = sorted(set(entry) - _TEXT_KEYS)
        if bad:
            raise CatalogError(
                f"{source}: {where} has unknown keys {bad}; known: title, body, link"
            )
        if "title" not in entry or "body" not in entry:
            raise CatalogError(f"{source}: {where} needs both title and body")
        title, used_title = _compile(source, f"{where}.title", entry["title"])
        body, used_body = _compile(source, f"{where}.body", entry["body"])
        link = None
        if "link" in entry:
            link, used_link = _compile(source, f"{where}.link", entry["link"])
            variables |= used_link
        variables |= used_title | used_body
        key = normalize_locale(tag)
        if key in locales:
            raise CatalogError(f"{source}: locale {tag!r} appears twice (tags ignore case)")
        locales[key] = LocaleText(title, body, link)
    default_key = normalize_locale(default)
    if default_key not in locales:
        raise CatalogError(f"{source}: default_locale {default!r} has no [locales.{default}] table")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise CatalogError(f"{source}: description must be a string")
    return Template(
        template_id=template_id,
        category=category,
        default_locale=default_key,
        locales=locales,
        variables=frozenset(variables),
        description=description,
    )


@dataclass(frozen=True, slots=True)
class RenderedPush:
    """What a push says, in which locale, and whether it was shortened to fit."""

    title: str
    body: str
    link: str | None
    locale: str
    truncated: bool = False


def payload_bytes(title: str, body: str, extra: Mapping[str, str]) -> int:
    """The larger of the APNs and FCM payload sizes for these texts (as each provider counts).

    `extra` is what the payload carries beside the texts (ids, the link): APNs custom keys,
    FCM data. Measured as aioapns encodes (UTF-8, not ASCII-escaped) and as FCM counts.
    """
    apns = {"aps": {"alert": {"title": title, "body": body}, "sound": "default"}, **extra}
    fcm = {
        "notification": {"title": title, "body": body},
        "data": dict(extra),
        "android": {"collapse_key": "x" * 64},
    }
    return max(
        len(json.dumps(apns, ensure_ascii=False).encode()),
        len(json.dumps(fcm, ensure_ascii=False).encode()),
    )


def _shortened(text: str, fits: Callable[[str], bool]) -> str:
    """The longest prefix of `text` (plus an ellipsis) for which `fits(candidate)` holds."""
    low, high = 0, len(text)
    while low < high:  # the largest k with fits(text[:k] + ELLIPSIS)
        mid = (low + high + 1) // 2
        if fits(text[:mid].rstrip() + ELLIPSIS):
            low = mid
        else:
            high = mid - 1
    return text[:low].rstrip() + ELLIPSIS if low else ""


def fit_payload(
    title: str, body: str, extra: Mapping[str, str], limit: int = PROVIDER_PAYLOAD_LIMIT
) -> tuple[str, str, bool]:
    """(title, body, shortened?) within `limit` bytes: the body gives way first, then the title."""
    if payload_bytes(title, body, extra) <= limit:
        return title, body, False
    body = _shortened(body, lambda b: payload_bytes(title, b, extra) <= limit)
    if payload_bytes(title, body, extra) <= limit:
        return title, body, True
    title = _shortened(title, lambda t: payload_bytes(t, "", extra) <= limit)
    if payload_bytes(title, "", extra) > limit:
        raise PayloadTooLarge(
            f"the payload is over {limit} bytes before any title or body "
            f"({payload_bytes('', '', extra)} bytes of ids and link)"
        )
    return title, "", True


def _render(template: jinja2.Template, data: Mapping[str, DataValue], what: str) -> str:
    try:
        return template.render(**data).strip()
    except jinja2.UndefinedError as exc:
        raise RenderError(f"{what}: {exc.message}") from None
    except jinja2.TemplateError as exc:  # SecurityError (the sandbox) among them
        raise RenderError(f"{what}: {exc}") from None
    except (TypeError, ValueError, ArithmeticError, LookupError) as exc:
        raise RenderError(f"{what}: {type(exc).__name__}: {exc}") from None


def render_push(
    template: Template,
    locale: str | None,
    data: Mapping[str, DataValue],
    *,
    extra: Mapping[str, str] | None = None,
    limit: int = PROVIDER_PAYLOAD_LIMIT,
) -> RenderedPush:
    """Render for a user's locale (falling back to its language, then the default locale).

    The payload (texts, `extra` and the link) is kept within `limit` bytes; RenderError when
    the data does not render (a missing variable, a filter on the wrong type).
    """
    tag = template.locale_chain(locale)[0]
    texts = template.locales[tag]
    what = f"template {template.template_id!r} ({tag})"
    title = _render(texts.title, data, f"{what} title")
    body = _render(texts.body, data, f"{what} body")
    link = None if texts.link is None else _render(texts.link, data, f"{what} link")
    payload_extra = dict(extra or {})
    if link is not None:
        payload_extra["link"] = link
    title, body, shortened = fit_payload(title, body, payload_extra, limit)
    return RenderedPush(title, body, link, tag, shortened)


def check_renders(template: Template, data: Mapping[str, DataValue]) -> None:
    """Render every locale with `data` (what the API checks before accepting a request)."""
    for tag in template.locales:
        render_push(template, tag, data)
