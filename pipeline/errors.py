"""Exceptions meaning bad input or environment, kept free of heavy imports so the CLI can catch
them without loading torch first."""

from __future__ import annotations


class WeightsError(RuntimeError):
    """Weights could not be loaded; the message says what was tried."""


class LLMError(RuntimeError):
    """The LLM endpoint failed or answered something unusable, after retries."""
