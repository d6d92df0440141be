"""Generation on CPU: prefill + step decoding equals the full forward for every family, greedy
generation is the argmax of the full forward token by token, sampling is reproducible, the prompt's
logits are never materialised, and `moebench generate` samples from a saved checkpoint."""
from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from moebench import checkpoint
from moebench.errors import UserError
from moebench.generate import Decoder, decoding, generate, penalize_repeats, prefill, sample
from moebench.models.lm import build_model
from moebench.ops import moe_decode
from moebench.registry import get

FAMILIES = ["Mamba_25M", "MoE-Mamba_25M", "ParMoE-Mamba_25M-e8", "InnerMoE_25M-conv+gate+out-all", "Mamba2_25M",
            "MoE-Mamba2_25M",
            "Transformer_25M", "Transformer-MoE_25M"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(name: str, seed: int = 0, impl: str = "ref", device="cpu"):
    """The CPU twin, dropless (capacity None) so that full forward and decode route alike."""
    torch.manual_seed(seed)
    return build_model(replace(get(name + "@tiny"), capacity_factor=None), impl=impl, device=device).eval()


def assert_close(name, got, want, atol=1e-4, rtol=1e-4):
    diff = (got.float() - want.float()).abs()
    assert torch.allclose(got.float(), want.float(), atol=atol, rtol=rtol), \
        f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


def assert_decoding_matches(name, model, idx_BL, full_BLV, P=4, static=True):
    """Prefill of the first P tokens, then one step per token: each position's logits equal the full
    forward's (full_BLV, computed by the caller)."""
    with decoding(model):
        dec = Decoder(model, idx_BL.shape[0], idx_BL.shape[1], static=static)
        assert_close(f"{name} prefill", dec.prefill(idx_BL[:, :P]), full_BLV[:, P - 1])
        for t in range(P, idx_BL.shape[1]):
            assert_close(f"{name} step at {t}", dec.step(idx_BL[:, t]), full_BLV[:, t])


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("name", FAMILIES)
def test_step_decoding_equals_full_forward(name, static):
    model = tiny_model(name)
    idx_BL = torch.randint(0, 50257, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full_BLV = model(idx_BL).logits
    assert_decoding_matches(name, model, idx_BL, full_BLV, static=static)


@pytest.mark.usefixtures("triton_runs")
@pytest.mark.parametrize("name", ["MoE-Mamba_25M", "InnerMoE_25M-conv+gate+out-all", "Transformer-MoE_25M"])
def test_step_decoding_with_decode_kernels_equals_full_forward(name, monkeypatch):
    """With decode=on, each decode step's MoE layers take ops/moe_decode.py's Triton kernels
    (the whole sublayer with its norm in a sequential block; router and experts in an inner MoE): the steps still equal the full forward (which takes the grouped path).
    On a GPU machine the model runs on the GPU: compiled Triton kernels take no CPU tensors."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = tiny_model(name, impl="mixer=ref,moe=grouped,routing=triton,decode=on", device=dev)
    calls = []
    # a sequential block's MoE sublayer goes through decode_moe_residual (Block.step); inner MoEs
    # through MoE.forward's decode_experts
    for fn in ("decode_experts", "decode_moe_residual"):
        real = getattr(moe_decode, fn)
        monkeypatch.setattr(moe_decode, fn, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    idx_BL = torch.randint(0, 50257, (3, 9), generator=torch.Generator().manual_seed(4)).to(dev)
    with torch.no_grad():
        full_BLV = model(idx_BL).logits
    assert not calls, "the full forward must take the grouped path"
    assert_decoding_matches(name, model, idx_BL, full_BLV)
    assert len(calls) == len(model.moe_layers()) * (idx_BL.shape[1] - 4)


@pytest.mark.parametrize("name", ["MoE-Mamba_25M", "InnerMoE_25M-conv+gate+out-all", "Transformer-MoE_25M"])
def test_greedy_generate_is_argmax_of_full_forward(name):
    model = tiny_model(name)
    prompt_BL = torch.randint(0, 50257, (2, 5), generator=torch.Generator().manual_seed(2))
    out1 = generate(model, prompt_BL, 6, greedy=True)
    out2 = generate(model, prompt_BL, 6, greedy=True)
    assert out1.shape == (2, 11) and torch.equal(out1[:, :5], prompt_BL)
    assert torch.equal(out1, out2), "greedy generation is not deterministic"
    with torch.no_grad():
        for t in range(5, 11):
            want = model(out1[:, :t]).logits[:, -1].argmax(-1)
            assert torch.equal(out1[:, t], want), f"token {t}: generated {out1[:, t]}, full forward argmax {want}"


def test_decoding_is_dropless_and_restores_the_model():
    torch.manual_seed(0)
    model = build_model(get("Transformer-MoE_25M@tiny"), impl="ref")   # capacity_factor 1.0
    moe = model.moe_layers()[0]
    x_TD = torch.randn(64, moe.d_in)
    with torch.no_grad():
        model.train()
        assert float(moe(x_TD)[1].dropped_frac) > 0, "a capacity of 1.0 drops tokens in training"
        with decoding(model):
            assert not model.training and float(moe(x_TD)[1].dropped_frac) == 0
    assert model.training


def test_sampling_is_reproducible_and_respects_filters():
    model = tiny_model("Mamba_25M")
    prompt_BL = torch.randint(0, 50257, (3, 4), generator=torch.Generator().manual_seed(3))
    a = generate(model, prompt_BL, 5, temperature=1.3, top_k=40, top_p=0.9, seed=7)
    b = generate(model, prompt_BL, 5, temperature=1.3, top_k=40, top_p=0.9, seed=7)
    assert torch.equal(a, b)
    greedy = generate(model, prompt_BL, 5, greedy=True)
    assert torch.equal(generate(model, prompt_BL, 5, top_k=1, seed=1), greedy)
    assert torch.equal(generate(model, prompt_BL, 5, top_p=1e-6, seed=1), greedy)

    logits_BV = torch.zeros(4, 64)
    logits_BV[:, 60:] = 10.0                                # the padded ids are the most likely
    assert (sample(logits_BV, vocab_size=50, generator=torch.Generator().manual_seed(0)) < 50).all()
    logits_BV = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(200, 1)
    tok = sample(logits_BV, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {2, 3}


def test_prefill_never_computes_the_prompts_logits():
    model = tiny_model("Transformer-MoE_25M")
    seen = []
    model.head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    prefill(model, torch.randint(0, 50257, (2, 9)))
    assert seen == [(2, model.cfg.d_model)], f"head saw {seen}"


@pytest.mark.parametrize("name", ["Mamba_25M", "MoE-Mamba_25M", "Transformer_25M"])
def test_state_memory_against_context(name):
    model = tiny_model(name)
    sizes = []
    for L in (8, 32, 128):
        with decoding(model):
            dec = Decoder(model, 2, L + 4)
            dec.prefill(torch.randint(0, 50257, (2, L)))
            sizes.append(dec.state_bytes())
    if model.cfg.mixer == "mamba":
        assert len(set(sizes)) == 1, f"Mamba state grows with context: {sizes}"
    else:
        assert sizes[0] < sizes[1] < sizes[2], f"KV cache does not grow with context: {sizes}"


# ---- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_checkpoint(tmp_path):
    cfg = get("MoE-Mamba_25M@tiny")
    torch.manual_seed(0)
    model = build_model(cfg, impl="ref")
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"model": model.state_dict(), "model_config": cfg.to_dict(), "step": 0})
    return path


def test_cli_generate_from_checkpoint(tiny_checkpoint):
    from moebench.cli import app
    runner = CliRunner()
    args = ["generate", str(tiny_checkpoint), "--prompt", "The cat sat", "--max-new-tokens", "4",
            "--greedy", "--device", "cpu"]
    r1 = runner.invoke(app, args)
    assert r1.exit_code == 0, r1.output
    assert r1.stdout.startswith("The cat sat") and len(r1.stdout) > len("The cat sat")
    assert runner.invoke(app, args).stdout == r1.stdout
    r3 = runner.invoke(app, ["generate", str(tiny_checkpoint), "--prompt", "Hi", "--max-new-tokens", "3",
                             "--top-k", "5", "--seed", "1", "--temperature", "0.8", "--device", "cpu"])
    assert r3.exit_code == 0, r3.output


@pytest.mark.parametrize("kind", ["missing", "garbage", "not-moebench"])
def test_cli_generate_bad_checkpoint_is_a_user_error(tmp_path, monkeypatch, capsys, kind):
    from moebench import cli
    path = tmp_path / "ckpt.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint")
    elif kind == "not-moebench":
        torch.save({"weights": {}}, path)
    monkeypatch.setattr(sys, "argv", ["moebench", "generate", str(path), "--prompt", "x", "--device", "cpu"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1, err


# ---- GPU: the fast kernels and CUDA-graph decoding ---------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["MoE-Mamba_25M", "InnerMoE_25M-conv+gate+out-all", "Transformer-MoE_25M"])
def test_step_decoding_equals_full_forward_cuda(name):
    """fp32 on CUDA with the default (fast) kernels: prefill + steps against the full forward."""
    torch.manual_seed(0)
    model = build_model(replace(get(name + "@tiny"), capacity_factor=None), impl="auto", device="cuda").eval()
    idx_BL = torch.randint(0, 50257, (3, 40), device="cuda")
    with torch.no_grad():
        full_BLV = model(idx_BL).logits
    with decoding(model):
        dec = Decoder(model, 3, 40)
        assert_close(f"{name} prefill", dec.prefill(idx_BL[:, :30]), full_BLV[:, 29], atol=1e-3, rtol=1e-3)
        for t in range(30, 40):
            assert_close(f"{name} step {t}", dec.step(idx_BL[:, t]), full_BLV[:, t], atol=1e-3, rtol=1e-3)


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("name", ["Mamba_25M", "MoE-Mamba_25M", "Transformer-MoE_25M"])
def test_cuda_graph_decode_equals_eager(name):
    """bf16 weights; the same tokens fed to an eager and a graphed decoder give the same logits."""
    from moebench.generate import cast_for_inference
    torch.manual_seed(0)
    model = cast_for_inference(build_model(get(name + "@tiny"), impl="auto", device="cuda"), torch.bfloat16)
    idx_BL = torch.randint(0, 50257, (4, 48), device="cuda")
    with decoding(model):
        eager = Decoder(model, 4, 48)
        graph = Decoder(model, 4, 48, cuda_graph=True)
        logits = [(eager.prefill(idx_BL[:, :37]), graph.prefill(idx_BL[:, :37]))]
        for t in range(37, 48):
            logits.append((eager.step(idx_BL[:, t]).clone(), graph.step(idx_BL[:, t]).clone()))
    for i, (a, b) in enumerate(logits):
        scale = a.float().abs().max()
        assert (a.float() - b.float()).abs().max() <= 3e-2 * scale, f"{name} step {i}: graph and eager differ"
    out = generate(model, idx_BL[:, :8], 6, greedy=True, cuda_graph=True)
    assert out.shape == (4, 14)


# ---- repetition penalty and length --------------------------------------------------------------

def test_penalty_scales_seen_logits_by_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    assert penalize_repeats(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0, 0.5]]
    assert sample(logits, greedy=True).item() == 0
    assert sample(logits, greedy=True, seen_BV=seen, repetition_penalty=4.0).item() == 2


@pytest.mark.parametrize("name", ["MoE-Mamba_25M", "Mamba2_25M"])
def test_greedy_with_penalty_is_the_penalised_argmax_of_the_full_forward(name):
    """Each step's token is the argmax of the full forward's last logits after penalising every token
    of the prompt and of what was generated so far."""
    model = tiny_model(name)
    with torch.no_grad():      # token 42 wins every step (logit ~20, the others ~1): plain greedy repeats it
        model.norm_f.bias.zero_()
        model.norm_f.bias[0] = 5.0
        model.head.weight[42] = 0.0
        model.head.weight[42, 0] = 4.0
    prompt = torch.randint(0, 50257, (2, 6), generator=torch.Generator().manual_seed(0))
    prompt[:, 2] = 42
    plain = generate(model, prompt, 8, greedy=True)
    assert (plain[:, 6:] == 42).all()
    out = generate(model, prompt, 8, greedy=True, repetition_penalty=1000.0)
    seq = prompt.clone()
    with torch.no_grad():
        for _ in range(8):
            logits = model(seq).logits[:, -1].float()
            seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, seq, True)
            seq = torch.cat([seq, penalize_repeats(logits, seen, 1000.0).argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    assert (out[:, 6:] != 42).all()
    assert all(len(set(row)) == len(row) for row in out[:, 6:].tolist())    # each repeat's logit falls to ~0


def test_cli_max_length_caps_and_refuses_no_room(tiny_checkpoint):
    from moebench.cli import app
    from moebench.data.tokenizer import get_tokenizer
    runner = CliRunner()
    base = ["generate", str(tiny_checkpoint), "--prompt", "The cat sat", "--greedy", "--device", "cpu"]
    r = runner.invoke(app, base + ["--max-new-tokens", "20", "--max-length", "5", "--repetition-penalty", "1.3"])
    assert r.exit_code == 0, r.output
    assert len(get_tokenizer().encode(r.stdout.rstrip("\n"))) <= 5 + 1       # a re-encoding may merge or split one
    r = runner.invoke(app, base + ["--max-length", "2"])       # cli.main turns a UserError into one line, exit 2
    assert isinstance(r.exception, UserError) and "leaves no room" in str(r.exception)
    r = runner.invoke(app, base + ["--repetition-penalty", "0"])
    assert isinstance(r.exception, UserError) and "repetition-penalty" in str(r.exception)


def test_cli_generates_from_a_mamba2_checkpoint(tmp_path):
    from moebench.cli import app
    cfg = get("Mamba2_25M@tiny")
    torch.manual_seed(0)
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"model": build_model(cfg, impl="ref").state_dict(), "model_config": cfg.to_dict(), "step": 0})
    r = CliRunner().invoke(app, ["generate", str(path), "--prompt", "Hello", "--max-new-tokens", "5", "--top-k", "20",
                                 "--seed", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("Hello") and len(r.stdout) > len("Hello")


def test_a_learned_vocab_checkpoint_decodes_with_its_own_tokenizer(tmp_path):
    from moebench.data.tokenizer import learn_bpe
    from moebench.generate import tokenizer_of
    data = tmp_path / "prose-bpe300"
    data.mkdir()
    learn_bpe(["the cat sat on the mat, and the dog sat on the log. " * 20] * 10, 300).save(str(data / "tokenizer.json"))
    (data / "manifest.json").write_text('{"tokenizer": {"name": "bpe-300", "file": "tokenizer.json", "vocab_size": 300}}')
    tok = tokenizer_of({"train_config": {"data_dir": str(data)}}, "ckpt.pt")
    assert tok.vocab_size <= 300 and tok.eot == 0 and tok.decode(tok.encode("the cat sat")) == "the cat sat"  # small text: fewer merges
    assert tokenizer_of({"train_config": {"data_dir": ""}}, "ckpt.pt").vocab_size == 50257     # GPT-2's
