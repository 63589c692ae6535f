"""Configuration: frozen dataclasses and named presets.

`ModelConfig` describes the main decoder and its MTP heads (the heads have the same width as the main
model, so every module has the same shape and a trained one can initialise another). `LossConfig` holds
the MTP-D objective's weights (docs/design.md §2). Presets were chosen from the CPU cost model in docs/design.md §9.
`DRAFT_THRESHOLD` is the measured default of dynamic draft length, shared by the CLI, bench and demo.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mtpd.errors import MtpdError, require


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 2048
    d_model: int = 160
    n_layers: int = 6
    n_heads: int = 5
    n_kv_heads: int = 5  # < n_heads: grouped-query attention
    ffn_dim: int = 448  # SwiGLU hidden size
    max_seq_len: int = 256  # context length (RoPE table and KV cache size limit)
    mtp_heads: int = 4  # K, number of cascaded MTP modules
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True  # output projection shares the embedding matrix
    draft_vocab: int = 0  # N: the heads score the N most frequent training tokens (model/draft_vocab.py); 0 = all
    # False: cascaded heads (DeepSeek-V3, MTP-D: head k reads h{k-1} and Emb(t_{i+k})); True: independent heads
    # (Meta's parallel heads: head k reads only h0 and predicts t_{i+k+1}), the baseline (docs/design.md §1.2)
    independent_heads: bool = False

    @property
    def draft_vocab_size(self) -> int:
        """How many tokens the heads score."""
        return self.draft_vocab or self.vocab_size

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> "ModelConfig":
        """Sizes first (so the divisibility checks below never divide by zero), then how they fit together."""
        require([
            (self.vocab_size >= 2, f"vocab_size (--vocab-size) must be >= 2 (got {self.vocab_size})"),
            (self.d_model >= 1, f"d_model (--d-model) must be >= 1 (got {self.d_model})"),
            (self.n_heads >= 1, f"n_heads (--attn-heads) must be >= 1 (got {self.n_heads})"),
            (self.n_kv_heads >= 1, f"n_kv_heads (--kv-heads) must be >= 1 (got {self.n_kv_heads})"),
            (self.n_layers >= 1, f"n_layers (--n-layers) must be >= 1 (got {self.n_layers})"),
            (self.ffn_dim >= 1, f"ffn_dim (--ffn-dim) must be >= 1 (got {self.ffn_dim})"),
            (self.max_seq_len >= 2, f"max_seq_len (--max-seq-len) must be >= 2 (got {self.max_seq_len})"),
            (self.mtp_heads >= 0, f"--heads must be >= 0 (got {self.mtp_heads})"),
        ], prefix="invalid model config: ")
        require([
            (self.d_model % self.n_heads == 0,
             f"d_model {self.d_model} must be divisible by n_heads {self.n_heads} (--attn-heads)"),
            (self.head_dim % 2 == 0, f"head size d_model/n_heads = {self.head_dim} must be even for RoPE"),
            (self.n_heads % self.n_kv_heads == 0,
             f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads} (--kv-heads)"),
            (0 <= self.draft_vocab <= self.vocab_size,
             f"draft_vocab (--draft-vocab) must be between 1 and the vocabulary size {self.vocab_size} "
             f"(got {self.draft_vocab})"),
        ], prefix="invalid model config: ")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise MtpdError(f"unknown model config keys {sorted(unknown)}: was this checkpoint written by a newer mtpd?")
        for f in dataclasses.fields(cls):
            value, kind = data.get(f.name, f.default), type(f.default)  # every default has its field's type
            if type(value) is not kind and not (kind is float and type(value) is int):
                raise MtpdError(f"model config field '{f.name}' is {value!r}, not {kind.__name__}: the checkpoint's "
                                f"config.json is corrupt")
        return cls(**data).validate()


# Presets. `tiny` learns something useful in ~5 minutes on 2 CPU cores; `small` is the reference model for
# benchmarks: deep relative to its width (docs/design.md §9: a head step is ~15% of a 1-token pass at 12 layers), a
# 5-token forward pass costs far less than five 1-token passes on CPU, and a 4096-token vocabulary because the
# vocabulary projection is the largest part of a head step and of the heads' training cost.
# Dynamic draft length: drafting stops after a draft its head gave less than this probability. Measured on
# the reference model (README, "Results"): 0.05 beat drafting with every head at 4 heads (1.60-1.63x vs
# 1.39-1.57x) and kept 8-16 heads from slowing decoding; 0.2 and above stopped drafts that would be accepted.
DRAFT_THRESHOLD = 0.05
# Prompt lookup (decode/lookup.py): drafts copied per match, transformers' documented example value for
# prompt_lookup_num_tokens. Offline on SmolLM2's greedy MT-Bench answers, 16 gave tau 2.49 against 2.42 for 10,
# for verification passes of 17 tokens instead of 11.
LOOKUP_TOKENS = 10
# The thresholds `--draft-threshold auto` chooses from (decode/tree_calibration.calibrate_chain); 0 drafts with
# every head. Briefly trained heads are under-confident: on the tiny preset after 5 minutes of training 0.05 cut
# the mean accepted tokens from 3.76 to 2.87 a step, the drafts it stopped being mostly right.
DRAFT_THRESHOLDS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.4)
# How `mtpd train --hf` starts its heads (train.py HEAD_INITS). Measured on SmolLM2 (README, "Head-only
# training on a real model"): after the same 49k tokens, heads whose block was copied from the model's last
# block were 0.05-0.08 behind random ones in offline acceptance at every head, at lr 2e-3 and 5e-4.
HEAD_INIT_ON_PRETRAINED = "random"
# The teacher cache (teacher_cache.py) writes nothing while its disk has less free than this: it is only a
# speed-up, and must never be what fills a disk.
TEACHER_CACHE_MIN_FREE_BYTES = 8 << 30
# `mtpd train --hf CHAT_MODEL --time-budget T` without --data first spends this share of T generating the model's
# own conversations (mtpd distill-data, into OUT/chat.jsonl), then trains on them for the rest: the recipe's
# split (benchmarks/smollm2_recipe.sh: 2100 of 5100 s). At equal training tokens they gave 2.3-2.8x the
# acceptance of prose and 3.7-5.8x that of code on SmolLM2 (README, "Training data for a chat model").
OWN_DATA_SHARE = 0.4
OWN_DATA_FILE = "chat.jsonl"

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=2048, d_model=160, n_layers=6, n_heads=5, n_kv_heads=5, ffn_dim=448,
                        max_seq_len=256),
    # `mtpd demo`'s model: tiny's size (2.8M parameters + 0.29M per head), deeper and narrower, so a head step
    # is a smaller share of a pass (docs/design.md §9). In `mtpd demo` (360 s of training on 2 CPU cores) it
    # drafted at 1.53-1.67x KV-cached AR in three fresh runs, where tiny reached 0.95-1.30x after 300 s.
    "demo": ModelConfig(vocab_size=2048, d_model=144, n_layers=10, n_heads=4, n_kv_heads=4, ffn_dim=384,
                        max_seq_len=256),
    "small": ModelConfig(vocab_size=4096, d_model=256, n_layers=12, n_heads=8, n_kv_heads=4, ffn_dim=704,
                         max_seq_len=512),
    # For tests: seconds to build and run.
    "micro": ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                         max_seq_len=128, mtp_heads=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise MtpdError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return dataclasses.replace(PRESETS[name], **overrides).validate()


@dataclass(frozen=True)
class LossConfig:
    """Weights of the MTP-D objective (docs/design.md §2). beta = 0 gives the plain MTP baseline."""

    alpha_lambda: float = 0.3  # alpha_k = alpha_lambda / K (DeepSeek-V3)
    beta: float | None = None  # None: paper default, 1.0 with one head, 0.5 with more
    top_n: int | None = None  # None: chosen by teacher mass coverage (top_mass); >= vocab: full KL
    top_mass: float = 0.995
    kl_direction: str = "forward"  # forward: KL(teacher || student); reverse: KL(student || teacher)
    temperature: float = 1.0
    stop_grad: bool = True  # stop-gradient on the main head (teacher); False is the paper's ablation
    main_weight: float = 1.0  # 0 for head-only training: the main head's CE is then only reported

    def resolved_beta(self, num_heads: int) -> float:
        if self.beta is not None:
            return self.beta
        return 1.0 if num_heads <= 1 else 0.5

    def validate(self) -> "LossConfig":
        checks = [
            (self.alpha_lambda >= 0, f"--alpha-lambda must be >= 0 (got {self.alpha_lambda})"),
            (self.beta is None or self.beta >= 0, f"--beta must be >= 0 (got {self.beta})"),
            (self.top_n is None or self.top_n >= 1, f"--top-n must be >= 1 (got {self.top_n})"),
            (0 < self.top_mass <= 1, f"--top-mass must be in (0, 1] (got {self.top_mass})"),
            (self.kl_direction in ("forward", "reverse"), f"--kl must be forward or reverse (got {self.kl_direction})"),
            (self.temperature > 0, f"--kl-temperature must be > 0 (got {self.temperature})"),
        ]
        require(checks)
        return self
