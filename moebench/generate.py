"""Autoregressive generation: prefill the prompt once, then one token per step.

Mamba-family blocks carry a recurrent state per layer (conv state + SSM state, constant in the
context length); attention blocks carry a KV cache. Both sit behind one API:

    tokens_BN = generate(model, prompt_BL, max_new_tokens=64, top_k=50, seed=0)

Building blocks: `prefill(model, idx_BL)` runs the blocks once over the prompt with
`return_state=True` and computes logits for the last position only (the prompt's full logits would
be B·L·V numbers: 53 GB in bf16 at batch 64 × 8k × 50k); `decode_step(model, token_B, states)`
advances every block by one token through `Block.step`; `Decoder` holds preallocated states so
that its step can be captured once as a CUDA graph (static buffers; captured after a warm-up).

Shapes: B batch, L prompt length, V vocabulary, D model, S cache length, H heads, K head dim.

MoE layers decode dropless, as every MoE does in eval mode: at decode time T = B tokens per step,
and a capacity of int(1.0 · 64 / 32) = 2 per expert would drop most of them.
"""
from __future__ import annotations

import functools
import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F

from moebench import checkpoint
from moebench.config import ModelConfig
from moebench.data import get_tokenizer
from moebench.env import resolve_device
from moebench.errors import UserError
from moebench.models.lm import build_model

# ---- building blocks ----------------------------------------------------------------------------


def compute_dtype(model) -> torch.dtype:
    """bf16 under autocast, else the parameters' dtype: the dtype of the KV cache."""
    dev = model.head.weight.device.type
    if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return model.head.weight.dtype


def cast_for_inference(model, dtype: torch.dtype):
    """Weights in `dtype` (no per-step autocast copies of every expert), except the Mamba mixers'
    A_log and D, which stay fp32 as in mamba_ssm (tagged `_no_weight_decay`, as the optimizer sees them)."""
    for p in model.parameters():
        if p.is_floating_point() and not getattr(p, "_no_weight_decay", False):
            p.data = p.data.to(dtype)
    return model


def allocate_states(model, batch: int, max_len: int, device=None, dtype=None) -> list:
    """One state per block: a KV cache of max_len positions, or the Mamba mixer's recurrent state."""
    device = device or model.head.weight.device
    dtype = dtype or compute_dtype(model)
    states = []
    for block in model.blocks:
        if model.cfg.mixer == "attention":
            states.append(block.mixer.allocate_state(batch, max_len, device, dtype))
        else:
            states.append(block.mixer.allocate_state(batch, device, dtype))
    return states


def _copy_into(dst, src):
    """Copy a state returned by a step or the prefill into preallocated buffers (in place)."""
    if dst is src:
        return
    if isinstance(dst, torch.Tensor):
        if dst.data_ptr() != src.data_ptr():
            dst.copy_(src)
    elif isinstance(dst, dict):
        for k, v in dst.items():
            if isinstance(v, torch.Tensor) and k in src:
                _copy_into(v, src[k])
    elif isinstance(dst, (tuple, list)):
        assert len(dst) == len(src), "state structure changed between steps"
        for d, s in zip(dst, src):
            _copy_into(d, s)


def state_bytes(states) -> int:
    """Bytes held by decoding states (KV caches or recurrent states); shared tensors counted once."""
    seen: dict[int, int] = {}

    def walk(s):
        if isinstance(s, torch.Tensor):
            seen[s.data_ptr()] = s.numel() * s.element_size()
        elif isinstance(s, dict):
            for v in s.values():
                walk(v)
        elif isinstance(s, (tuple, list)):
            for v in s:
                walk(v)
    walk(states)
    return sum(seen.values())


@torch.no_grad()
def prefill(model, idx_BL: torch.Tensor, states: list | None = None, max_len: int | None = None):
    """Run the prompt through every block once -> (logits of the last position (B, V), states).

    Attention blocks load their (k, v) into a KV cache of max_len positions (default: L) one layer
    at a time, so only one layer's full-prompt (k, v) is alive at once. With `states`, every state
    is written in place into those buffers (what a captured CUDA graph reads)."""
    B, L = idx_BL.shape
    x_BLD = model.embed(idx_BL)
    out = []
    for i, block in enumerate(model.blocks):
        x_BLD, _, st = block(x_BLD, None, return_state=True)
        if model.cfg.mixer == "attention":
            k = st[0]
            cache = states[i] if states is not None else \
                block.mixer.allocate_state(B, max_len or L, k.device, compute_dtype(model))
            st = block.mixer.load_prefill(cache, st)
        elif states is not None:
            _copy_into(states[i], st)
            st = states[i]
        out.append(st)
    h_BD = model.norm_f(x_BLD[:, -1])
    return model.head(h_BD), out


@torch.no_grad()
def decode_step(model, token_B: torch.Tensor, states: list):
    """One token per sequence through every block -> (logits (B, V), new states)."""
    x_BD = model.embed(token_B)
    new = []
    for block, st in zip(model.blocks, states):
        x_BD, st = block.step(x_BD, st)
        new.append(st)
    return model.head(model.norm_f(x_BD)), new


