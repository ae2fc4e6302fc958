"""ALFA's per-class prompt pools: descriptions from an LLM or a curated offline vocabulary.

Descriptions are wrapped in templates and, optionally, joined by WinCLIP's compositional prompts
as a prior. The resulting `PromptSet` is plain data with a content hash as its version, so the
text-embedding cache changes exactly when the prompts do.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path

from pipeline.config import LLMSettings
from pipeline.engine.llm import ChatClient, LLMError
from pipeline.engine.prompting import compositional_prompts
from pipeline.logging import get_logger
from pipeline.paths import contained

log = get_logger(__name__)

NORMAL_TEMPLATES = ("a photo of a {c}, {d}.", "a close-up photo of the {c} showing {d}.")
ABNORMAL_TEMPLATES = ("a photo of a {c} with {d}.", "a close-up photo of the {c} showing {d}.")
MAX_WORDS = 12

SYSTEM_PROMPT = "You are an industrial visual inspection expert."
USER_PROMPT = (
    "Object category: {c}.\n"
    "Give {n} short visual descriptions of a normal, defect-free {c} as seen in a photo, and {n} visual "
    "descriptions of defects or anomalies a {c} can show (surface, structure, colour, missing or extra "
    "parts, misplacement). Each item at most 12 words, visual attributes only, no context, no reasoning. "
    'Answer only with JSON: {{"normal": [...], "abnormal": [...]}}'
)


@dataclass(frozen=True)
class PromptSet:
    normal: tuple[str, ...]
    abnormal: tuple[str, ...]
    source: str = field(default="offline")

    @property
    def version(self) -> str:
        payload = json.dumps([self.source, self.normal, self.abnormal]).encode()
        return hashlib.sha256(payload).hexdigest()[:16]


@cache
def _vocabulary() -> dict[str, dict[str, list[str]]]:
    text = resources.files("pipeline.engine").joinpath("vocab/defects.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def material_family(object_name: str) -> str:
    """Pick the vocabulary family whose keywords occur in the name (longest keyword wins)."""
    name = object_name.lower()
    best, best_len = "generic", 0
    for family, entry in _vocabulary().items():
        for kw in entry["keywords"]:
            # Whole words only: "walnut" is not a "nut", "scanner" is not a "can".
            if re.search(rf"\b{re.escape(kw)}s?\b", name) and len(kw) > best_len:
                best, best_len = family, len(kw)
    return best


def offline_descriptions(object_name: str) -> tuple[list[str], list[str]]:
    entry = _vocabulary()[material_family(object_name)]
    generic = _vocabulary()["generic"]
    normal = list(dict.fromkeys(entry["normal"] + generic["normal"]))
    abnormal = list(dict.fromkeys(entry["abnormal"] + generic["abnormal"]))
    return normal, abnormal


def _clean(items: object, limit: int) -> list[str]:
    """Keep short, single-line strings; the LLM's answer is untrusted input."""
    if not isinstance(items, list):
        raise ValueError("expected a list of strings")
    out = []
    for item in items:
        if not isinstance(item, str):
            continue
        text = " ".join(item.strip().strip(".").split())
        if text and len(text.split()) <= MAX_WORDS and text not in out:
            out.append(text)
    return out[:limit]


def llm_descriptions(client: ChatClient, object_name: str, n: int) -> tuple[list[str], list[str]]:
    data = client.complete_json(SYSTEM_PROMPT, USER_PROMPT.format(c=object_name, n=n))
    try:
        normal, abnormal = _clean(data.get("normal"), n), _clean(data.get("abnormal"), n)
    except ValueError as exc:
        raise LLMError(f"LLM answer has the wrong shape: {exc}") from exc
    if len(normal) < 2 or len(abnormal) < 2:
        raise LLMError(f"LLM answer too small: {len(normal)} normal, {len(abnormal)} abnormal descriptions")
    return normal, abnormal


def compose(object_name: str, normal: list[str], abnormal: list[str], source: str,
            include_cpe: bool = True) -> PromptSet:
    n = [t.format(c=object_name, d=d) for d in normal for t in NORMAL_TEMPLATES]
    a = [t.format(c=object_name, d=d) for d in abnormal for t in ABNORMAL_TEMPLATES]
    if include_cpe:
        cpe_n, cpe_a = compositional_prompts(object_name)
        n += list(dict.fromkeys(cpe_n))
        a += list(dict.fromkeys(cpe_a))
    return PromptSet(tuple(n), tuple(a), source)


def prompt_cache_file(cache_dir: Path, model: str, object_name: str) -> Path:
    """The LLM answer's cache file: named by a hash, since class names come from frame headers."""
    digest = hashlib.sha256(json.dumps([model, object_name]).encode()).hexdigest()[:32]
    return contained(cache_dir, f"alfa-{digest}.json")


def build_prompt_set(object_name: str, llm: LLMSettings, cache_dir: Path | None = None,
                     include_cpe: bool = True) -> PromptSet:
    """LLM descriptions when an endpoint is configured (cached on disk), else the offline vocabulary.

    A failing LLM falls back to the offline vocabulary with a warning: scoring must not stop
    because a text service is down.
    """
    if llm.url:
        cached = prompt_cache_file(cache_dir, llm.model, object_name) if cache_dir else None
        if cached is not None and cached.is_file():
            try:
                data = json.loads(cached.read_text())
                return compose(object_name, data["normal"], data["abnormal"], f"llm:{llm.model}", include_cpe)
            except (ValueError, KeyError, TypeError) as exc:  # a damaged cache is re-asked, not fatal
                log.warning("llm_prompt_cache_unreadable", path=str(cached), error=str(exc))
        client = ChatClient(llm.url, llm.model, llm.api_key, llm.timeout_s, llm.retries)
        try:
            normal, abnormal = llm_descriptions(client, object_name, llm.n_prompts)
        except LLMError as exc:
            log.warning("llm_prompts_failed_using_offline", object=object_name, error=str(exc))
        else:
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                tmp = cached.with_suffix(".tmp")  # atomic: a crash never leaves half a file behind
                tmp.write_text(json.dumps({"normal": normal, "abnormal": abnormal}, indent=1))
                tmp.replace(cached)
            return compose(object_name, normal, abnormal, f"llm:{llm.model}", include_cpe)
    normal, abnormal = offline_descriptions(object_name)
    return compose(object_name, normal, abnormal, f"offline:{material_family(object_name)}", include_cpe)
