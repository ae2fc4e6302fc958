"""Paths built from message content (camera ids, class names, index entries) stay inside their root."""

from __future__ import annotations

from pathlib import Path


class PathEscapeError(ValueError):
    """A path built from untrusted parts resolves outside the folder it must stay in."""


def contained(root: str | Path, *parts: str) -> Path:
    """``root/parts...`` resolved (symlinks too); raises PathEscapeError unless it lies inside root.

    ``root`` itself does not count as inside: a part such as ``.`` or ``""`` naming the root is refused.
    """
    base = Path(root).resolve()
    path = base.joinpath(*parts).resolve()
    if base not in path.parents:
        shown = "/".join(parts)[:200]
        raise PathEscapeError(f"{shown!r} leaves {base}")
    return path
