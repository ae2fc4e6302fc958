"""Scorers follow the current reference version of each class without a restart.

One HGETALL of ``p:refs:current`` at most every ``references.poll_s`` (checked per batch): a class
whose version moved is reloaded before the batch is scored, so a false alarm taught at time t is
in effect for frames scored from about t + poll_s on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from pipeline.logging import get_logger
from pipeline.references.memory import install
from pipeline.references.store import ReferenceStore

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.engine.engine import AnomalyEngine

log = get_logger(__name__)


class ReferenceSync:
    def __init__(self, store: ReferenceStore, max_patches: int, poll_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self.max_patches = max_patches
        self.poll_s = poll_s
        self._clock = clock
        self._table: dict[str, int] | None = None
        self._checked = float("-inf")
        self._warned = False
        self._loaded: dict[str, str] = {}
        self._retry: set[str] = set()  # classes whose load failed: tried again at the next poll

    @classmethod
    def from_settings(cls, settings: Settings) -> ReferenceSync | None:
        """None without Redis: references then come from engine.shots_dir only."""
        if settings.redis.url is None:
            return None
        from pipeline.redis_store import connect

        return cls(ReferenceStore(connect(settings.redis), settings.redis.key_prefix),
                   settings.references.max_patches, settings.references.poll_s)

    def changed(self) -> set[str]:
        """Classes whose current version differs from the last poll (throttled to one read per poll_s)."""
        now = self._clock()
        if self._table is not None and now - self._checked < self.poll_s:
            return set()
        self._checked = now
        try:
            table = self.store.current_versions()
        except RedisError as exc:
            if not self._warned:
                log.warning("reference_poll_failed", error=repr(exc), effect="keeping the loaded versions")
                self._warned = True
            return set()
        self._warned = False
        old, self._table = self._table or {}, table
        retry, self._retry = self._retry, set()
        return retry | {c for c in set(old) | set(table) if old.get(c) != table.get(c)}

    def load(self, engine: AnomalyEngine, product_class: str) -> str | None:
        """Install the class's current version; returns its tag, or None when the class has none.

        Redis trouble or a damaged version keeps what is installed (and says so): frames are never
        rejected because references could not be refreshed.
        """
        if self._table is None:
            self.changed()
        version = (self._table or {}).get(product_class)
        if version is None:
            self._loaded.pop(product_class, None)
            return None
        try:
            ref = self.store.get(product_class, version)
            if ref is None:
                raise LookupError(f"version {version} is gone")
            install(engine, self.store, ref, self.max_patches)
        except (RedisError, LookupError, ValueError) as exc:
            kept = self._loaded.get(product_class)
            self._retry.add(product_class)
            log.warning("reference_load_failed", product_class=product_class, version=version, error=repr(exc),
                        keeping=kept)
            return kept
        self._loaded[product_class] = ref.tag
        return ref.tag
