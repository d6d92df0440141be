"""Frozen configs: a model variant, a training run, an ablation. No torch here, so that
`asdict(cfg)` is exactly the JSON that goes into results and hashes identically everywhere."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Literal

INNER_PLACES = ("conv", "gate", "out")  # the three projections of a Mamba block (paper fig. 3)
MAMBA2_FIELDS = ("headdim", "ngroups", "chunk_size")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    name: str                                            # primary key in results/
    mixer: Literal["mamba", "mamba2", "attention"]       # sequence mixer of every block
    ffn: Literal["none", "dense", "moe"]                 # channel mixer of every block
    layout: Literal["sequential", "parallel"] = "sequential"  # parallel: x + mixer(LN x) + ffn(LN x)
    n_layer: int                                         # blocks; a block = mixer (+ ffn)
    d_model: int
    vocab_size: int = 50304                              # GPT-2's 50257 padded to a multiple of 64
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"  # llm-random used LayerNorm
    tie_embeddings: bool = False
    # mamba (mamba_ssm.Mamba layout); d_inner = round(expand * d_model), Python's round (half to even)
    d_state: int = 16
    d_conv: int = 4
    expand: float = 2.0
    dt_rank: int | None = None                           # None = "auto" = ceil(d_model / 16)
    # mamba2 (mamba_ssm.Mamba2 layout; d_state is shared with mamba, 128 in the Mamba-2 variants)
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    # attention
    n_head: int = 8
    rope_base: float = 10000.0
    # dense FFN and experts: 2-layer MLP d -> d_ff -> d, no biases
    d_ff: int = 0
    activation: Literal["relu", "gelu"] = "relu"         # llm-random's FeedForward used ReLU
    n_expert: int = 0
    top_k: int = 1
    capacity_factor: float | None = 1.0                  # None = dropless
    aux_loss_coef: float = 0.01                          # Switch load-balancing loss weight
    # inner MoE (paper 4.4, table 3): MoEs replace projections inside the Mamba block
    inner_moe: tuple[str, ...] = ()                      # subset of INNER_PLACES
    inner_every: int = 1                                 # 1 = every Mamba layer, 2 = every other one
    inner_n_expert: int = 0                              # experts per modified block, split evenly
    inner_d_hidden: int = 352                            # hidden width of each inner expert MLP
    family: str = ""                                     # label for reports (Mamba, MoE-Mamba, ...)
    paper_ref: str = ""                                  # where in the paper this variant comes from

    def __post_init__(self):
        def need(ok: bool, msg: str):
            if not ok:
                raise ValueError(f"{self.name}: {msg}")
        need(self.n_layer >= 1 and self.d_model >= 8, "n_layer >= 1 and d_model >= 8")
        need(self.vocab_size % 64 == 0, "vocab_size must be a multiple of 64")
        need(self.mixer != "attention" or self.d_model % self.n_head == 0, "d_model % n_head != 0")
        need(self.mixer != "attention" or (self.d_model // self.n_head) % 2 == 0, "RoPE needs an even head dim")
        need(self.ffn == "none" or self.d_ff >= 1, "d_ff must be set when ffn != 'none'")
        need(self.ffn != "moe" or 1 <= self.top_k <= self.n_expert, "need 1 <= top_k <= n_expert")
        need(self.capacity_factor is None or self.capacity_factor > 0, "capacity_factor must be > 0 or None")
        need(self.layout == "sequential" or self.ffn != "none", "a parallel block needs an ffn")
        need(set(self.inner_moe) <= set(INNER_PLACES), f"inner_moe must be a subset of {INNER_PLACES}")
        need(not self.inner_moe or self.mixer == "mamba", "inner MoE needs the Mamba mixer")
        need(not self.inner_moe or self.inner_n_expert % len(self.inner_moe) == 0,
             "inner_n_expert must split evenly over the inner MoEs")
        need(self.inner_every >= 1, "inner_every >= 1")
        need(self.mixer != "mamba2" or (self.d_inner % self.headdim == 0
                                        and (self.d_inner // self.headdim) % self.ngroups == 0),
             "Mamba-2 needs d_inner divisible into heads of headdim, and the heads into ngroups")

    @property
    def d_inner(self) -> int:
        return round(self.expand * self.d_model)

    @property
    def dt_rank_(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    def inner_places_of(self, layer: int) -> tuple[str, ...]:
        """The inner-MoE placements of block `layer` (empty when the block is a plain Mamba)."""
        if not self.inner_moe or layer % self.inner_every != 0:
            return ()
        return tuple(p for p in INNER_PLACES if p in self.inner_moe)

    def to_dict(self) -> dict:
        """The config as JSON; Mamba-2's fields only for a Mamba-2 model, so the rows and hashes of
        the others stay what they were before Mamba-2 existed."""
        d = asdict(self)
        d["inner_moe"] = list(self.inner_moe)
        if self.mixer != "mamba2":
            for k in MAMBA2_FIELDS:
                d.pop(k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        d = dict(d)
        d["inner_moe"] = tuple(d.get("inner_moe", ()))
        return cls(**d)

    def config_hash(self) -> str:
        """Hash of everything that changes the model; the name is a label, not part of the math."""
        d = self.to_dict()
        for k in ("name", "family", "paper_ref"):
            d.pop(k)
        return stable_hash(d)


def stable_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def default_lr(cfg: ModelConfig) -> float:
    """Tables 5 and 6. Mamba without an FFN (inner-MoE variants too) uses Mamba's rate; Mamba with
    an FFN or MoE uses MoE-Mamba's; Transformer-MoE at 100M scale is halved as in the paper."""
    if cfg.mixer == "attention":
        return 2.5e-4 if cfg.ffn == "moe" and cfg.d_model >= 768 else 5e-4
    return 1e-3 if cfg.ffn == "none" else 5e-4


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    tokens: int                                  # token budget; steps = tokens // (batch * ctx)
    batch: int = 64                              # global batch in sequences
    micro_batch: int | None = None               # per forward; None = batch (no accumulation)
    ctx: int = 1024
    lr: float | None = None                      # None = the paper's default for the family
    lr_source: str = "default"                   # "default" | "sweep" | "user"
    min_lr_ratio: float = 0.1                    # cosine ends at 0.1 * lr (paper table 5)
    warmup_frac: float = 0.01
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 0.5
    seed: int = 0
    dtype: Literal["auto", "bf16", "fp32"] = "auto"   # auto = bf16 autocast on CUDA, fp32 on CPU
    impl: str = "auto"                           # a request of moebench/impl.py: auto | fast | ref | key=value,...
    compile: bool | None = None                  # torch.compile the training step; None = train.compiled_on's default
    ema_alpha: float = 0.001                     # smoothing of the training log-perplexity (paper 4.1)
    eval_every_tokens: int = 0                   # 0 = about 10 evaluations per run
    eval_batches: int = 8
    log_every: int = 10                          # steps between curve points
    ckpt_minutes: float = 10.0
    data_dir: str = ""                           # "" = the default prepared corpus

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def peak_lr(self, cfg: ModelConfig) -> float:
        """`lr` when set, else the paper's rate for the model's family (default_lr)."""
        return self.lr if self.lr is not None else default_lr(cfg)


@dataclass(frozen=True, kw_only=True)
class Preset:
    name: str
    tokens: int
    batch: int
    ctx: int
    micro_batch: int | None = None
    scale: Literal["tiny", "paper"] = "paper"    # tiny = run the variants' CPU twins
    eval_batches: int = 8
    seeds: int = 1                               # seeds 0..seeds-1 of every variant (Ablation.extra_seeds)
    note: str = ""


@dataclass(frozen=True, kw_only=True)
class Ablation:
    name: str
    table: str                                   # e.g. "table 4"
    question: str
    variants: tuple[str, ...]                    # registry names
    baseline: str                                # speedup is measured over this variant
    presets: dict[str, Preset] = field(default_factory=dict)
    # variants that get more seeds at presets of several seeds (the headline's tighter intervals)
    extra_seeds: dict[str, int] = field(default_factory=dict)

    def seeds(self, preset: str, variant: str) -> int:
        """How many seeds (0..n-1) `variant` trains at `preset`."""
        n = self.presets[preset].seeds
        return max(n, self.extra_seeds.get(variant, n)) if n > 1 else n
