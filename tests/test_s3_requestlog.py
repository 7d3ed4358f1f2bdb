"""Request logs from every replica land in the store, one prefix per replica, and the next batch
run reads all of them: every row once."""
from __future__ import annotations

from collections import Counter
from datetime import datetime, timezone

from batch.catalog import query, refresh_views
from batch.popularity import read_request_counts
from conftest import new_bucket
from serving.requestlog import RequestLog
from serving.store import Store


def test_every_replica_s_segments_are_read_once(s3, tmp_path):
    url = f"s3://{new_bucket('log')}/store"
    sent: Counter = Counter()
    for replica, items, flushes in (("host-a", range(1, 8), 3), ("host-b", range(5, 12), 2)):
        store = Store(url, cache_dir=tmp_path / replica, replica=replica)
        store.ensure_layout()
        log = RequestLog(store, flush_rows=10_000, flush_interval_s=0)
        for f in range(flushes):  # several segments per replica
            for item in items:
                log.append("similar_items", item, None, 10, "precomputed", 200, 100)
                sent[item] += 1
            assert log.flush() == len(items)
        log.append("similar_items", 99, None, 10, "live", 404, 50)  # not answered: never counted
        log.close()  # what SIGTERM does: the last rows flushed
    reader = Store(url, cache_dir=tmp_path / "batch")
    segments = reader.segments()
    assert len(segments) == 3 + 1 + 2 + 1
    assert {s.split("/requests/")[1].split("/")[0] for s in segments} == {"host-a", "host-b"}
    counts = read_request_counts(reader, datetime.now(timezone.utc))
    got = Counter({int(r.item_id): int(r.n) for r in counts.itertuples()})
    assert got == sent  # every answered row from both replicas, none twice
    refresh_views(reader)
    assert query(reader, "SELECT count(*) FROM requests")[1] == [(sum(sent.values()) + 2,)]
