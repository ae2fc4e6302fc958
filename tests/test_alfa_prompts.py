"""ALFA prompt pools: the offline vocabulary, and the LLM path against a real loopback chat server."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import open_clip
import pytest

from pipeline.config import LLMSettings
from pipeline.engine.alfa_prompts import (
    MAX_WORDS,
    PromptSet,
    build_prompt_set,
    compose,
    llm_descriptions,
    material_family,
    offline_descriptions,
)
from pipeline.engine.llm import ChatClient, LLMError
from pipeline.engine.prompting import compositional_prompts
from tests.chat_server import (
    ChatServer,
    answer,
    disconnect,
    fenced,
    malformed,
    ok,
    slow,
    status,
    wrong_shape,
)

NORMAL = ["a smooth ground surface", "regular thread pitch", "uniform metallic sheen"]
ABNORMAL = ["small dark pits on the flank", "a rust spot", "a scratch across the thread"]
MODEL = "test-model"
KEY = "sk-loopback-test"
CONTEXT = 77  # CLIP's text context, start and end tokens included


def make_client(server: ChatServer, retries: int = 2, timeout_s: float = 5.0) -> ChatClient:
    # Tiny backoff: retry behaviour is under test, not the waiting.
    return ChatClient(server.url, MODEL, api_key=KEY, timeout_s=timeout_s, retries=retries, backoff_s=0.01)


def llm_settings(server: ChatServer, **kw: object) -> LLMSettings:
    base: dict[str, object] = {"url": server.url, "model": MODEL, "api_key": KEY, "timeout_s": 5.0, "retries": 0}
    return LLMSettings(**{**base, **kw})


# -- offline vocabulary ------------------------------------------------------------------------

def test_material_family_picks_the_longest_keyword() -> None:
    assert material_family("ball screw") == "metal"
    # "nut" is also a food keyword; the longer "metal" must win.
    assert material_family("metal nut") == "metal"
    assert material_family("Metal Nut") == "metal"
    assert material_family("hazelnut") == "food"
    assert material_family("zorblax") == "generic"


def test_offline_descriptions_merge_family_and_generic_without_duplicates() -> None:
    normal, abnormal = offline_descriptions("ball screw")
    assert "regular thread pitch" in normal and "rust or corrosion spots" in abnormal
    assert "a clean intact surface" in normal and "a stain" in abnormal  # from "generic"
    assert len(set(normal)) == len(normal) and len(set(abnormal)) == len(abnormal)


def test_prompt_set_is_deterministic_and_versioned_by_content() -> None:
    a, b = build_prompt_set("ball screw", LLMSettings()), build_prompt_set("ball screw", LLMSettings())
    assert a == b and a.version == b.version
    assert a.source == "offline:metal"
    assert len(a.version) == 16 and int(a.version, 16) >= 0
    # Any change of content must change the version: it keys the text-embedding cache.
    assert PromptSet(a.normal[:-1], a.abnormal, a.source).version != a.version
    assert PromptSet(a.normal, (*a.abnormal[:-1], a.abnormal[-1] + " "), a.source).version != a.version
    assert PromptSet(a.normal, a.abnormal, "llm:x").version != a.version
    assert PromptSet(a.abnormal, a.normal, a.source).version != a.version  # swapped pools
    assert build_prompt_set("carpet", LLMSettings()).version != a.version


def family_examples() -> list[str]:
    """One object name per vocabulary family (its first keyword; "generic" has none)."""
    vocab = json.loads(resources.files("pipeline.engine").joinpath("vocab/defects.json").read_text())
    return [entry["keywords"][0] if entry["keywords"] else "widget"
            for family, entry in vocab.items() if not family.startswith("_")]


def test_every_prompt_fits_the_clip_context() -> None:
    tokenizer = open_clip.get_tokenizer("ViT-B-16-plus-240")
    names = [*family_examples(), "printed circuit board"]
    assert len(names) >= 8
    # The longest description the LLM path accepts: MAX_WORDS long, multi-token words.
    longest = ("polycrystalline electroluminescent heterojunctions misaligned perpendicularly counterclockwise "
               "underneath semitransparent photoresist overlayers incompletely electrodeposited")
    assert len(longest.split()) == MAX_WORDS
    sets = [build_prompt_set(name, LLMSettings()) for name in names]
    sets.append(compose("printed circuit board", [longest], [longest], "llm:test"))
    for ps in sets:
        for prompt in ps.normal + ps.abnormal:
            assert len(tokenizer.encode(prompt)) + 2 <= CONTEXT, prompt


def test_include_cpe_adds_the_winclip_prompts() -> None:
    with_cpe = build_prompt_set("ball screw", LLMSettings())
    without = build_prompt_set("ball screw", LLMSettings(), include_cpe=False)
    cpe_n, cpe_a = compositional_prompts("ball screw")
    assert not set(cpe_n) & set(without.normal) and not set(cpe_a) & set(without.abnormal)
    assert set(cpe_n) <= set(with_cpe.normal) and set(cpe_a) <= set(with_cpe.abnormal)
    assert with_cpe.normal[: len(without.normal)] == without.normal
    assert len(with_cpe.normal) == len(without.normal) + len(set(cpe_n))
    assert with_cpe.version != without.version


# -- LLM path through a real HTTP server -----------------------------------------------------------

def test_llm_answer_becomes_the_prompt_set() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        prompts = build_prompt_set("ball screw", llm_settings(server, n_prompts=3))
    assert prompts.source == f"llm:{MODEL}"
    for d in NORMAL:
        assert any(d in p for p in prompts.normal), d
    for d in ABNORMAL:
        assert any(d in p for p in prompts.abnormal), d
    assert not any("rust or corrosion spots" in p for p in prompts.abnormal)  # not the offline vocabulary
    [req] = server.requests
    assert req.method == "POST" and req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.body["model"] == MODEL and req.body["temperature"] == 0
    system, user = req.body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert "ball screw" in user["content"] and "Give 3 short" in user["content"]


def test_full_endpoint_url_is_not_extended_and_no_key_sends_no_auth() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        client = ChatClient(f"{server.url}/chat/completions/", MODEL, api_key=None, retries=0)
        assert client.complete_json("s", "u") == {"normal": NORMAL, "abnormal": ABNORMAL}
    [req] = server.requests
    assert req.path == "/v1/chat/completions"
    assert "authorization" not in req.headers


def test_fenced_answer_is_parsed() -> None:
    with ChatServer(default=fenced(NORMAL, ABNORMAL)) as server:
        assert llm_descriptions(make_client(server, retries=0), "ball screw", 20) == (NORMAL, ABNORMAL)
    assert len(server.requests) == 1


def test_malformed_answer_is_retried() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(malformed())
        assert llm_descriptions(make_client(server, retries=1), "ball screw", 20) == (NORMAL, ABNORMAL)
    assert len(server.requests) == 2


@pytest.mark.parametrize("code", [500, 503, 429])
def test_server_errors_and_rate_limits_are_retried(code: int) -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(status(code), status(code))
        assert llm_descriptions(make_client(server, retries=2), "ball screw", 20) == (NORMAL, ABNORMAL)
    assert len(server.requests) == 3


def test_retries_are_bounded() -> None:
    with ChatServer(default=status(500)) as server, pytest.raises(LLMError, match=r"3 attempts.*HTTP 500"):
        make_client(server, retries=2).complete_json("s", "u")
    assert len(server.requests) == 3


def test_client_error_is_not_retried() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(status(401, "invalid api key"))
        with pytest.raises(LLMError, match=r"401.*invalid api key"):
            make_client(server, retries=3).complete_json("s", "u")
    assert len(server.requests) == 1


def test_slow_server_hits_the_timeout_in_bounded_time() -> None:
    with ChatServer(default=slow(5.0)) as server:
        started = time.monotonic()
        with pytest.raises(LLMError, match=r"2 attempts.*Timeout"):
            make_client(server, retries=1, timeout_s=0.5).complete_json("s", "u")
        elapsed = time.monotonic() - started
        assert len(server.requests) == 2
    assert 0.9 <= elapsed < 4.0  # two 0.5 s timeouts, never the server's 5 s


def test_disconnect_is_a_retryable_transport_error() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(disconnect())
        assert llm_descriptions(make_client(server, retries=1), "ball screw", 20) == (NORMAL, ABNORMAL)
    assert len(server.requests) == 2


def test_failing_llm_falls_back_to_offline_without_raising() -> None:
    offline = build_prompt_set("ball screw", LLMSettings())
    with ChatServer(default=status(500)) as server:
        prompts = build_prompt_set("ball screw", llm_settings(server, retries=1))
    assert len(server.requests) == 2  # the LLM was really tried, with its retry
    assert prompts.source.startswith("offline:") and prompts == offline


def test_unusable_answer_falls_back_to_offline() -> None:
    with ChatServer(default=wrong_shape()) as server:
        prompts = build_prompt_set("metal nut", llm_settings(server))
    assert prompts.source == "offline:metal"


def test_long_and_non_string_descriptions_are_dropped() -> None:
    thirteen = "one two three four five six seven eight nine ten eleven twelve thirteen"
    twelve = "one two three four five six seven eight nine ten eleven twelve"
    normal = [thirteen, 42, None, {"d": "x"}, "  a smooth   ground surface. ", twelve, "regular thread pitch"]
    with ChatServer(default=ok(normal, ABNORMAL)) as server:
        got_n, got_a = llm_descriptions(make_client(server, retries=0), "ball screw", 20)
    assert got_n == ["a smooth ground surface", twelve, "regular thread pitch"]
    assert got_a == ABNORMAL


def test_answer_is_truncated_to_n_prompts() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        assert llm_descriptions(make_client(server, retries=0), "ball screw", 2) == (NORMAL[:2], ABNORMAL[:2])


@pytest.mark.parametrize(
    ("normal", "abnormal"),
    [(["only one"], ABNORMAL), (NORMAL, ["a scratch", 7, "one two three four five six seven eight nine ten eleven "
                                         "twelve thirteen"]), ([], [])],
)
def test_too_few_usable_descriptions_is_an_error(normal: list[object], abnormal: list[object]) -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(ok(normal, abnormal))
        with pytest.raises(LLMError, match="too small"):
            llm_descriptions(make_client(server, retries=2), "ball screw", 20)
    assert len(server.requests) == 1  # a valid-but-small answer is not retried


@pytest.mark.parametrize("payload", [None, {"normal": "a scratch", "abnormal": ["a", "b"]}, {"normal": NORMAL}])
def test_wrong_shape_is_an_error(payload: object) -> None:
    with ChatServer(default=wrong_shape(payload)) as server, pytest.raises(LLMError, match="wrong shape"):
        llm_descriptions(make_client(server, retries=0), "ball screw", 20)


def test_null_content_is_a_retryable_malformed_answer() -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        server.script(answer(None))
        assert make_client(server, retries=1).complete_json("s", "u") == {"normal": NORMAL, "abnormal": ABNORMAL}


def test_llm_answer_is_cached_on_disk(tmp_path: Path) -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        settings = llm_settings(server)
        first = build_prompt_set("ball screw", settings, cache_dir=tmp_path)
    assert first.source == f"llm:{MODEL}" and len(server.requests) == 1
    assert len(list(tmp_path.glob("*.json"))) == 1
    # The server is gone (connections refused): only the disk cache can reproduce the LLM prompts.
    again = build_prompt_set("ball screw", settings, cache_dir=tmp_path)
    assert again == first and again.version == first.version
    assert len(server.requests) == 1
    # The cache is per model: another model's descriptions are not reused (offline fallback here).
    other = build_prompt_set("ball screw", settings.model_copy(update={"model": "other-model"}), cache_dir=tmp_path)
    assert other.source == "offline:metal"


def test_corrupt_cache_file_is_ignored(tmp_path: Path) -> None:
    with ChatServer(default=ok(NORMAL, ABNORMAL)) as server:
        settings = llm_settings(server)
        first = build_prompt_set("ball screw", settings, cache_dir=tmp_path)
        [cached] = tmp_path.glob("*.json")
        cached.write_text(cached.read_text()[:20])  # what a crash mid-write leaves behind
        assert build_prompt_set("ball screw", settings, cache_dir=tmp_path) == first


@pytest.mark.parametrize("name", ["walnut", "peanut butter jar", "scanner", "canvas"])
def test_families_match_whole_words(name: str) -> None:
    assert material_family(name) != "metal"
