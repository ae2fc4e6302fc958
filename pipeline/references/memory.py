"""From a reference set version to an installed memory: cached features, or computed and coreset."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.imaging import decode_image
from pipeline.logging import get_logger
from pipeline.references.coreset import subsample_memory
from pipeline.references.store import ReferenceSet, ReferenceStore

if TYPE_CHECKING:
    from pipeline.engine.engine import AnomalyEngine

log = get_logger(__name__)


def features_of(engine: AnomalyEngine, images: list[bytes], max_patches: int) -> dict[str, np.ndarray]:
    return subsample_memory(engine.reference_features([decode_image(b) for b in images]), max_patches)


def memory_for(engine: AnomalyEngine, store: ReferenceStore, ref: ReferenceSet,
               max_patches: int) -> dict[str, np.ndarray]:
    """The version's memory for this engine's method and weights; computed (and stored) when missing."""
    key = store.memory_key(ref.product_class, ref.version, engine.method, engine.fingerprint)
    cached = store.get_memory(key)
    if cached is not None:
        return cached
    arrays: dict[str, np.ndarray] | None = None
    if ref.parent is not None and ref.added:
        parent_key = store.memory_key(ref.product_class, ref.parent, engine.method, engine.fingerprint)
        parent = store.get_memory(parent_key)
        if parent is not None:
            # Incremental: the parent's (already bounded) memory plus the new frames, bounded again.
            new = engine.reference_features([decode_image(b) for b in store.images(ref, ref.added)])
            arrays = subsample_memory({k: np.concatenate([parent[k], new[k]]) for k in parent}, max_patches)
    if arrays is None:
        arrays = features_of(engine, store.images(ref), max_patches)
    store.put_memory(key, arrays)
    log.info("reference_memory_computed", tag=ref.tag, method=engine.method,
             rows={k: int(v.shape[0]) for k, v in arrays.items()})
    return arrays


def install(engine: AnomalyEngine, store: ReferenceStore, ref: ReferenceSet, max_patches: int) -> None:
    engine.set_reference_features(ref.product_class, memory_for(engine, store, ref, max_patches), len(ref.images))
