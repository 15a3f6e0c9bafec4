"""FANFARE_DELIVERY_PROVIDERS: a delivery process reads only the lane topics of the providers named."""

from __future__ import annotations

from typing import Any

import pytest

import flows.delivery
from operators.adapters.kafka import channel_lanes
from operators.adapters.kafka.channel_lanes import BulkPacer, ChannelLanesSource
from operators.config import ConfigError, delivery_providers, load_settings
from operators.delivery.pipeline import DeliveryPump


def test_empty_means_every_provider_in_the_usual_order() -> None:
    every = delivery_providers(load_settings({}))
    assert every[:2] == ("apns", "fcm") and {"email", "sms", "webpush", "chat", "inapp"} <= set(
        every
    )
    named = load_settings({"FANFARE_DELIVERY_PROVIDERS": "fcm, apns"})
    assert delivery_providers(named) == ("apns", "fcm")


def test_an_unknown_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match="pager"):
        load_settings({"FANFARE_DELIVERY_PROVIDERS": "apns,pager"})


def test_the_source_lists_only_the_named_providers_partitions(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[list[str]] = []

    def partitions(config: Any, topics: list[str]) -> list[str]:
        asked.append(list(topics))
        return [f"{t}/{i}" for t in topics for i in range(2)]

    monkeypatch.setattr(channel_lanes, "topic_partitions", partitions)
    kafka = load_settings({}).kafka_config()
    pump = DeliveryPump(lambda: None)  # type: ignore[arg-type,return-value]
    source = ChannelLanesSource(kafka, BulkPacer(), pump, providers=("apns", "fcm"))
    assert source.list_parts() == ["apns#0", "apns#1", "fcm#0", "fcm#1"]
    assert {t for topics in asked for t in topics} == {
        "push.apns",
        "push.apns.bulk",
        "push.apns.transactional",
        "push.fcm",
        "push.fcm.bulk",
        "push.fcm.transactional",
    }


def test_the_flow_reads_the_configured_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    built: dict[str, Any] = {}
    real = flows.delivery.ChannelLanesSource

    def capture(*args: Any, **kwargs: Any) -> ChannelLanesSource:
        built.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(flows.delivery, "ChannelLanesSource", capture)
    flows.delivery.get_flow(load_settings({"FANFARE_DELIVERY_PROVIDERS": "apns"}))
    assert built["providers"] == ("apns",)
