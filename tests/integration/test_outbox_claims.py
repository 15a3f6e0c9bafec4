"""The SQL claim is the model's rule: on random tables, with another relay holding some keys."""

from __future__ import annotations

import random

import psycopg
import pytest

from operators.adapters.postgres.outbox import OutboxTable, PostgresOutbox, migrate
from operators.outbox.model import OutboxRow, TableName, claimable
from schemas.topics import ALL_TOPICS
from tests.conftest import POSTGRES_URL

pytestmark = pytest.mark.integration


def test_claims_match_the_model_and_a_hot_key_costs_one_window(postgres_schema: str) -> None:
    table = OutboxTable.of(TableName.parse(f"{postgres_schema}.fanfare_outbox"))
    with psycopg.connect(POSTGRES_URL) as conn:
        migrate(conn, table, ALL_TOPICS)
    rng = random.Random(16)
    first, second = PostgresOutbox(POSTGRES_URL, table), PostgresOutbox(POSTGRES_URL, table)
    try:
        for scenario in range(25):
            with psycopg.connect(POSTGRES_URL) as conn:
                conn.execute(f"DELETE FROM {postgres_schema}.fanfare_outbox")
                keys = [f"k{i}" for i in range(rng.choice([1, 3, 30, 300]))]
                for _ in range(rng.randint(1, 400)):
                    conn.execute(
                        f"INSERT INTO {postgres_schema}.fanfare_outbox (topic, key, payload) "
                        "VALUES ('post_created', %s, '{}')",
                        [rng.choice(keys)],
                    )
                conn.commit()
                pending = [
                    OutboxRow(int(i), "post_created", str(k), b"{}", 0.0)
                    for i, k in conn.execute(
                        f"SELECT id, key FROM {postgres_schema}.fanfare_outbox"
                    ).fetchall()
                ]
            held = first.claim(rng.choice([1, 5, 50]))
            limit = rng.choice([1, 7, 100])
            got = second.claim(limit)
            want = claimable(pending, {r.id for r in held}, limit)
            assert [r.id for r in got] == [r.id for r in want], scenario
            assert not {r.id for r in got} & {r.id for r in held}
            first.release()
            second.release()
    finally:
        first.close()
        second.close()