def attention_step_static(attn, x_BD: torch.Tensor, state: dict):
    """Attention.step with static shapes and no host synchronisation (capturable in a CUDA graph):
    the position is a device tensor state['pos'] (1,), the new k/v go in with index_copy_, and the
    whole cache is attended with a mask that hides positions > pos. Same math as Attention.step."""
    pos_1 = state["pos"]
    q, k, v = attn._qkv(x_BD[:, None], pos_1)
    k_BHSK, v_BHSK = state["k"], state["v"]
    k_BHSK.index_copy_(2, pos_1, k.to(k_BHSK.dtype))
    v_BHSK.index_copy_(2, pos_1, v.to(v_BHSK.dtype))
    seen_S = torch.arange(k_BHSK.shape[2], device=x_BD.device) <= pos_1
    y = F.scaled_dot_product_attention(q.to(k_BHSK.dtype), k_BHSK, v_BHSK, attn_mask=seen_S.view(1, 1, 1, -1))
    return attn.proj(y.transpose(1, 2).reshape(x_BD.shape[0], -1).to(x_BD.dtype)), state


@contextmanager
def static_attention(model):
    """Route every attention mixer's `step` through attention_step_static for the duration."""
    mixers = [b.mixer for b in model.blocks] if model.cfg.mixer == "attention" else []
    for m in mixers:
        m.step = functools.partial(attention_step_static, m)   # instance attribute shadows the method
    try:
        yield
    finally:
        for m in mixers:
            del m.step


@contextmanager
def decoding(model):
    """Eval mode (dropless MoE) for the duration; the training mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


# ---- a decoding session -------------------------------------------------------------------------


class Decoder:
    """Preallocated states for `batch` sequences of up to `max_len` tokens; `prefill` then `step`.

    static=True uses the capturable attention step (device-side position); cuda_graph=True also
    captures `step` as a CUDA graph after `warmup` eager steps on the (still empty) states, before
    the prefill fills them, so no state has to be saved and restored around the capture.
    Use inside `decoding(model)` (generate() does)."""

    def __init__(self, model, batch: int, max_len: int, *, static: bool = False, cuda_graph: bool = False,
                 warmup: int = 2):
        self.model, self.batch = model, batch
        self.device = model.head.weight.device
        self.static = static or cuda_graph
        if cuda_graph:
            if self.device.type != "cuda":
                raise ValueError("cuda_graph=True needs the model on a CUDA device")
            if model.impl.moe == "loop":
                raise ValueError("cuda_graph=True needs MoE impl 'grouped' (sync-free); the model's is 'loop'")
        # a cache length that is a multiple of 64 keeps the mask of the static step aligned
        self.max_len = -(-max_len // 64) * 64 if self.static else max_len
        self.states = allocate_states(model, batch, self.max_len) if self.static else None
        self.pos_1 = torch.zeros(1, dtype=torch.long, device=self.device)
        if self.static:
            for st in self.states:
                if isinstance(st, dict):
                    st["pos"] = self.pos_1               # one position shared by every layer
        self.graph = None
        self.capture_s = 0.0
        if cuda_graph:
            self._capture(warmup)

    @torch.no_grad()
    def _static_step(self, token_B):
        with static_attention(self.model):
            logits_BV, new = decode_step(self.model, token_B, self.states)
        _copy_into(self.states, new)
        self.pos_1.add_(1)
        return logits_BV

    def _capture(self, warmup: int):
        t0 = time.perf_counter()
        self.token_B = torch.zeros(self.batch, dtype=torch.long, device=self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, warmup)):
                self._static_step(self.token_B)
        torch.cuda.current_stream(self.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.logits_BV = self._static_step(self.token_B)
        except RuntimeError as e:
            raise RuntimeError(f"CUDA graph capture of the decode step failed (a host sync or a dynamic "
                               f"shape in a mixer or MoE step?): {e}") from e
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - t0

    @torch.no_grad()
    def prefill(self, idx_BL: torch.Tensor) -> torch.Tensor:
        B, L = idx_BL.shape
        assert B == self.batch and L < self.max_len, f"prompt {tuple(idx_BL.shape)} vs batch {self.batch}, max_len {self.max_len}"
        logits_BV, states = prefill(self.model, idx_BL, states=self.states, max_len=self.max_len)
        self.states = states
        self.pos_1.fill_(L)
        return logits_BV

    @torch.no_grad()
    def step(self, token_B: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.token_B.copy_(token_B)
            self.graph.replay()
            return self.logits_BV
        if self.static:
            return self._static_step(token_B)
        logits_BV, self.states = decode_step(self.model, token_B, self.states)
        return logits_BV

    def state_bytes(self) -> int:
        return state_bytes(self.states)


# ---- sampling -----------------------------------------------------------------------------------


def penalize_repeats(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as Hugging Face applies it: the logit of every
    token already in the row's sequence is divided by `penalty` where positive, multiplied where
    negative, so a penalty above 1 always makes a repeat less likely."""
    scaled_BV = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, scaled_BV, logits_BV)


