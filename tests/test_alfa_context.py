"""ALFA's prompt pools, contextual prototypes and one-forward model on synthetic vectors and a tiny backbone."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from pipeline.config import EngineSettings, LLMSettings
from pipeline.engine.alfa import Alfa, AlfaParams, PromptPools, build_pools, contextual_prototypes
from pipeline.engine.alfa_prompts import build_prompt_set
from pipeline.engine.backbone import ClipBackbone
from pipeline.engine.engine import AnomalyEngine
from tests.engine_helpers import SMALL, backbone

D = 16


def e(*dims: int, scale: float = 1.0) -> torch.Tensor:
    """Unit vector along the sum of the given basis directions, times `scale`."""
    v = torch.zeros(D)
    v[list(dims)] = 1.0
    return F.normalize(v, dim=0) * scale


def rows(*vectors: torch.Tensor) -> torch.Tensor:
    return torch.stack(vectors)


def assert_unit_rows(t: torch.Tensor) -> None:
    assert torch.allclose(t.norm(dim=-1), torch.ones(t.shape[0]), atol=1e-5)


# -- build_pools ---------------------------------------------------------------------------------

def test_near_duplicate_prompt_is_dropped() -> None:
    near_e0 = F.normalize(e(0) + 0.01 * e(5), dim=0)  # cosine 0.99995 with e0
    normal = rows(e(0), near_e0, e(1), e(2))
    abnormal = rows(e(8), e(9), e(10))
    pools = build_pools(normal, abnormal)
    assert torch.allclose(pools.normal, rows(e(0), e(1), e(2)))
    assert torch.allclose(pools.abnormal, abnormal)
    # With a dedupe threshold above their cosine both are kept (then the pools are balanced to 3).
    assert build_pools(normal, rows(e(8), e(9), e(10), e(11)), dedupe=0.99999).normal.shape[0] == 4


def test_cross_ambiguous_prompt_is_dropped() -> None:
    # The fourth "normal" prompt describes what the abnormal pool describes.
    like_abnormal = e(8, 9, 10)
    normal = rows(e(0), e(1), e(2), like_abnormal)
    abnormal = rows(e(8), e(9), e(10))
    pools = build_pools(normal, abnormal)
    assert torch.allclose(pools.normal, rows(e(0), e(1), e(2)))
    assert torch.allclose(pools.abnormal, abnormal)
    # Same on the other side.
    pools = build_pools(rows(e(0), e(1), e(2)), rows(e(0, 1, 2), e(8), e(9), e(10)))
    assert torch.allclose(pools.abnormal, rows(e(8), e(9), e(10)))


def test_pools_are_balanced_and_normalised() -> None:
    gen = torch.Generator().manual_seed(0)
    scales = torch.rand(7, 1, generator=gen) * 5 + 0.1
    normal = rows(*(e(i) for i in range(5))) * scales[:5]
    abnormal = rows(e(8), e(9)) * scales[5:]
    pools = build_pools(normal, abnormal)
    assert pools.normal.shape == pools.abnormal.shape == (2, D)
    assert pools.amb_normal.shape == pools.amb_abnormal.shape == (2,)
    assert_unit_rows(pools.normal)
    assert_unit_rows(pools.abnormal)
    assert torch.allclose(pools.normal, rows(e(0), e(1)))  # the first ones are kept


def test_ambiguity_penalty_is_max_cosine_to_the_opposite_pool() -> None:
    mixed = F.normalize(e(1) + 0.5 * e(8), dim=0)  # cosine 0.5 / sqrt(1.25) with e8
    cos = 0.5 / 1.25**0.5
    pools = build_pools(rows(e(0), mixed, e(2)), rows(e(8), e(9), e(10)))
    assert torch.allclose(pools.amb_normal, torch.tensor([0.0, cos, 0.0]), atol=1e-6)
    assert torch.allclose(pools.amb_abnormal, torch.tensor([cos, 0.0, 0.0]), atol=1e-6)


# -- contextual_prototypes ----------------------------------------------------------------------

def random_pools(m: int = 6, seed: int = 0) -> PromptPools:
    gen = torch.Generator().manual_seed(seed)
    return build_pools(torch.randn(m, 64, generator=gen), torch.randn(m, 64, generator=gen), dedupe=0.99)


def test_adapted_prototype_moves_towards_the_matching_prompt() -> None:
    pools = random_pools()
    plain = F.normalize(pools.normal.mean(0), dim=0)
    for j in range(pools.normal.shape[0]):
        t_j = pools.normal[j]
        t_n, _ = contextual_prototypes(t_j[None], pools)
        assert float(t_n[0] @ t_j) > float(plain @ t_j) + 0.1, j


def test_top_k_one_returns_exactly_the_best_prompt() -> None:
    def direction(x: float, y: float) -> torch.Tensor:
        v = torch.zeros(D)
        v[0], v[1] = x, y
        return F.normalize(v, dim=0)

    # Cosines with the image: 0.9986, 0.9487, 0: close enough that softmax weighting would mix them.
    normal = rows(direction(1, 0.5), direction(1, 0.9), e(5))
    pools = PromptPools(normal, rows(e(8), e(9), e(10)), torch.zeros(3), torch.zeros(3))
    image = e(0, 1)[None]
    t_n, t_a = contextual_prototypes(image, pools, top_k=1)
    assert torch.equal(t_n[0], F.normalize(normal[1], dim=0))
    mixed, _ = contextual_prototypes(image, pools, top_k=2)
    assert not torch.allclose(mixed[0], normal[1], atol=1e-4)
    # Random pools: the image next to normal prompt 2 and abnormal prompt 4 picks those.
    pools = random_pools()
    image = F.normalize(pools.normal[2] + pools.abnormal[4], dim=0)[None]
    t_n, t_a = contextual_prototypes(image, pools, top_k=1, lam=0.0)
    assert torch.allclose(t_n[0], pools.normal[2], atol=1e-6)
    assert torch.allclose(t_a[0], pools.abnormal[4], atol=1e-6)


def test_ambiguous_prompt_gets_less_weight_than_an_equally_relevant_one() -> None:
    pool = rows(e(0), e(1))
    image = e(0, 1)[None]  # equally similar to both prompts
    other = rows(e(8), e(9))

    def prototype(lam: float) -> torch.Tensor:
        pools = PromptPools(pool, other, amb_normal=torch.tensor([0.8, 0.0]), amb_abnormal=torch.zeros(2))
        return contextual_prototypes(image, pools, top_k=2, lam=lam, tau_c=0.1)[0][0]

    neutral = prototype(0.0)
    assert torch.allclose(neutral @ pool[0], neutral @ pool[1], atol=1e-6)
    penalised = prototype(0.5)
    assert float(penalised @ pool[1]) > float(penalised @ pool[0]) + 0.1


def test_prototype_shapes_and_norms() -> None:
    pools = random_pools(m=8)
    images = torch.randn(5, 64, generator=torch.Generator().manual_seed(1)) * 7
    t_n, t_a = contextual_prototypes(images, pools, top_k=3)
    assert t_n.shape == t_a.shape == (5, 64)
    assert_unit_rows(t_n)
    assert_unit_rows(t_a)
    # top_k larger than the pool is clamped, not an error.
    assert contextual_prototypes(images, pools, top_k=100)[0].shape == (5, 64)


# -- Alfa on a tiny random backbone ----------------------------------------------------------------

@pytest.fixture(scope="module")
def bb() -> ClipBackbone:
    return backbone(SMALL)[0]


@pytest.fixture(scope="module")
def pools(bb: ClipBackbone) -> PromptPools:
    return Alfa(bb).text_pools(build_prompt_set("ball screw", LLMSettings(), include_cpe=False))


@pytest.fixture
def images(bb: ClipBackbone) -> torch.Tensor:
    return torch.randn(3, 3, *bb.image_size, generator=torch.Generator().manual_seed(0)).to(bb.device)


@pytest.fixture
def block0_calls(bb: ClipBackbone) -> Iterator[list[tuple[int, ...]]]:
    """Input shapes of every call of the first visual block."""
    calls: list[tuple[int, ...]] = []
    handle = bb.blocks[0].ln_1.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    yield calls
    handle.remove()


def test_one_backbone_forward_per_batch(bb: ClipBackbone, pools: PromptPools, images: torch.Tensor,
                                        block0_calls: list[tuple[int, ...]]) -> None:
    scores, maps = Alfa(bb)(images, pools)
    assert len(block0_calls) == 1
    seq = 1 + bb.n_patches
    assert block0_calls[0][:2] == ((3, seq) if bb.batch_first else (seq, 3))
    assert scores.shape == (3,)
    assert maps.shape == (3, *bb.grid_size)
    assert bool(((scores >= 0) & (scores <= 1)).all()) and bool(((maps >= 0) & (maps <= 1)).all())
    assert torch.isfinite(scores).all() and torch.isfinite(maps).all()


def test_reference_memory_is_also_one_forward(bb: ClipBackbone, pools: PromptPools, images: torch.Tensor,
                                              block0_calls: list[tuple[int, ...]]) -> None:
    memory = Alfa(bb).reference_memory(images[:2])
    assert memory.shape == (2 * bb.n_patches, bb.width) and len(block0_calls) == 1
    scores, maps = Alfa(bb)(images, pools, memory=memory)
    assert len(block0_calls) == 2
    assert maps.shape == (3, *bb.grid_size) and bool(((scores >= 0) & (scores <= 1)).all())


def test_value_attention_changes_the_maps(bb: ClipBackbone, pools: PromptPools, images: torch.Tensor) -> None:
    _, m_va = Alfa(bb, AlfaParams(value_attention=True))(images, pools)
    _, m_plain = Alfa(bb, AlfaParams(value_attention=False))(images, pools)
    assert not torch.allclose(m_va, m_plain, atol=1e-6)
    # Deterministic per setting.
    assert torch.equal(Alfa(bb, AlfaParams(value_attention=True))(images, pools)[1], m_va)


def test_invalid_layers_are_rejected(bb: ClipBackbone) -> None:
    n = bb.n_layers
    for layers in [(0, n), (n + 1,), (-1, n // 2)]:
        with pytest.raises(ValueError, match="outside"):
            Alfa(bb, AlfaParams(layers=layers))
    assert Alfa(bb, AlfaParams(layers=(1, n))).layers == (1, n)
    assert Alfa(bb).layers == (n // 2, 3 * n // 4, n)


# -- engine ----------------------------------------------------------------------------------

def test_engine_alfa_maps_for_each_frame_size_and_deterministic() -> None:
    bb, fp = backbone(SMALL)
    # The session's shared backbone (same random weights, loaded once), left on whatever device it is on.
    settings = EngineSettings(method="alfa", backbone=SMALL, pretrained="random", precision="fp32",
                              device=str(bb.device))
    engine = AnomalyEngine(settings, backbone=bb, fingerprint=fp)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (180, 260, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (97, 143), dtype=np.uint8)
    rgba = np.dstack([rng.integers(0, 256, (64, 300, 3), dtype=np.uint8), np.full((64, 300), 255, np.uint8)])
    frames = [rgb, gray, rgba]
    first = engine.score(frames, "ball_screw")
    second = engine.score(frames, "ball_screw")
    assert [r.frame_size for r in first] == [(180, 260), (97, 143), (64, 300)]
    assert {r.anomaly_map.shape for r in first} == {engine.input_size}  # maps at model resolution
    for a, b in zip(first, second, strict=True):
        assert a.anomaly_map.dtype == np.float32 and np.isfinite(a.anomaly_map).all()
        assert 0.0 <= a.image_score <= 1.0
        assert a.image_score == b.image_score and np.array_equal(a.anomaly_map, b.anomaly_map)
    # A gray frame is its 3-channel replica; RGBA ignores alpha.
    replica = engine.score([np.repeat(gray[:, :, None], 3, axis=2), rgba[:, :, :3]], "ball_screw")
    for got, want in zip(replica, first[1:], strict=True):
        assert got.image_score == pytest.approx(want.image_score, abs=1e-5)
        assert np.allclose(got.anomaly_map, want.anomaly_map, atol=1e-5)
