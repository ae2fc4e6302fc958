"""A minimal client for OpenAI-compatible chat-completions endpoints (ALFA prompt generation)."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import httpx

from pipeline.errors import LLMError
from pipeline.logging import get_logger

log = get_logger(__name__)


class ChatClient:
    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 30.0,
                 retries: int = 2, backoff_s: float = 0.5) -> None:
        base = url.rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s

    def complete_json(self, system: str, user: str) -> dict[str, Any]:
        """Ask for a JSON object; retries transport errors, 5xx/429 and unparsable answers."""
        body = {
            "model": self.model,
            "temperature": 0,
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
            "response_format": {"type": "json_object"},
        }
        last: str = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1) * (0.5 + random.random()))
            try:
                resp = httpx.post(self.endpoint, json=body, headers=self.headers, timeout=self.timeout)
            except httpx.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                log.warning("llm_request_failed", attempt=attempt, error=last)
                continue
            if resp.status_code >= 500 or resp.status_code == 429:
                last = f"HTTP {resp.status_code}"
                log.warning("llm_request_failed", attempt=attempt, error=last)
                continue
            if resp.status_code >= 400:
                raise LLMError(f"{self.endpoint} answered HTTP {resp.status_code}: {resp.text[:200]}")
            try:
                content = resp.json()["choices"][0]["message"]["content"]
                return _parse_json_object(content)
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                last = f"malformed response: {exc}"
                log.warning("llm_bad_response", attempt=attempt, error=last)
        raise LLMError(f"{self.endpoint}: giving up after {self.retries + 1} attempts ({last})")


def _parse_json_object(content: str) -> dict[str, Any]:
    """Models sometimes wrap JSON in prose or code fences: take the outermost object."""
    if not isinstance(content, str):
        raise ValueError(f"answer content is {type(content).__name__}, not text")
    start, end = content.find("{"), content.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("no JSON object in the answer")
    data = json.loads(content[start : end + 1])
    if not isinstance(data, dict):
        raise ValueError("answer is not a JSON object")
    return data
