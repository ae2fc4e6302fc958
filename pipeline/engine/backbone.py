"""The one module that touches open_clip's model internals.

Everything the anomaly methods need from a CLIP ViT goes through `ClipBackbone`: token
embedding, the transformer blocks, pooling and projection. open_clip has changed these
internals before (sequence-first vs batch-first transformers), silently breaking code that
reached into them from model code; here they are guarded by `self_check` (run at load) and by
tests that compare this adapter with open_clip's public `encode_image`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import open_clip
import torch
from torch import nn
from torch.nn import functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


class BackboneError(RuntimeError):
    """The CLIP model cannot be used by the anomaly methods (structure or numerical check)."""


@dataclass(frozen=True)
class ImageTokens:
    """One full forward.

    pooled: (B, D) projected image embedding; patches: (B, P, C) final patch tokens after
    ln_post, unprojected; embeds: (B, 1+P, C) tokens after class and positional embedding,
    before ln_pre (what windows are cut from); layers: {layer index (1-based): (B, P, C)
    patch tokens after that block, before ln_post}.
    """

    pooled: torch.Tensor
    patches: torch.Tensor
    embeds: torch.Tensor
    layers: dict[int, torch.Tensor]


class ClipBackbone:
    """Adapter over an open_clip CLIP model with a ViT image tower (class-token pooling)."""

    def __init__(self, model: nn.Module, tokenizer: object, name: str) -> None:
        visual = getattr(model, "visual", None)
        required = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer", "ln_post",
                    "proj", "patch_dropout")
        missing = [a for a in required if visual is None or not hasattr(visual, a)]
        if missing:
            raise BackboneError(f"{name}: image tower is not an open_clip VisionTransformer (missing {missing})")
        if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", "tok") != "tok":
            raise BackboneError(f"{name}: only class-token pooling is supported")
        if getattr(visual, "final_ln_after_pool", False):
            raise BackboneError(f"{name}: final_ln_after_pool models are not supported")
        self.model = model.eval()
        self.visual = visual
        self.tokenizer = tokenizer
        self.name = name
        self.blocks: nn.ModuleList = visual.transformer.resblocks
        # Older open_clip blocks were sequence-first; current ones are batch-first. Decided once here.
        self.batch_first: bool = bool(getattr(visual.transformer, "batch_first", True))
        # Blocks whose structure this adapter computes itself (checked by self_check against open_clip).
        self._standard = all(
            isinstance(getattr(b, "attn", None), nn.MultiheadAttention) and b.attn._qkv_same_embed_dim
            and all(hasattr(b, a) for a in ("ln_1", "ln_2", "mlp", "ls_1", "ls_2"))
            and not hasattr(b, "ln_1_kv") and getattr(b, "ln_attn", None) is None
            for b in visual.transformer.resblocks
        )
        size = visual.image_size
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        self.grid_size: tuple[int, int] = tuple(visual.grid_size)
        self.n_patches = self.grid_size[0] * self.grid_size[1]
        self.n_layers = len(self.blocks)
        self.embed_dim = int(visual.proj.shape[1])
        self.width = int(visual.proj.shape[0])
        pre = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(pre.get("mean", OPENAI_MEAN))
        self.std = tuple(pre.get("std", OPENAI_STD))

    # -- devices ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.visual.proj.device

    def to(self, device: torch.device | str) -> ClipBackbone:
        self.model.to(device)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.proj.dtype

    def image_tower_copy(self, dtype: torch.dtype) -> ClipBackbone:
        """An adapter over a copy of the image tower with its weights cast to ``dtype`` once.

        For low-precision image forwards: autocast would recast every weight on every call, which
        on CPU costs more than the lower precision saves. The copy has no text tower.
        """
        holder = nn.Module()
        holder.visual = copy.deepcopy(self.visual).to(dtype)
        return ClipBackbone(holder, self.tokenizer, self.name)

    # -- text ------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts)

    def token_count(self, prompt: str) -> int:
        """Tokens a prompt needs including start/end tokens (context is 77 for CLIP)."""
        encoder = getattr(self.tokenizer, "encode", None)
        if encoder is None:
            return 0
        return len(encoder(prompt)) + 2

    def _trimmable_text(self) -> bool:
        """Standard CLIP text tower with a causal mask and EOT (argmax) pooling."""
        m = self.model
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection",
                  "attn_mask")
        return (all(getattr(m, a, None) is not None for a in needed)
                and getattr(m, "text_pool_type", None) == "argmax")

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text transformer on tokens trimmed after the longest prompt's end token.

        Prompts are ~15 tokens of a 77-token context; with a causal mask and end-token pooling
        the padding never influences the result, so trimming it is exact and ~5x cheaper.
        """
        m = self.model
        length = int((tokens != 0).sum(dim=1).max())
        tokens = tokens[:, :length]
        x = m.token_embedding(tokens) + m.positional_embedding[:length]
        x = m.transformer(x, attn_mask=m.attn_mask[:length, :length])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    @torch.inference_mode()
    def encode_text(self, prompts: list[str], batch_size: int = 256, trim: bool = True) -> torch.Tensor:
        """(N,) prompts -> (N, D) unnormalised text embeddings, fp32; duplicates encoded once."""
        unique = list(dict.fromkeys(prompts))
        fast = trim and self._trimmable_text()
        out = []
        for i in range(0, len(unique), batch_size):
            tokens = self.tokenize(unique[i : i + batch_size]).to(self.device)
            emb = self._encode_tokens(tokens) if fast else self.model.encode_text(tokens)
            out.append(emb.float())
        table = torch.cat(out)
        index = {p: i for i, p in enumerate(unique)}
        return table[torch.tensor([index[p] for p in prompts], device=table.device)]

    # -- image -----------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1+P, C) class + patch tokens with positions."""
        v = self.visual
        x = v.conv1(images)
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        return x + v.positional_embedding.to(x.dtype)

    def run_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None,
                   collect: tuple[int, ...] = ()) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks [start, stop) on batch-first tokens (B, L, C).

        Returns the output and {1-based layer: (B, L, C)} for layers in ``collect``.
        """
        stop = self.n_layers if stop is None else stop
        taken: dict[int, torch.Tensor] = {}
        for i in range(start, stop):
            x = self._block(self.blocks[i], x)
            if i + 1 in collect:
                taken[i + 1] = x
        return x, taken

    def _block(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """One residual attention block on batch-first tokens (B, L, C).

        Standard blocks are computed here with fused scaled-dot-product attention (~10% faster on
        the many short window sequences than nn.MultiheadAttention's path, same result); anything
        else goes through the block's own forward in the layout its transformer expects.
        """
        attn = getattr(blk, "attn", None)
        if self._standard and isinstance(attn, nn.MultiheadAttention):
            qkv = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias)  # one packed matmul
            b, length, _ = qkv.shape
            q, k, v = qkv.view(b, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            return _residual_tail(blk, attn, x, F.scaled_dot_product_attention(q, k, v))
        if self.batch_first:
            return blk(x)
        return blk(x.transpose(0, 1)).transpose(0, 1)

    def pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Final tokens (B, L, C) -> (projected class embedding (B, D), normed patch tokens (B, L-1, C))."""
        x = self.visual.ln_post(x)
        return x[:, 0] @ self.visual.proj, x[:, 1:]

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Intermediate patch tokens (B, P, C) -> joint space (B, P, D) along the class token's path."""
        return self.visual.ln_post(tokens) @ self.visual.proj

    def encode(self, images: torch.Tensor, collect: tuple[int, ...] = ()) -> ImageTokens:
        """One full forward of the image tower, keeping what the methods reuse."""
        embeds = self.embed(images)
        x = self.visual.ln_pre(self.visual.patch_dropout(embeds))
        x, layers = self.run_blocks(x, collect=collect)
        pooled, patches = self.pool(x)
        return ImageTokens(pooled=pooled, patches=patches, embeds=embeds,
                           layers={k: v[:, 1:] for k, v in layers.items()})

    def stage_tokens(self, images: torch.Tensor, layers: tuple[int, ...]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One full forward: the pooled embedding and raw intermediate patch tokens (AprilGAN's stages).

        images: (B, 3, H, W) -> pooled (B, D) (class token, ln_post, proj; unnormalised) and, per
        1-based layer in ``layers``, the residual stream after that block without the class token,
        (B, P, C), row-major over the grid: no ln_post, no proj. Equals open_clip's
        ``visual.forward_intermediates(indices=[l - 1 ...], normalize_intermediates=False,
        output_fmt="NLC")`` (guarded by tests/test_backbone_adapter.py).
        """
        bad = [layer for layer in layers if not 1 <= layer <= self.n_layers]
        if bad:
            raise ValueError(f"{self.name}: stage layers {bad} outside 1..{self.n_layers}")
        x = self.visual.ln_pre(self.visual.patch_dropout(self.embed(images)))
        x, taken = self.run_blocks(x, collect=tuple(layers))
        # ln_post is per token, so normalising the class token alone equals open_clip's pooling.
        pooled = self.visual.ln_post(x[:, 0]) @ self.visual.proj
        return pooled, [taken[layer][:, 1:] for layer in layers]

    def encode_windows(self, embeds: torch.Tensor, masks: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Window embeddings by token masking.

        embeds: (B, 1+P, C) from `embed`; masks: (k*k, W) patch indices. Each window is the class
        token plus its patch tokens (positions kept), run through every block. Returns (B, W, D).
        """
        batch = embeds.shape[0]
        n_windows = masks.shape[1]
        index = torch.cat([torch.zeros(1, n_windows, dtype=torch.long, device=masks.device), masks + 1]).T
        seqs = embeds[:, index.to(embeds.device)]  # (B, W, 1+k*k, C)
        seqs = seqs.reshape(batch * n_windows, index.shape[1], -1)
        out = []
        for i in range(0, seqs.shape[0], chunk):
            x = self.visual.ln_pre(self.visual.patch_dropout(seqs[i : i + chunk]))
            x, _ = self.run_blocks(x, stop=self.n_layers - 1)
            cls = self.last_block_class_token(x)
            out.append(self.visual.ln_post(cls) @ self.visual.proj)
        return torch.cat(out).reshape(batch, n_windows, -1)

    def _attention_weights(self) -> nn.MultiheadAttention:
        attn = getattr(self.blocks[-1], "attn", None)
        if not isinstance(attn, nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise BackboneError(f"{self.name}: the last block is not a standard attention block")
        return attn

    def last_block_class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Output of the last block for the class token only: (B, L, C) -> (B, C).

        Pooling reads nothing else, so queries, attention output and MLP are computed for one
        token instead of L: exact, and ~6% less work for the short window sequences.
        """
        blk = self.blocks[-1]
        attn = self._attention_weights()
        y = blk.ln_1(x)
        q = _heads(_project(attn, y[:, :1], 0), attn.num_heads)
        k, v = (_heads(_project(attn, y, part), attn.num_heads) for part in (1, 2))
        return _residual_tail(blk, attn, x[:, :1], F.scaled_dot_product_attention(q, k, v))[:, 0]

    def last_block_value_attention(self, x: torch.Tensor) -> torch.Tensor:
        """The last block with value-value self-attention (training-free locality fix).

        x: (B, L, C) tokens entering the last block -> (B, L, C). Residuals and MLP are kept;
        softmax(QK^T) is replaced by softmax(VV^T * scale) so each patch attends to patches that
        look like it rather than to a few global sink tokens.
        """
        blk = self.blocks[-1]
        attn = self._attention_weights()
        v = _heads(_project(attn, blk.ln_1(x), 2), attn.num_heads)
        return _residual_tail(blk, attn, x, F.scaled_dot_product_attention(v, v, v))

    # -- guard -----------------------------------------------------------------------------
    @torch.inference_mode()
    def self_check(self, tolerance: float = 1e-4) -> float:
        """Windows over the full grid must reproduce the image embedding; raises BackboneError.

        Catches sequence-/batch-first mistakes and index offsets, which otherwise fail silently.
        Returns the max abs difference.
        """
        gen = torch.Generator().manual_seed(0)
        image = torch.randn(1, 3, *self.image_size, generator=gen).to(self.device, self.visual.proj.dtype)
        public = self.model.encode_image(image)
        public = public[0] if isinstance(public, tuple) else public
        tokens = self.encode(image)
        full = torch.arange(self.n_patches, device=self.device).unsqueeze(1)
        windowed = self.encode_windows(tokens.embeds, full)[:, 0]
        diff = max(float((public - tokens.pooled).abs().max()), float((windowed - public).abs().max()))
        prompts = ["a photo of a flawless part.", "a close-up photo of the part with a scratch and a dent."]
        text_diff = float((self.encode_text(prompts) - self.encode_text(prompts, trim=False)).abs().max())
        diff = max(diff, text_diff)
        if diff > tolerance:
            raise BackboneError(
                f"{self.name}: adapter disagrees with open_clip {open_clip.__version__} encode_image "
                f"(max abs diff {diff:.3g} > {tolerance}); the backbone internals changed"
            )
        return diff


def _project(attn: nn.MultiheadAttention, y: torch.Tensor, part: int) -> torch.Tensor:
    """Query (0), key (1) or value (2) projection of (B, L, C) tokens with the block's packed weights."""
    width = y.shape[-1]
    rows = slice(part * width, (part + 1) * width)
    bias = attn.in_proj_bias
    return F.linear(y, attn.in_proj_weight[rows], None if bias is None else bias[rows])


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, C) -> (B, heads, L, C / heads)."""
    b, length, _ = t.shape
    return t.view(b, length, heads, -1).transpose(1, 2)


def _residual_tail(blk: nn.Module, attn: nn.MultiheadAttention, x: torch.Tensor, heads_out: torch.Tensor,
                   ) -> torch.Tensor:
    """Merge attention heads (B, H, L, d), project, add to the residual x (B, L, C), then the MLP half."""
    b, _, length, _ = heads_out.shape
    x = x + blk.ls_1(attn.out_proj(heads_out.transpose(1, 2).reshape(b, length, -1)))
    return x + blk.ls_2(blk.mlp(blk.ln_2(x)))
