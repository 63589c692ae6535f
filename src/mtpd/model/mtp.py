"""Cascaded multi-token prediction heads in the DeepSeek-V3 style (docs/design.md §1).

Head k at position i combines the previous level's hidden state h{k-1}_i with the embedding of token
t_{i+k}, runs one transformer block, and predicts t_{i+k+1} through the main model's shared output
projection after its own final norm:

    u_i  = M_k · concat(RMSNorm_h(h{k-1}_i), RMSNorm_e(Emb(t_{i+k})))
    hk   = Block_k(u)
    zk_i = W_out · norm_k(hk_i)

With a draft vocabulary (model/draft_vocab.py) the heads score only its N tokens, zk_i = W_out[ids] ·
norm_k(hk_i): head logits are indexed by draft index everywhere (training, evaluation, drafting), and
`to_token_ids` / `to_full_probs` / `to_draft_indices` translate between draft indices and token ids.

Independent heads (`ModelConfig.independent_heads`, the baseline: Meta's parallel heads) read only h0 and
no token: u_i = M_k · RMSNorm_h(h0_i), M_k: d -> d, the same block and output; head k still predicts
t_{i+k+1}, so losses, evaluation and the decode loop are shared, and the heads draft in parallel (none
reads another's output or draft).
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from mtpd.config import ModelConfig
from mtpd.errors import MtpdError
from mtpd.model.backbone import Backbone
from mtpd.model.decoder import (Block, BlockRunner, Decoder, KVCache, Rotary, Span, TreeAttention, init_weights,
                                run_block)
from mtpd.model.draft_vocab import DraftVocab


class MTPHead(nn.Module):
    """One MTP module: a cascaded head reads a hidden state and a token's embedding, an independent head
    (no `embed_norm`, a d -> d `proj`) the hidden state alone."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.embed_norm = None if cfg.independent_heads else nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        inputs = 1 if cfg.independent_heads else 2
        self.proj = nn.Linear(inputs * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg)
        self.norm = nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)

    def forward(self, prev_hidden: torch.Tensor, next_embeddings: torch.Tensor | None, span: Span,
                cache: KVCache | None = None, runner: BlockRunner = run_block) -> torch.Tensor:
        """next_embeddings: Emb(t_{i+k}) for a cascaded head; None for an independent one. `runner` runs the
        block (decoder.run_block: eagerly)."""
        u = self.hidden_norm(prev_hidden)
        if self.embed_norm is not None:
            u = torch.cat((u, self.embed_norm(next_embeddings)), dim=-1)
        # In the input's dtype, as the main model's residual stream: under autocast `proj` returns bf16, which
        # would carry the head's residual stream and its fp32 norms in bf16.
        return runner(self.block, self.proj(u).to(prev_hidden.dtype), span, cache, 0)