def sample(logits_BV: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, greedy: bool = False, generator: torch.Generator | None = None,
           vocab_size: int | None = None, seen_BV: torch.Tensor | None = None,
           repetition_penalty: float = 1.0) -> torch.Tensor:
    """Next token per row. top_k keeps the k largest logits; top_p keeps the smallest set of tokens
    whose probability reaches p (nucleus sampling, Holtzman et al.); vocab_size hides the padded ids;
    repetition_penalty > 1 discourages the tokens seen_BV marks (penalize_repeats), before any of them."""
    logits_BV = logits_BV.float()
    if seen_BV is not None and repetition_penalty != 1.0:
        logits_BV = penalize_repeats(logits_BV, seen_BV, repetition_penalty)
    if vocab_size is not None and vocab_size < logits_BV.shape[-1]:
        logits_BV = logits_BV.clone()
        logits_BV[:, vocab_size:] = float("-inf")
    if greedy or temperature == 0:
        return logits_BV.argmax(-1)
    logits_BV = logits_BV / temperature
    if top_k is not None and 0 < top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        p_BV = sorted_BV.softmax(-1)
        drop_BV = p_BV.cumsum(-1) - p_BV > top_p          # mass before this token already reaches p
        sorted_BV = sorted_BV.masked_fill(drop_BV, float("-inf"))
        logits_BV = torch.full_like(logits_BV, float("-inf")).scatter(-1, order_BV, sorted_BV)
    probs_BV = logits_BV.softmax(-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)


@torch.no_grad()
def generate(model, prompt_BL: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, greedy: bool = False,
             seed: int | None = None, cuda_graph: bool = False, *, vocab_size: int | None = None,
             repetition_penalty: float = 1.0) -> torch.Tensor:
    """-> (B, L + max_new_tokens): the prompt followed by the sampled tokens.

    Runs in the model's dtype (or under the caller's autocast); eval mode and dropless MoE for the
    call. seed makes sampling reproducible (a generator on the model's device)."""
    if prompt_BL.dim() == 1:
        prompt_BL = prompt_BL[None]
    B, L = prompt_BL.shape
    if L < 1:
        raise ValueError("generate needs a prompt of at least one token")
    if max_new_tokens <= 0:
        return prompt_BL
    device = model.head.weight.device
    prompt_BL = prompt_BL.to(device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    out_BN = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    seen_BV = None
    if repetition_penalty != 1.0:
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        seen_BV = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen_BV.scatter_(1, prompt_BL, True)
    with decoding(model):
        dec = Decoder(model, B, L + max_new_tokens, cuda_graph=cuda_graph)
        logits_BV = dec.prefill(prompt_BL)
        for i in range(max_new_tokens):
            tok_B = sample(logits_BV, temperature, top_k, top_p, greedy, gen, vocab_size, seen_BV, repetition_penalty)
            if seen_BV is not None:
                seen_BV.scatter_(1, tok_B[:, None], True)
            out_BN[:, i] = tok_B
            if i + 1 < max_new_tokens:
                logits_BV = dec.step(tok_B)
    return torch.cat([prompt_BL, out_BN], dim=1)


def load_for_generation(path: str, device: str = "auto"):
    """(model in eval mode, tokenizer, device) from a checkpoint; bad paths and contents are UserErrors."""
    dev = resolve_device(device)
    if not Path(path).is_file():
        raise UserError(f"no checkpoint at {path}" + (" (a folder: pass its ckpt.pt)" if Path(path).is_dir() else ""))
    state = checkpoint.load(path, map_location="cpu")
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise UserError(f"{path} is not a moebench checkpoint (needs 'model' and 'model_config')")
    try:
        cfg = ModelConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad model_config ({e})") from None
    model = build_model(cfg, impl="auto", device=dev)    # built on the device: 'auto' picks the kernels there
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        # torch's first line only names the model; the second says which keys or shapes differ
        why = "; ".join(line.strip() for line in str(e).splitlines()[:2] if line.strip())
        raise UserError(f"{path}: weights do not fit {cfg.name} ({why})") from None
    model.eval()
    if dev.type == "cuda":    # bf16 weights: no per-step autocast copies of every expert; graph friendly
        model = cast_for_inference(model, torch.bfloat16)
    return model, tokenizer_of(state, path), dev


def tokenizer_of(state: dict, path: str):
    """GPT-2's tokenizer, or the learned one of the data the checkpoint was trained on (its manifest)."""
    data_dir = (state.get("train_config") or {}).get("data_dir") or ""
    manifest = Path(data_dir) / "manifest.json" if data_dir else None
    if manifest is None or not manifest.is_file():
        return get_tokenizer()
    file = json.loads(manifest.read_text())["tokenizer"].get("file")
    if file is None:
        return get_tokenizer()
    return get_tokenizer(str(Path(data_dir) / file))
