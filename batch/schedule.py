"""The batch daemon: APScheduler (3.x) runs the job on a schedule, one run at a time.

SIGTERM or SIGINT stops it cleanly: a run in progress either finishes or is abandoned at its
next checkpoint, always before CURRENT moves, so a snapshot is never half-published.
"""
from __future__ import annotations

import logging
import re
import signal
import threading
from datetime import datetime, timezone
from typing import Callable

from apscheduler.events import EVENT_JOB_MAX_INSTANCES, EVENT_JOB_MISSED
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from batch.job import run
from serving.errors import Abandoned, ConfigError, HybridServeError, StoreLockedError, ValidationFailed
from serving.settings import Settings

LOG = logging.getLogger(__name__)
_EVERY = re.compile(r"every\s+(\d+(?:\.\d+)?)\s*s")


def make_trigger(expr: str, source: str = "batch.schedule"):
    """A 5-field crontab expression (UTC), or 'every <N>s' for short fixed intervals."""
    m = _EVERY.fullmatch(expr.strip())
    if m:
        return IntervalTrigger(seconds=float(m.group(1)), timezone=timezone.utc)
    try:
        return CronTrigger.from_crontab(expr, timezone=timezone.utc)
    except ValueError as exc:
        raise ConfigError(f"{source}: {expr!r} is not a crontab expression or 'every <N>s': {exc}") from None


class Daemon:
    def __init__(self, settings: Settings, run_job: Callable[..., object] = run, trigger=None):
        self.settings, self.run_job = settings, run_job
        self.stop_requested = threading.Event()
        self.scheduler = BlockingScheduler(timezone=timezone.utc)
        self.counts = {"runs": 0, "published": 0, "skipped_overlap": 0, "locked": 0, "failed": 0, "missed": 0}
        trigger = trigger or make_trigger(settings["batch.schedule"], f"{settings.source}: batch.schedule")
        self.job = self.scheduler.add_job(self._tick, trigger, id="batch-run", name="hybridserve batch run",
                                          max_instances=1, coalesce=True,
                                          misfire_grace_time=int(settings["batch.misfire_grace_s"]))
        self.scheduler.add_listener(self._on_event, EVENT_JOB_MAX_INSTANCES | EVENT_JOB_MISSED)

    def _on_event(self, event) -> None:
        if event.code == EVENT_JOB_MAX_INSTANCES:
            self.counts["skipped_overlap"] += 1
            LOG.warning("skipped a run: the previous one is still going")
        else:
            self.counts["missed"] += 1
            LOG.warning("missed a run time by more than the grace time")

    def _next_fire(self) -> str:
        nxt = getattr(self.job, "next_run_time", None)
        return nxt.isoformat() if nxt else "none"

    def _tick(self) -> None:
        self.counts["runs"] += 1
        started = datetime.now(timezone.utc)
        try:
            result = self.run_job(self.settings, should_stop=self.stop_requested.is_set)
            self.counts["published"] += 1
            LOG.info("published snapshot %s", getattr(result, "snapshot_id", result))
        except StoreLockedError as exc:
            self.counts["locked"] += 1
            LOG.warning("another run holds the store lock; this one skipped (%s)", exc)
        except Abandoned as exc:
            LOG.warning("%s", exc)
        except (ValidationFailed, HybridServeError) as exc:
            self.counts["failed"] += 1
            LOG.error("run failed: %s", exc)
        except Exception:  # the daemon outlives a bad run; the run record has the details
            self.counts["failed"] += 1
            LOG.exception("run crashed")
        finally:
            LOG.info("run started %s ended; next run at %s", started.isoformat(), self._next_fire())

    def stop(self, *_args) -> None:
        """Ask a running job to stop at its next checkpoint, then shut the scheduler down."""
        if self.stop_requested.is_set():
            return
        LOG.warning("stopping: a run in progress finishes or is abandoned before CURRENT moves")
        self.stop_requested.set()
        threading.Thread(target=self.scheduler.shutdown, kwargs={"wait": True}, daemon=True).start()

    def serve(self, install_signals: bool = True) -> None:
        """Run until stop() (SIGTERM / SIGINT): blocks in the scheduler's loop."""
        if install_signals:
            signal.signal(signal.SIGTERM, self.stop)
            signal.signal(signal.SIGINT, self.stop)
        first = self.job.trigger.get_next_fire_time(None, datetime.now(timezone.utc))
        LOG.info("scheduler started (%s); next run at %s", self.settings["batch.schedule"],
                 first.isoformat() if first else "none")
        self.scheduler.start()
        LOG.info("scheduler stopped")
