"""Worker crashes and a two-process cluster, counted where it matters.

- The fan-out worker is killed with SIGKILL in the middle of a 50,000-follower post while the
  delivery flow sends what it dispatches; its supervisor restarts it from the recovery
  directory. At the APNs and FCM servers every follower's device got the push exactly once.
- The delivery worker is killed with SIGKILL in the middle of sending 8,000 pushes (APNs and
  FCM, answers held back 20 ms so many are in flight, up to FANFARE_DELIVERY_IN_FLIGHT). Nothing
  is lost; the only repeats are sends that were in flight, resent after the restart: on APNs
  with the same apns-id (what APNs' protocol allows, as in tests/integration/test_delivery_e2e.py),
  on FCM counted apart (FCM has no idempotency key: a send accepted just before the kill, answer
  lost, goes again).
- The same scenario through `fanfare run fanout --processes 2` and `--processes 1`, each on a
  fresh stack: both dispatch exactly the expected pushes, each once.

The scenarios are `scripts/harness/chaos.py`'s, at its small scale;
`python -m scripts.harness.chaos --scale full` runs them larger for the figures of
docs/operations.md, "Reliability".
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from scripts.harness.chaos import SMALL, Result, cluster, crash_delivery, crash_fanout
from scripts.harness.chaos_stack import ChaosStack

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]


def test_fanout_worker_killed_mid_fanout_every_device_gets_one_push(
    chaos: ChaosStack, survived: Callable[[Result], Result]
) -> None:
    r = survived(crash_fanout(chaos, SMALL))
    c = r.counts
    assert c["expected"] == c["delivered"] == SMALL.crash_followers
    assert c["lost"] == c["duplicated"] == c["unexpected"] == 0
    # Delivery itself was not interrupted: not even a protocol-allowed resend.
    assert c["apns_resends"] == c["fcm_resends"] == 0
    assert 0 < r.details["dispatched_at_kill"] < SMALL.crash_followers
    assert r.details["dispatch_items"] == SMALL.crash_followers
    assert r.details["dispatch_repeats"] == 0
    assert r.details["fanout_restarts"] == 1
    assert r.recover_healthy_s is not None and r.recover_delivered_s is not None


def test_delivery_worker_killed_mid_send_loses_nothing_and_repeats_only_interrupted_sends(
    chaos: ChaosStack, survived: Callable[[Result], Result]
) -> None:
    r = survived(crash_delivery(chaos, SMALL))
    c = r.counts
    assert c["expected"] == c["delivered"] == SMALL.delivery_items
    assert c["lost"] == c["duplicated"] == c["unexpected"] == 0
    assert 0 < r.details["accepted_at_kill"] < SMALL.delivery_items
    # Repeats are bounded by what was in flight: the worker's in-flight limit.
    assert c["apns_resends"] + c["fcm_resends"] <= r.details["in_flight_limit"]
    assert r.details["outcomes"] == {"accepted": SMALL.delivery_items}


def test_two_process_cluster_dispatches_exactly_what_one_process_does(
    chaos: ChaosStack, survived: Callable[[Result], Result]
) -> None:
    r = survived(cluster(chaos, SMALL))
    # The same pushes (provider, post, user, device). The lane a post takes is reported apart
    # (`notes`): it is chosen from the follower count when the post is read, which a cluster
    # can read before the follow changes are applied (seen at the full scale, 32 shards).
    assert r.details["same_pushes"]
    c = r.counts
    assert c["expected"] == c["delivered"] > 0
    assert c["lost"] == c["duplicated"] == c["unexpected"] == 0
    one = r.details["one_process"]
    assert one["items"] == c["expected"] and one["missing"] == one["unexpected"] == 0
    assert r.details["two_processes"]["items"] == c["expected"]
