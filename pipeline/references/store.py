"""Versioned normal reference sets per product class, in Redis.

What a version holds: **images** (the encoded frames, JPEG or PNG as they came). Images are the
source of truth because they outlive a model change; the patch-feature memory a scorer needs is
derived from them per (version, method, model fingerprint), subsampled by greedy coreset to
``references.max_patches`` rows per bank, and cached beside the version so only the first scorer
(or ``linewatch references collect``, which computes it anyway) pays for it. A version made by
adding frames to a parent (a false alarm) records them as ``added``, so its memory is the parent's
memory plus the new frames' features, coreset again: N is never re-encoded.

Keys (``p`` is ``redis.key_prefix``, ``c`` the product class):
    p:refs:current            hash  class -> current version number (scorers poll this one key)
    p:refs:c:{c}:versions     zset  version -> created_ts
    p:refs:c:{c}:next         int   last version number handed out
    p:refs:c:{c}:v{N}         str   manifest JSON (``ReferenceSet``)
    p:refs:c:{c}:img:{sha}    str   image bytes (shared by the versions that list the sha)
    p:refs:c:{c}:v{N}:mem:{method}:{fingerprint}   str   feature bundle (prompt-cache encoding)
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import numpy as np
import redis
from pydantic import BaseModel, ConfigDict, Field

from pipeline.engine.prompt_cache import decode_bundle, encode_bundle
from pipeline.logging import get_logger

log = get_logger(__name__)


class ReferenceSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    product_class: str
    version: int = Field(ge=1)
    parent: int | None = None
    created_ts: float
    source: str = Field(description="collect:camera:<id>, collect:recording:<path>, false_alarm:<event>, import")
    note: str | None = None
    by: str | None = None
    images: list[str]  # sha256 ids (first 24 hex) of the images, in order
    added: list[str] = []  # the images this version added to its parent
    # Memory sizes computed when the version was made (method -> rows per bank), for `show`.
    memory_rows: dict[str, dict[str, int]] = {}

    @property
    def tag(self) -> str:
        return f"{self.product_class}:v{self.version}"


def image_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:24]


class ReferenceStore:
    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self._client = client
        self._prefix = prefix
        self.current_key = f"{prefix}:refs:current"

    def _key(self, product_class: str, suffix: str) -> str:
        return f"{self._prefix}:refs:c:{product_class}:{suffix}"

    def memory_key(self, product_class: str, version: int, method: str, fingerprint: str) -> str:
        return self._key(product_class, f"v{version}:mem:{method}:{fingerprint}")

    # -- reads ---------------------------------------------------------------------------------
    def current_versions(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self._client.hgetall(self.current_key).items()}

    def current(self, product_class: str) -> ReferenceSet | None:
        raw = self._client.hget(self.current_key, product_class)
        return self.get(product_class, int(raw)) if raw is not None else None

    def get(self, product_class: str, version: int) -> ReferenceSet | None:
        raw = self._client.get(self._key(product_class, f"v{version}"))
        return ReferenceSet.model_validate_json(raw) if raw is not None else None

    def versions(self, product_class: str) -> list[ReferenceSet]:
        numbers = [int(v) for v in self._client.zrange(self._key(product_class, "versions"), 0, -1)]
        found = [self.get(product_class, n) for n in numbers]
        return [r for r in found if r is not None]

    def classes(self) -> list[str]:
        names = {k.decode() for k in self._client.hkeys(self.current_key)}
        for key in self._client.scan_iter(match=f"{self._prefix}:refs:c:*:versions", count=200):
            text = key.decode()
            names.add(text[len(f"{self._prefix}:refs:c:"):-len(":versions")])
        return sorted(names)

    def images(self, ref: ReferenceSet, ids: list[str] | None = None) -> list[bytes]:
        wanted = ref.images if ids is None else ids
        if not wanted:
            return []
        raws = self._client.mget([self._key(ref.product_class, f"img:{i}") for i in wanted])
        missing = [i for i, r in zip(wanted, raws, strict=True) if r is None]
        if missing:
            raise LookupError(f"reference set {ref.tag} lost {len(missing)} image(s), e.g. {missing[0]}")
        return [bytes(r) for r in raws]

    def get_memory(self, key: str) -> dict[str, np.ndarray] | None:
        raw = self._client.get(key)
        return dict(decode_bundle(bytes(raw))) if raw is not None else None

    def put_memory(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        self._client.set(key, encode_bundle(arrays))

    # -- writes --------------------------------------------------------------------------------
    def create(self, product_class: str, images: list[bytes], source: str, *, parent: ReferenceSet | None = None,
               note: str | None = None, by: str | None = None, make_current: bool = True,
               memory: dict[str, Any] | None = None) -> ReferenceSet:
        """A new version: the parent's images plus ``images`` (duplicates dropped), made current.

        ``memory``: optional {"method", "fingerprint", "arrays"} already computed for this version.
        """
        if not images and parent is None:
            raise ValueError(f"a reference set for {product_class!r} needs at least one image")
        ids = [image_id(b) for b in images]
        base = list(parent.images) if parent is not None else []
        known = set(base)
        added = []
        for i in ids:
            if i not in known:
                known.add(i)
                added.append(i)
        version = int(self._client.incr(self._key(product_class, "next")))
        rows = {}
        if memory is not None:
            rows = {memory["method"]: {k: int(v.shape[0]) for k, v in memory["arrays"].items()}}
        ref = ReferenceSet(product_class=product_class, version=version,
                           parent=parent.version if parent is not None else None, created_ts=time.time(),
                           source=source, note=note, by=by, images=base + added, added=added, memory_rows=rows)
        pipe = self._client.pipeline(transaction=True)
        for i, data in zip(ids, images, strict=True):
            pipe.set(self._key(product_class, f"img:{i}"), data)
        if memory is not None:
            pipe.set(self.memory_key(product_class, version, memory["method"], memory["fingerprint"]),
                     encode_bundle(memory["arrays"]))
        pipe.set(self._key(product_class, f"v{version}"), ref.model_dump_json())
        pipe.zadd(self._key(product_class, "versions"), {str(version): ref.created_ts})
        if make_current:
            pipe.hset(self.current_key, product_class, str(version))
        pipe.execute()
        log.info("reference_set_created", product_class=product_class, version=version, images=len(ref.images),
                 added=len(added), source=source, current=make_current)
        return ref

    def set_current(self, product_class: str, version: int) -> None:
        if self.get(product_class, version) is None:
            raise KeyError(f"no reference set {product_class}:v{version}")
        self._client.hset(self.current_key, product_class, str(version))

    def remove(self, product_class: str, version: int) -> ReferenceSet | None:
        """Delete a version; if it was current, the newest remaining one becomes current (or none).

        Returns the new current set (None: the class is back to engine.shots_dir / zero-shot).
        """
        ref = self.get(product_class, version)
        if ref is None:
            raise KeyError(f"no reference set {product_class}:v{version}")
        self._client.zrem(self._key(product_class, "versions"), str(version))
        mem_keys = list(self._client.scan_iter(match=self._key(product_class, f"v{version}:mem:*"), count=200))
        self._client.delete(self._key(product_class, f"v{version}"), *mem_keys)
        remaining = self.versions(product_class)
        still_used = {i for r in remaining for i in r.images}
        orphans = [self._key(product_class, f"img:{i}") for i in ref.images if i not in still_used]
        if orphans:
            self._client.delete(*orphans)
        current = self._client.hget(self.current_key, product_class)
        if current is not None and int(current) == version:
            if remaining:
                self._client.hset(self.current_key, product_class, str(remaining[-1].version))
            else:
                self._client.hdel(self.current_key, product_class)
        log.info("reference_set_removed", product_class=product_class, version=version)
        return self.current(product_class)


def describe(ref: ReferenceSet, current: bool = False) -> dict[str, Any]:
    data = json.loads(ref.model_dump_json())
    data["tag"] = ref.tag
    data["n_images"] = len(ref.images)
    data["current"] = current
    return data
