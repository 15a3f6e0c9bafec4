"""Categories file and templates: validation (one-line errors), locale fallback, payload limit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operators.adapters.catalog_files import load_catalog
from operators.delivery.payloads import MAX_PAYLOAD_BYTES
from operators.notify.catalog import Catalog
from operators.notify.categories import CatalogError, parse_categories
from operators.notify.templates import (
    ELLIPSIS,
    PROVIDER_PAYLOAD_LIMIT,
    PayloadTooLarge,
    RenderError,
    check_renders,
    fit_payload,
    parse_template,
    payload_bytes,
    render_push,
)
from scripts.cli import main

TEMPLATE = """
category = "receipt"
default_locale = "en"
[locales.en]
title = "Receipt {{ order_id }}"
body = "You paid {{ amount }}"
[locales.fr]
title = "Reçu {{ order_id }}"
body = "Vous avez payé {{ amount }}"
[locales.pt-BR]
title = "Recibo {{ order_id }}"
body = "Você pagou {{ amount }}"
"""


def test_the_shipped_catalog_loads_with_the_four_default_categories() -> None:
    catalog = load_catalog()
    tiers = {name: c.tier for name, c in catalog.categories.items()}
    assert tiers == {
        "login_code": "transactional",
        "receipt": "transactional",
        "new_post": "social",
        "campaign": "marketing",
    }
    login = catalog.categories["login_code"]
    assert (login.quiet_hours, login.caps) == (False, False)  # transactional skips both
    assert (catalog.categories["campaign"].quiet_hours, catalog.categories["campaign"].caps) == (
        True,
        True,
    )
    assert login.default_channels == ("push", "sms") and login.fallback == ("push", "sms")
    assert set(catalog.templates) == {
        "login_code",
        "receipt",
        "new_post",
        "new_posts_bundle",
        "campaign",
    }
    assert catalog.templates["login_code"].variables == {"code", "minutes"}


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[categories.x", "not valid TOML"),
        ("", "no categories"),
        ("[other]\na = 1", "unknown top-level keys"),
        ('[categories.x]\ntier = "urgent"', "tier must be one of transactional, social, marketing"),
        ('[categories.X]\ntier = "social"', "lower-case"),
        ('[categories.x]\ntier = "social"\ncolor = "red"', "unknown keys ['color']"),
        ('[categories.x]\ntier = "social"\nchannels = { fax = true }', "unknown channels ['fax']"),
        ('[categories.x]\ntier = "social"\nchannels = { sms = true }', "not sms_eligible"),
        ('[categories.x]\ntier = "social"\nsms_eligible = 1', "true or false"),
        ('[categories.x]\ntier = "social"\nchannels = { push = false }', "at least one channel"),
        ('[categories.x]\ntier = "social"\nquiet_hours = "no"', "true or false"),
        ('[categories.x]\ntier = "social"\nchannels = { push = "yes" }', "true or false"),
        ('[categories.x]\ntier = "transactional"\ncaps = true', "never capped"),
        ('[categories.x]\ntier = "social"\nfallback = []', "two or more channels"),
        ('[categories.x]\ntier = "social"\nfallback = ["push"]', "two or more channels"),
        ('[categories.x]\ntier = "social"\nfallback = "push"', "two or more channels"),
        ('[categories.x]\ntier = "social"\nfallback = ["push", "fax"]', "unknown channels ['fax']"),
        ('[categories.x]\ntier = "social"\nfallback = ["push", "push"]', "a channel twice"),
        ('[categories.x]\ntier = "social"\nfallback = ["push", "sms"]', "not sms_eligible"),
        (
            '[categories.x]\ntier = "social"\nchannels = { email = false }\n'
            'fallback = ["push", "email"]',
            "which channels turns off",
        ),
        ('[categories.x]\ntier = "social"\ncap = 0', "cap must be a whole number from 1"),
        ('[categories.x]\ntier = "social"\ncap = 2.5', "cap must be a whole number from 1"),
        ('[categories.x]\ntier = "social"\ncap = true', "cap must be a whole number from 1"),
        ('[categories.x]\ntier = "social"\ncap = 70000', "from 1 to 65535"),
        ('[categories.x]\ntier = "social"\ncap_window_s = -1', "cap_window_s must be a whole"),
        ('[categories.x]\ntier = "social"\ncap_window_s = "1d"', "cap_window_s must be a whole"),
        ('[categories.x]\ntier = "transactional"\ncap = 3', "caps is off"),
        ('[categories.x]\ntier = "social"\ncaps = false\ncap_window_s = 60', "caps is off"),
    ],
)
def test_a_bad_categories_file_says_what_is_wrong_in_one_line(text: str, fragment: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_categories(text, "categories file c.toml")
    message = str(caught.value)
    assert fragment in message
    assert message.startswith("categories file c.toml")
    assert "\n" not in message


def test_category_settings_override_the_tier_defaults() -> None:
    parsed = parse_categories(
        '[categories.digest]\ntier = "marketing"\nquiet_hours = false\n'
        "channels = { push = false, inbox = true }",
        "f",
    )
    digest = parsed["digest"]
    assert (digest.quiet_hours, digest.caps) == (False, True)
    assert digest.default_channels == ("inbox",)
    assert not digest.sms_eligible


def test_a_category_may_have_its_own_cap_and_window_and_requests_carry_them() -> None:
    parsed = parse_categories(
        '[categories.promo]\ntier = "marketing"\ncap = 3\ncap_window_s = 604800\n'
        '[categories.news]\ntier = "social"\ncap = 2\n'
        '[categories.digest]\ntier = "marketing"',
        "f",
    )
    assert (parsed["promo"].cap, parsed["promo"].cap_window_s) == (3, 604_800)
    # Either one alone: the other stays the fan-out's default (FANFARE_NOTIFY_CAP_WINDOW_S).
    assert (parsed["news"].cap, parsed["news"].cap_window_s) == (2, None)
    assert (parsed["digest"].cap, parsed["digest"].cap_window_s) == (None, None)


def test_sms_is_only_for_categories_that_say_so() -> None:
    parsed = parse_categories(
        '[categories.code]\ntier = "transactional"\nsms_eligible = true\n'
        "channels = { push = true, sms = true, email = false }",
        "f",
    )
    assert parsed["code"].sms_eligible and parsed["code"].default_channels == ("push", "sms")


def test_a_fallback_turns_its_channels_on_in_its_order() -> None:
    parsed = parse_categories(
        '[categories.alert]\ntier = "transactional"\nchannels = { inbox = true }\n'
        'fallback = ["email", "push"]',
        "f",
    )
    alert = parsed["alert"]
    assert alert.fallback == ("email", "push")
    assert alert.default_channels == ("push", "inbox", "email")
    assert alert.fallback_for(("push", "inbox")) == ()  # one of them: nothing to choose
    assert alert.fallback_for(("push", "email")) == ("email", "push")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ('category = "receipt"\ndefault_locale = "en"', "no [locales.TAG] tables"),
        ('default_locale = "en"\n[locales.en]\ntitle="t"\nbody="b"', "category"),
        ('category = "receipt"\n[locales.en]\ntitle="t"\nbody="b"', "default_locale"),
        (
            'category = "receipt"\ndefault_locale = "de"\n[locales.en]\ntitle="t"\nbody="b"',
            "no [locales.de]",
        ),
        (
            'category = "receipt"\ndefault_locale = "en"\n[locales.en]\ntitle="t"',
            "both title and body",
        ),
        (
            'category = "receipt"\ndefault_locale = "en"\n[locales.en]\ntitle="t"\nbody="{{ x"',
            "syntax error",
        ),
        (
            'category = "receipt"\ndefault_locale = "en"\n[locales.en]\ntitle="t"\nbody="b"\nsubtitle="s"',
            "unknown keys",
        ),
        (
            'category = "receipt"\ndefault_locale = "en"\nextra = 1\n[locales.en]\ntitle="t"\nbody="b"',
            "unknown keys",
        ),
    ],
)
def test_a_bad_template_says_what_is_wrong_in_one_line(text: str, fragment: str) -> None:
    with pytest.raises(CatalogError) as caught:
        parse_template("t", text, "template t.toml")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_template_of_an_unknown_category_is_refused_with_the_catalog(tmp_path: Path) -> None:
    (tmp_path / "cats.toml").write_text('[categories.receipt]\ntier = "transactional"\n')
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "receipt.toml").write_text(TEMPLATE)
    (templates / "README.md").write_text("not a template: skipped")
    catalog = load_catalog(str(tmp_path / "cats.toml"), str(templates))
    assert set(catalog.templates) == {"receipt"}
    (templates / "promo.toml").write_text(TEMPLATE.replace('"receipt"', '"promo"', 1))
    with pytest.raises(CatalogError, match="category 'promo' is not in the categories file"):
        load_catalog(str(tmp_path / "cats.toml"), str(templates))
    with pytest.raises(CatalogError, match="no such file"):
        load_catalog(str(tmp_path / "missing.toml"), str(templates))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CatalogError, match=r"no \*\.toml template"):
        load_catalog(str(tmp_path / "cats.toml"), str(empty))


def test_fanfare_api_stops_with_one_line_on_a_bad_categories_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "cats.toml"
    bad.write_text('[categories.login_code]\ntier = "urgent"\n')
    monkeypatch.setenv("FANFARE_HOME", str(tmp_path))
    monkeypatch.setenv("FANFARE_CATEGORIES_FILE", str(bad))
    assert main(["api"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert err.startswith("fanfare api: cannot start: categories file ")
    assert "tier must be one of" in err


def test_locale_falls_back_to_the_language_then_the_default() -> None:
    t = parse_template("receipt", TEMPLATE, "t")
    data = {"order_id": "o1", "amount": "9.90 EUR"}
    assert render_push(t, "fr", data).title == "Reçu o1"
    assert render_push(t, "fr-CA", data).locale == "fr"  # language
    assert render_push(t, "pt_BR", data).title == "Recibo o1"  # tags ignore case and _ vs -
    assert render_push(t, "PT-br", data).locale == "pt-br"
    assert render_push(t, "pt", data).locale == "en"  # no `pt`: the default
    assert render_push(t, "ja", data).locale == "en"
    assert render_push(t, None, data).body == "You paid 9.90 EUR"


def test_strict_undefined_and_the_sandbox_refuse_to_render() -> None:
    t = parse_template("receipt", TEMPLATE, "t")
    assert t.missing_variables({"order_id": "o1"}) == ["amount"]
    with pytest.raises(RenderError, match="amount"):
        render_push(t, "en", {"order_id": "o1"})
    unsafe = parse_template(
        "x",
        'category = "c"\ndefault_locale = "en"\n[locales.en]\ntitle = "{{ v.__class__.__mro__ }}"\n'
        'body = "b"',
        "t",
    )
    with pytest.raises(RenderError):
        render_push(unsafe, "en", {"v": "text"})
    with pytest.raises(RenderError):
        check_renders(unsafe, {"v": "text"})


def test_the_payload_limit_is_the_providers() -> None:
    assert PROVIDER_PAYLOAD_LIMIT == MAX_PAYLOAD_BYTES == 4096


@pytest.mark.parametrize("char", ["a", "é", "😀"])
def test_a_long_body_is_shortened_to_fit_the_payload_limit(char: str) -> None:
    t = parse_template("receipt", TEMPLATE, "t")
    extra = {"notification_id": "n_1:u1", "device_id": "d1"}
    pushed = render_push(t, "en", {"order_id": "o1", "amount": char * 10_000}, extra=extra)
    assert pushed.truncated
    assert pushed.body.endswith(ELLIPSIS)
    size = payload_bytes(pushed.title, pushed.body, extra)
    assert size <= PROVIDER_PAYLOAD_LIMIT
    assert size > PROVIDER_PAYLOAD_LIMIT - 16  # as much text as fits, not far less
    short = render_push(t, "en", {"order_id": "o1", "amount": "5"}, extra=extra)
    assert not short.truncated and short.body == "You paid 5"


def test_a_huge_title_gives_way_after_the_body_and_ids_alone_cannot_exceed() -> None:
    title, body, shortened = fit_payload("T" * 9000, "body", {})
    assert shortened and body == "" and title.endswith(ELLIPSIS)
    assert payload_bytes(title, body, {}) <= PROVIDER_PAYLOAD_LIMIT
    with pytest.raises(PayloadTooLarge):
        fit_payload("t", "b", {"blob": "x" * 5000})


def test_payload_size_is_measured_as_the_providers_count_it() -> None:
    extra = {"link": "fanfare://x"}
    apns = json.dumps(
        {"aps": {"alert": {"title": "é", "body": "b"}, "sound": "default"}, **extra},
        ensure_ascii=False,
    ).encode()
    assert payload_bytes("é", "b", extra) >= len(apns)


def test_catalog_checks_templates_against_categories() -> None:
    cats = parse_categories('[categories.receipt]\ntier = "transactional"\n', "f")
    template = parse_template("receipt", TEMPLATE, "t")
    assert Catalog(cats, {"receipt": template}).templates["receipt"] is template
    with pytest.raises(CatalogError):
        Catalog({}, {"receipt": template})
