"""Prompt-embedding cache interface and its in-process implementations.

Values are named raw arrays serialised as a JSON header (name, dtype, shape) followed by the
bytes: portable, inspectable, and never pickle.
"""

from __future__ import annotations

import json
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

ArrayBundle = dict[str, np.ndarray]
_MAGIC = b"LWA1"


def cache_key(product_class: str, method: str, prompt_version: str, fingerprint: str) -> str:
    """Everything that changes the text embeddings is part of the key."""
    return f"prompts:{method}:{prompt_version}:{fingerprint}:{product_class}"


def encode_bundle(bundle: Mapping[str, np.ndarray]) -> bytes:
    meta = []
    blobs = []
    for name, arr in bundle.items():
        arr = np.ascontiguousarray(arr)
        meta.append({"name": name, "dtype": arr.dtype.str, "shape": list(arr.shape)})
        blobs.append(arr.tobytes())
    header = json.dumps(meta).encode()
    return _MAGIC + struct.pack("<I", len(header)) + header + b"".join(blobs)


def decode_bundle(data: bytes) -> ArrayBundle:
    if data[:4] != _MAGIC:
        raise ValueError("not an array bundle")
    (hlen,) = struct.unpack("<I", data[4:8])
    meta = json.loads(data[8 : 8 + hlen])
    offset = 8 + hlen
    out: ArrayBundle = {}
    for item in meta:
        dtype = np.dtype(item["dtype"])
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        count = int(np.prod(item["shape"], dtype=np.int64))
        nbytes = count * dtype.itemsize
        out[item["name"]] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(item["shape"])
        offset += nbytes
    if offset != len(data):
        raise ValueError("array bundle has trailing or missing bytes")
    return out


class PromptCache(Protocol):
    """What the engine needs from a cache of text embeddings."""

    def get_or_compute(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle: ...


class NullCache:
    """Always computes; for one-shot commands."""

    def get_or_compute(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle:
        return compute()


class MemoryCache:
    """Thread-safe LRU in process memory; also the front tier of the Redis cache."""

    def __init__(self, max_entries: int = 64) -> None:
        self._data: OrderedDict[str, ArrayBundle] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ArrayBundle | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return value

    def put(self, key: str, value: ArrayBundle) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self._max:
                self._data.popitem(last=False)

    def get_or_compute(self, key: str, compute: Callable[[], ArrayBundle]) -> ArrayBundle:
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value
