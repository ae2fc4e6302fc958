"""A read-only follower: topics read from where they end now, driven one step at a time.

For commands that watch what the workers produce (``linewatch run``, ``linewatch replay``) rather
than work on it: manual assignment of every partition at the end, nothing committed, no producer.
The start is fixed when the follower is built, so build it before anything is produced.
"""

from __future__ import annotations

from collections.abc import Sequence

from pipeline.config import KafkaSettings
from pipeline.runtime.loop import RuntimeConfig, Stage, StreamRuntime


class Follower(Stage):
    """Subclasses implement ``handle`` (and ``decode`` if they judge records themselves)."""

    def __init__(self, kafka: KafkaSettings, name: str, topics: Sequence[str], *, also_create: Sequence[str] = (),
                 max_batch: int = 500) -> None:
        # ``also_create``: topics others will write to, created now with the configured partitions.
        config = RuntimeConfig(name=name, group_id=None, topics=tuple(topics), output_topics=tuple(also_create),
                               start="end", producer=False, max_batch=max_batch)
        self._runtime = StreamRuntime(kafka, config, self)
        # Fix the start now, before anything is produced: earlier records belong to other runs.
        self._runtime.start()

    def poll(self, timeout_ms: int = 200) -> int:
        """Read what arrived (waiting up to ``timeout_ms`` for the first record); returns how many."""
        self._runtime.config.poll_timeout_ms = timeout_ms
        return self._runtime.step()

    def close(self) -> None:
        self._runtime.close()