def _trainable(module: nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


# What the main head scores in a teacher-forced pass (MTPModel.forward): the whole vocabulary (it trains, or
# is evaluated), the draft vocabulary only (a frozen main model is only the heads' teacher, and the KL is over
# V': 8,192 of SmolLM2's 49,152 rows of W_out), or nothing (no KL, beta 0).
MAIN_SCORES = ("full", "draft", "none")


class MTPModel(nn.Module):
    """A main model (`Backbone`, the built-in decoder by default) plus K MTP heads (cascaded unless
    cfg.independent_heads) that share its embedding and output projection. The heads have the main model's
    width, so every head has the same shape and a trained head can initialise another (looped extension)."""

    def __init__(self, cfg: ModelConfig, backbone: Backbone | None = None):
        super().__init__()
        self.cfg = cfg.validate()
        self.main = Decoder(cfg) if backbone is None else backbone
        self.heads = nn.ModuleList(MTPHead(cfg) for _ in range(cfg.mtp_heads))
        self.rotary = Rotary(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # the heads' own positions
        self.draft_vocab = DraftVocab(cfg.vocab_size, cfg.draft_vocab)
        if backbone is None:
            init_weights(self.main, cfg.n_layers)
        for head in self.heads:
            init_weights(head, cfg.n_layers)

    @property
    def num_heads(self) -> int:
        return len(self.heads)

    def forward(self, tokens: torch.Tensor, main_scores: str = "full", h0: torch.Tensor | None = None
                ) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Teacher-forced pass over tokens [B, T]: main logits and, for k = 1..K, head k's logits over the
        draft vocabulary [B, T-k, N], whose position i predicts t_{i+k+1}.

        `main_scores` (MAIN_SCORES): main logits over the whole vocabulary [B, T, V], over the draft
        vocabulary [B, T, N] (the heads' teacher, equal to the full logits' draft columns), or None. `h0`:
        the main model's hidden states for `tokens` if already known (a frozen main model's, from
        teacher_cache.TeacherCache), so the main model does not run.

        Frozen parts (no parameter requires grad) run without autograd as long as nothing before them
        trains: head-only training and looped extension then cost no activation memory for them.
        """
        if main_scores not in MAIN_SCORES:
            raise ValueError(f"main_scores must be one of {MAIN_SCORES}, got {main_scores!r}")
        T = tokens.shape[1]
        track = torch.is_grad_enabled() and _trainable(self.main)
        with torch.set_grad_enabled(track):
            if h0 is None:
                h0 = self.main(tokens)
            main_logits = (self.main.logits(h0) if main_scores == "full" else
                           self.draft_vocab.logits(self.main.final_norm(h0), self.main) if main_scores == "draft"
                           else None)
            embeddings = None if self.cfg.independent_heads else self.main.embed(tokens)
        # A main model held in another dtype than the heads (a bf16 teacher for fp32 heads, train.py) hands
        # them its states in theirs: their norms then run fused, in the heads' precision.
        dtype = self.heads[0].proj.weight.dtype if self.heads else h0.dtype
        h0, embeddings = h0.to(dtype), None if embeddings is None else embeddings.to(dtype)
        hidden, head_logits = h0, []
        for k, head in enumerate(self.heads[:T - 1], start=1):
            track = track or (torch.is_grad_enabled() and _trainable(head))
            prev = h0 if self.cfg.independent_heads else hidden
            with torch.set_grad_enabled(track):
                hidden = head(prev[:, :T - k], None if embeddings is None else embeddings[:, k:],
                              self.rotary.causal_span(T - k))
                head_logits.append(self.draft_logits(k, hidden))
        return main_logits, head_logits

    def extend_heads(self, num_heads: int) -> None:
        """Looped extension (docs/design.md §3.3): grow m heads to num_heads (a multiple of m); head m+j starts as an
        exact copy of head ((j-1) mod m) + 1, so m -> 2m copies heads 1..m into m+1..2m."""
        m = self.num_heads
        if m == 0 or num_heads <= m or num_heads % m:
            raise MtpdError(f"cannot extend {m} heads to {num_heads}: --to must be a multiple of {m} larger than "
                            f"{m} (looped extension copies heads 1..{m}), e.g. --to {2 * max(m, 1)}")
        self.heads.extend(copy.deepcopy(self.heads[j % m]) for j in range(num_heads - m))
        self.cfg = dataclasses.replace(self.cfg, mtp_heads=num_heads)

    def draft_logits(self, k: int, hk: torch.Tensor) -> torch.Tensor:
        """Logits of head k (1-based) over the draft vocabulary [..., N] from its hidden states."""
        return self.draft_vocab.logits(self.heads[k - 1].norm(hk), self.main)

    def to_token_ids(self, draft_indices: torch.Tensor) -> torch.Tensor:
        """Token ids of draft indices (positions in `draft_logits`)."""
        return self.draft_vocab.to_token_ids(draft_indices)

    def to_draft_indices(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Draft indices of token ids; -1 for tokens the heads cannot propose."""
        return self.draft_vocab.to_draft_indices(token_ids)

    def to_full_probs(self, probs: torch.Tensor) -> torch.Tensor:
        """A draft distribution [..., N] as a distribution over the whole vocabulary [..., V], zero outside
        the draft vocabulary."""
        return self.draft_vocab.to_full_probs(probs)

    @property
    def draft_ids(self) -> torch.Tensor | None:
        """The draft vocabulary's token ids [N], None when the heads score the whole vocabulary."""
        return self.draft_vocab.ids

    def head_step(self, k: int, prev_hidden: torch.Tensor, positions: torch.Tensor, next_tokens: torch.Tensor,
                  cache: KVCache, tree: TreeAttention | None = None, runner: BlockRunner = run_block) -> torch.Tensor:
        """Head k over per-row positions [B, T] of a cached pass, reading the hidden states of level
        `head_input(k)` there and (cascaded heads) the tokens at positions + k; returns hk [B, T, d]. With
        `tree`, the tokens are written at tree.slots and attend through tree.mask (tree drafting: several
        nodes share a position). `runner` runs the head's block (decoder.run_block: eagerly)."""
        span = (self.rotary.cached_span(positions, cache.attended_len) if tree is None
                else self.rotary.tree_span(positions, tree, check_bounds=cache.attended_len is None))
        embeddings = None if self.cfg.independent_heads else self.main.embed(next_tokens)
        return self.heads[k - 1](prev_hidden, embeddings, span, cache, runner)

    def head_input(self, k: int) -> int:
        """The level j of the hidden states h{j} head k reads: k - 1 in the cascade, 0 (h0) for independent
        heads."""
        return 0 if self.cfg.independent_heads else k - 1

    def init_heads_from_last_block(self) -> None:
        """Head initialisation on a pretrained main model (`--head-init last-block`, docs/design.md §3.2): each
        head's block starts as a copy of the main model's last block, and its output norm as the main model's
        final norm, so that a head starts from a transformation the output projection was trained to read
        (the input norms stay at one; `proj` stays random). Needs the main model in mtpd's decoder, whose
        blocks have the heads' shape."""
        if not isinstance(self.main, Decoder):
            raise MtpdError(f"--head-init last-block copies the main model's last block, which needs the model in "
                            f"mtpd's own decoder (Llama family); this one runs through the transformers adapter "
                            f"({type(self.main).__name__}): use --head-init random")
        for head in self.heads:  # load_state_dict copies into the heads' own tensors, in their dtype
            head.block.load_state_dict(self.main.blocks[-1].state_dict())
            head.norm.load_state_dict(self.main.norm.state_dict())

    def new_head_caches(self, batch_size: int, max_len: int | None = None,
                        static_shapes: bool = False) -> list[KVCache]:
        weight = self.heads[0].proj.weight if self.heads else self.rotary.cos
        return [KVCache(1, batch_size, max_len or self.cfg.max_seq_len, self.cfg.n_kv_heads, self.cfg.head_dim,
                        weight.device, weight.dtype, static_shapes) for _ in self.heads]
