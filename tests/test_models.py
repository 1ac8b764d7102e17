"""Target model, drafters and attention backends against float64 references, checkpoints, bad input."""
from __future__ import annotations

import json

import pytest
import torch

import dspark_ops
import dspark_ops.reference
import model_reference as ref
from dspark_ops.models import (DenseKVCache, DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter, LlamaConfig,
                               LlamaModel, PagedAttention, build_drafter_from_target, load_drafter)
from dspark_ops.models.llama import slots_state_dict
from dspark_ops.models.weights import save_safetensors
from randomness import fresh_seed

VOCAB = 100
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

VARIANTS = {
    "llama-gqa-tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen3-qknorm-untied": dict(model_type="qwen3", qk_norm=True, tie_word_embeddings=False),
    "qwen2-bias": dict(model_type="qwen2", qkv_bias=True),
    "llama-rope-llama3-mha": dict(model_type="llama", num_key_value_heads=4, rope_scaling=LLAMA3_SCALING,
                                  rope_theta=500.0, attention_bias=None),
}


def tiny_config(layers=2, **kw) -> LlamaConfig:
    kw.pop("attention_bias", None)
    base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=64)
    base.update(kw)
    return LlamaConfig(**base)


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Weights far from init: matrices ~N(0, 0.3), norms ~1 + N(0, 0.2), biases ~N(0, 0.1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)


def tiny_model(variant="llama-gqa-tied", layers=2, seed=0, dtype=torch.float32) -> LlamaModel:
    model = LlamaModel(tiny_config(layers, **VARIANTS[variant]), dtype=dtype)
    randomize(model, seed)
    return model.eval()


def hf_state(model) -> dict:
    return slots_state_dict(model.hf_slots())


@pytest.fixture
def seed():
    return fresh_seed()


# --------------------------------------------------------------------------- target model

@pytest.mark.parametrize("variant", list(VARIANTS))
def test_forward_matches_reference(variant, seed):
    model = tiny_model(variant, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 11), generator=gen)
    with torch.no_grad():
        out = model(ids, hidden_layers=[-1, 0, 1])
    sd = hf_state(model)
    for b in range(2):
        logits, layers = ref.llama(sd, model.config, ids[b])
        torch.testing.assert_close(out.logits[b].double(), logits, rtol=1e-4, atol=1e-4)
        want = torch.cat([layers[-1], layers[0], layers[1]], dim=-1)
        torch.testing.assert_close(out.layer_hidden[b].double(), want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(model.compute_logits(out.hidden[b]).double(), logits, rtol=1e-4, atol=1e-4)


def test_dense_cache_incremental_matches_full(seed):
    """Prefill, per-request rollback to different lengths, then causal blocks and single tokens."""
    model = tiny_model("qwen3-qknorm-untied", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 14), generator=gen)
    cache = DenseKVCache.for_model(model, 3, 32)
    with torch.no_grad():
        model(ids[:, :8], kv=cache)
        cache.truncate([8, 5, 6])
        seqs = [ids[b, :n].tolist() for b, n in enumerate([8, 5, 6])]
        for step in (3, 1, 2):
            new = torch.randint(0, VOCAB, (3, step), generator=gen)
            got = model(new, kv=cache).logits
            for b in range(3):
                seqs[b] += new[b].tolist()
                full = model(torch.tensor([seqs[b]])).logits[0, -step:]
                torch.testing.assert_close(got[b], full, rtol=1e-5, atol=1e-5)
    assert cache.lengths.tolist() == [len(s) for s in seqs]


def test_causal_forward_is_differentiable():
    model = tiny_model()
    ids = torch.randint(0, VOCAB, (2, 6))
    model(ids).logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("variant", ["llama-gqa-tied", "qwen3-qknorm-untied", "qwen2-bias"])
def test_save_load_roundtrip(tmp_path, variant, seed):
    model = tiny_model(variant, seed=seed)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.save_pretrained(tmp_path)
    loaded = LlamaModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_sharded_load_and_dtypes(tmp_path, seed):
    model = tiny_model("qwen3-qknorm-untied", seed=seed)
    sd = hf_state(model)
    names = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_safetensors({k: sd[k] for k in keys}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(LlamaModel.from_pretrained(tmp_path)(ids).logits, want, rtol=0, atol=0)
        for dtype, tol in ((torch.bfloat16, 0.15), (torch.float16, 0.02)):
            low = LlamaModel.from_pretrained(tmp_path, dtype=str(dtype).removeprefix("torch."))
            assert low.dtype == dtype and low.rotary.inv_freq.dtype == torch.float32
            got = low(ids).logits.float()
            assert (got - want).abs().max() <= tol * want.abs().max()


def test_hidden_layers_and_positions(seed):
    model = tiny_model(seed=seed)
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        out = model(ids, hidden_layers=[1, -1])
        assert out.layer_hidden.shape == (1, 6, 64)
        torch.testing.assert_close(out.layer_hidden[..., 32:], model.embed(ids))
        # RoPE only sees relative positions: shifting every position of a window changes nothing.
        shifted = model(ids[:, 2:], positions=torch.arange(7, 11).view(1, 4)).logits
        torch.testing.assert_close(shifted, model(ids[:, 2:]).logits, rtol=1e-4, atol=1e-4)
        assert model(ids, return_logits=False).logits is None


# --------------------------------------------------------------------------- transformers parity

def _hf_roundtrip(tmp_path, hf_cls, hf_config, seed):
    torch.manual_seed(seed)
    hf = hf_cls(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():   # break the symmetric init of norms
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours = LlamaModel.from_pretrained(tmp_path)
    ids = torch.randint(0, hf_config.vocab_size, (2, 12))
    with torch.no_grad():
        want = hf(ids, output_hidden_states=True)
        got = ours(ids, hidden_layers=range(hf_config.num_hidden_layers - 1))
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-4)
    d = hf_config.hidden_size
    for i in range(hf_config.num_hidden_layers - 1):   # HF's last entry is after the final norm
        torch.testing.assert_close(got.layer_hidden[..., i * d:(i + 1) * d], want.hidden_states[i + 1],
                                   rtol=1e-4, atol=1e-4)


HF_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def test_transformers_parity_llama_with_llama3_rope(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(**HF_COMMON, tie_word_embeddings=False, rope_theta=500.0,
                                   rope_scaling=dict(LLAMA3_SCALING))
    _hf_roundtrip(tmp_path, transformers.LlamaForCausalLM, cfg, seed)


def test_transformers_parity_qwen3(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3Config(**HF_COMMON, head_dim=16, tie_word_embeddings=True)
    _hf_roundtrip(tmp_path, transformers.Qwen3ForCausalLM, cfg, seed)


def test_transformers_parity_qwen2(tmp_path, seed):
    transformers = pytest.importorskip("transformers")
    _hf_roundtrip(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**HF_COMMON), seed)


@pytest.mark.parametrize("threads", [1, 2])
def test_norm_and_rotary_match_their_textbook_form(threads, seed):
    """RMSNorm: the differentiable form equals the explicit Hugging Face formula bit for bit, and the fused op
    used without autograd (sum of squares in double) stays within 4 ulp of it, at 1 and 2 threads. The rolled,
    sign-folded rotary equals the rotate-half formula bit for bit, as the one-op kernel and in the eager form."""
    from dspark_ops.machine import at_threads
    from dspark_ops.models.layers import RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq
    gen = torch.Generator().manual_seed(seed)
    with at_threads(threads):
        for shape in [(1, 576), (3, 5, 64), (37, 96)]:
            x = torch.randn(shape, generator=gen) * 3
            norm = RMSNorm(shape[-1], 1e-5)
            with torch.no_grad():
                norm.weight.copy_(1 + 0.2 * torch.randn(shape[-1], generator=gen))
            textbook = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
            assert torch.equal(norm(x), textbook), shape                      # autograd on: the eager form
            with torch.no_grad():
                fused = norm(x)
                assert torch.equal(fused, dspark_ops.reference.rms_norm(x, norm.weight, 1e-5)), shape
                torch.testing.assert_close(fused, textbook, rtol=4 * 2.0 ** -23, atol=0)
                total = x + 0.5
                normed, summed = norm.add_forward(x, torch.full_like(x, 0.5))
                assert torch.equal(summed, total) and torch.equal(normed, norm(total)), shape
    with at_threads(threads), torch.no_grad():
        positions = torch.randint(0, 4096, (4, 7), generator=gen)
        inv_freq = rope_inv_freq(64, 10000.0, None)
        cos, signed_sin = rope_cos_sin(positions, inv_freq, torch.float32)
        freqs = positions.float().unsqueeze(-1) * inv_freq
        emb = torch.cat((freqs, freqs), -1)
        assert torch.equal(cos, emb.cos())
        x = torch.randn(4, 7, 12, 64, generator=gen)
        rotated = torch.cat((-x[..., 32:], x[..., :32]), -1)
        textbook = x * emb.cos().unsqueeze(-2) + rotated * emb.sin().unsqueeze(-2)
        assert torch.equal(apply_rope(x, cos, signed_sin), textbook)               # the one-op kernel
    with at_threads(threads):
        assert torch.equal(apply_rope(x.requires_grad_(), cos, signed_sin), textbook)  # the eager form


# --------------------------------------------------------------------------- bad input

def test_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LlamaModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaModel.from_pretrained(tmp_path)
    model = tiny_model()
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_hf()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        LlamaModel.from_pretrained(tmp_path)
    sd = hf_state(model)
    missing = dict(sd)
    del missing["model.layers.1.mlp.up_proj.weight"]
    save_safetensors(missing, tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="up_proj"):
        LlamaModel.from_pretrained(tmp_path)
    wrong = dict(sd, **{"model.norm.weight": torch.ones(31)})
    save_safetensors(wrong, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight.*shape"):
        LlamaModel.from_pretrained(tmp_path)
    save_safetensors(dict(sd, extra=torch.ones(2)), tmp_path / "model.safetensors")
    with pytest.raises(KeyError, match="unexpected.*extra"):
        LlamaModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(model.config.to_hf(), model_type="gpt2")))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        LlamaModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        LlamaModel.from_pretrained(tmp_path)


def test_bad_inputs():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 100\)"):
        model(torch.tensor([[1, 100]]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="input_ids is empty"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="hidden_layers"):
        model(torch.tensor([[1, 2]]), hidden_layers=[2])
    with pytest.raises(ValueError, match="positions must have shape"):
        model(torch.tensor([[1, 2]]), positions=torch.tensor([[0, 1, 2]]))
    paged = PagedAttention([], slot_mapping=torch.zeros(2, dtype=torch.long), ops=ref.ContractOps)
    with pytest.raises(ValueError, match="positions are required"):
        model(torch.tensor([1, 2]), kv=paged)
    cache = DenseKVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="capacity 4 exceeded"):
        model(torch.tensor([[1, 2, 3, 4, 5]]), kv=cache)
    with pytest.raises(ValueError, match="batch 1"):
        model(torch.tensor([[1], [2]]), kv=cache)
    with pytest.raises(ValueError, match="lengths"):
        cache.truncate([1])   # longer than what it holds (0)
    with pytest.raises(ValueError, match="multiple of"):
        tiny_config(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="dtype"):
        LlamaModel(tiny_config(), dtype="int8")
    with pytest.raises(ValueError, match="QK-norm"):
        tiny_config(qk_norm=True)    # a llama config cannot say qk_norm
    with pytest.raises(ValueError, match="model_type"):
        tiny_config(model_type="gemma")


# --------------------------------------------------------------------------- drafters

def tiny_drafter(target, *, layers=2, rank=6, conf=True, with_markov=True, block=4, seed=0, qk_norm=True,
                 block_context=False):
    backbone = LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": layers, "qk_norm": qk_norm,
                              "model_type": "qwen3" if qk_norm else "llama",
                              "qkv_bias": False, "o_bias": False})
    cfg = DSparkConfig(backbone=backbone, target_layer_ids=[-1, 0, 1], num_target_layers=2, block_size=block,
                       mask_token_id=VOCAB - 1, markov_rank=rank, enable_confidence_head=conf,
                       confidence_head_with_markov=with_markov, block_context=block_context)
    drafter = DSparkDrafter(cfg, target)
    randomize(drafter, seed)
    return drafter.eval()


@pytest.mark.parametrize("qk_norm,block_context", [(True, False), (False, False), (True, True)],
                         ids=["qknorm", "plain", "block_context"])
def test_dspark_block_matches_reference_and_training_path(qk_norm, block_context, seed):
    target = tiny_model("llama-gqa-tied", seed=seed)
    drafter = tiny_drafter(target, seed=seed + 1, qk_norm=qk_norm, block_context=block_context)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 1, (2, 12), generator=gen)
    anchors = torch.tensor([7, 4])
    with torch.no_grad():
        feats = target(ids, hidden_layers=[-1, 0, 1]).layer_hidden
        train = drafter.forward_train(ids, feats, torch.tensor([[7, 2], [4, 9]]))
        # Inference: context in two chunks through a dense cache (request 1 rolled back to its anchor).
        cache = DenseKVCache.for_model(drafter, 2, 20)
        drafter.extend_context(feats[:, :3], kv=cache)
        ctx = drafter.extend_context(feats[:, 3:7], kv=cache)
        cache.truncate(anchors)
        context = ctx[torch.arange(2), anchors - 4] if block_context else None   # the row before each anchor
        blk = drafter.draft_block(ids[torch.arange(2), anchors], kv=cache, context=context)
        assert cache.lengths.tolist() == anchors.tolist()    # the block is scratch
    sd = slots_state_dict(drafter.slots())
    for b, a in enumerate(anchors.tolist()):
        logits, hidden = ref.dspark_block(sd, drafter.config.backbone, target.embed_tokens.weight,
                                          target.lm_head_weight, feats[b, :a], int(ids[b, a]), 4, VOCAB - 1)
        torch.testing.assert_close(blk.logits[b].double(), logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(blk.hidden[b].double(), hidden, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(train.logits[b, 0].double(), logits, rtol=1e-4, atol=1e-4)
    # The second anchor of row 1 (position 9) through the training path equals the reference too.
    logits, _ = ref.dspark_block(sd, drafter.config.backbone, target.embed_tokens.weight, target.lm_head_weight,
                                 feats[1, :9], int(ids[1, 9]), 4, VOCAB - 1)
    torch.testing.assert_close(train.logits[1, 1].double(), logits, rtol=1e-4, atol=1e-4)
    if block_context:
        # A block anchored at position 0 has no context (its rows add nothing); a wrong-shaped or missing
        # context is refused, and a drafter without block_context takes none.
        at_zero = drafter.forward_train(ids, feats, torch.tensor([[0], [0]]))
        logits, _ = ref.dspark_block(sd, drafter.config.backbone, target.embed_tokens.weight, target.lm_head_weight,
                                     feats[0, :0], int(ids[0, 0]), 4, VOCAB - 1)
        torch.testing.assert_close(at_zero.logits[0, 0].double(), logits, rtol=1e-4, atol=1e-4)
        for bad in (None, context[:1], context[:, :-1]):
            with pytest.raises(ValueError, match="context must be"):
                drafter.draft_block(ids[torch.arange(2), anchors], kv=cache, context=bad)
        with pytest.raises(ValueError, match="only taken by a drafter with block_context"):
            tiny_drafter(target).draft_block(ids[torch.arange(2), anchors], kv=cache, context=context)


def test_drafter_from_target_equals_target_for_one_layer_block_one(seed):
    target = tiny_model("qwen3-qknorm-untied", layers=1, seed=seed)
    drafter = build_drafter_from_target(target, block_size=1)
    ids = torch.randint(0, VOCAB, (3, 10))
    with torch.no_grad():
        full = target(ids, hidden_layers=drafter.config.target_layer_ids)
        cache = DenseKVCache.for_model(drafter, 3, 16)
        drafter.extend_context(full.layer_hidden[:, :6], kv=cache)
        blk = drafter.draft_block(ids[:, 6], kv=cache)
    torch.testing.assert_close(blk.logits[:, 0], full.logits[:, 6], rtol=1e-4, atol=1e-4)


def test_drafter_from_target_shares_and_copies(seed):
    target = tiny_model(layers=2, seed=seed)
    drafter = build_drafter_from_target(target, num_layers=2, block_size=5, markov_rank=3, confidence_head=True,
                                        seed=seed)
    for mine, theirs in zip(drafter.layers, target.layers):
        for (n, p), (_, q) in zip(mine.named_parameters(), theirs.named_parameters()):
            assert torch.equal(p, q), n
    assert drafter.config.mask_token_id == 0 and drafter.markov_weights()[1].shape == (3, VOCAB)
    # The target is shared, not part of the drafter's parameters or checkpoint.
    assert not any(p is target.embed_tokens.weight for p in drafter.parameters())
    assert not any("embed" in k for k in drafter.slots())
    with pytest.raises(ValueError, match="num_layers"):
        build_drafter_from_target(target, num_layers=3)


def test_markov_and_confidence_heads(seed):
    target = tiny_model(seed=seed)
    drafter = tiny_drafter(target, rank=5, seed=seed)
    u = torch.randn(2, 4, VOCAB)
    h = torch.randn(2, 4, 32)
    prev = torch.randint(0, VOCAB, (2, 4))
    w1, w2 = drafter.markov_weights()
    assert w1.shape == (VOCAB, 5) and w2.shape == (5, VOCAB)
    with torch.no_grad():
        z = drafter.markov_logits(u, prev)
        c = drafter.confidence_logits(h, prev)
        w, b = drafter.confidence_weights()
    for i in range(2):
        for k in range(4):
            torch.testing.assert_close(z[i, k], u[i, k] + w1[prev[i, k]] @ w2)
            feats = torch.cat((h[i, k], w1[prev[i, k]]))
            torch.testing.assert_close(c[i, k], feats @ w + b)
    no_markov = tiny_drafter(target, rank=5, with_markov=False, seed=seed)
    with torch.no_grad():
        w, b = no_markov.confidence_weights()
        c = no_markov.confidence_logits(h, prev)
    assert w.shape == (37,) and torch.equal(w[32:], torch.zeros(5))
    torch.testing.assert_close(c, h @ w[:32] + b)
    dflash = tiny_drafter(target, rank=0, conf=False, with_markov=False)
    assert dflash.markov_weights() is None and dflash.confidence_weights() is None
    assert torch.equal(dflash.markov_logits(u, prev), u)
    with pytest.raises(ValueError, match="no confidence head"):
        dflash.confidence_logits(h, prev)


def test_drafter_training_gradients(seed):
    target = tiny_model(seed=seed)
    target.requires_grad_(False)
    drafter = tiny_drafter(target, seed=seed)
    drafter.train()
    ids = torch.randint(0, VOCAB - 1, (2, 10))
    feats = target(ids, hidden_layers=[-1, 0, 1]).layer_hidden
    out = drafter.forward_train(ids, feats, torch.tensor([[1, 5], [3, 8]]))
    prev = torch.randint(0, VOCAB, out.hidden.shape[:-1])
    loss = drafter.markov_logits(out.logits, prev).logsumexp(-1).mean() + \
        drafter.confidence_logits(out.hidden, prev).mean()
    loss.backward()
    assert all(p.grad is not None for p in drafter.parameters())
    assert target.embed_tokens.weight.grad is None


@pytest.mark.parametrize("kind", ["dspark", "dflash", "eagle3", "dspark_block_context"])
def test_drafter_save_load_roundtrip(tmp_path, kind, seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    ids = torch.randint(0, VOCAB - 1, (2, 9))
    if kind == "eagle3":
        drafter = tiny_eagle3(target, seed)
    else:
        dspark = kind.startswith("dspark")
        drafter = tiny_drafter(target, rank=6 if dspark else 0, conf=dspark, with_markov=dspark, seed=seed,
                               block_context=kind == "dspark_block_context")
    feats = target(ids, hidden_layers=drafter.config.target_layer_ids).layer_hidden.detach()
    drafter.save_pretrained(tmp_path)
    loaded = load_drafter(tmp_path, target)
    assert type(loaded) is type(drafter) and loaded.config == drafter.config
    with torch.no_grad():
        if kind == "eagle3":
            torch.testing.assert_close(loaded(ids, feats), drafter(ids, feats), rtol=0, atol=0)
        else:
            anchors = torch.tensor([[2, 6], [5, 7]])
            a, b = loaded.forward_train(ids, feats, anchors), drafter.forward_train(ids, feats, anchors)
            torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    bf16 = load_drafter(tmp_path, target, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def deepspec_folder(tmp_path, drafter, target, arch, extra):
    """Write ``drafter`` as DeepSpec would: target config + drafter keys, embedding/LM-head copies, W2 as [V, r]."""
    cfg = dict(target.config.to_hf(), architectures=[arch], num_hidden_layers=drafter.config.backbone.num_hidden_layers,
               tie_word_embeddings=False, layer_types=["full_attention"], num_anchors=512, **extra)
    sd = slots_state_dict(drafter.slots())
    sd["embed_tokens.weight"] = target.embed_tokens.weight.detach()
    sd["lm_head.weight"] = target.lm_head_weight.detach()
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_safetensors(sd, tmp_path / "model.safetensors")
    return sd


def test_load_deepspec_dspark_layout(tmp_path, seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    drafter = tiny_drafter(target, rank=6, seed=seed)
    sd = deepspec_folder(tmp_path, drafter, target, "Qwen3DSparkModel", dict(
        target_layer_ids=[-1, 0, 1], num_target_layers=2, block_size=4, mask_token_id=VOCAB - 1, markov_rank=6,
        markov_head_type="vanilla", enable_confidence_head=True, confidence_head_with_markov=True))
    assert sd["markov_head.markov_w2.weight"].shape == (VOCAB, 6)
    loaded = load_drafter(tmp_path, target)
    assert isinstance(loaded, DSparkDrafter) and loaded.config.backbone.qk_norm
    torch.testing.assert_close(loaded.markov_w2, drafter.markov_w2, rtol=0, atol=0)
    ids = torch.randint(0, VOCAB - 1, (1, 8))
    with torch.no_grad():
        feats = target(ids, hidden_layers=[-1, 0, 1]).layer_hidden
        a = loaded.forward_train(ids, feats, torch.tensor([[3]]))
        b = drafter.forward_train(ids, feats, torch.tensor([[3]]))
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, markov_head_type="gated")))
    with pytest.raises(NotImplementedError, match="gated"):
        load_drafter(tmp_path, target)
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, architectures=["Gemma4DSparkModel"])))
    with pytest.raises(ValueError, match="unknown drafter architecture 'Gemma4DSparkModel'"):
        load_drafter(tmp_path, target)


def test_load_deepspec_eagle3_layout(tmp_path, seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    drafter = tiny_eagle3(target, seed)
    deepspec_folder(tmp_path, drafter, target, "Qwen3Eagle3Model", dict(
        target_layer_ids=[0, 1], num_target_layers=2, ttt_length=7, step_loss_decay=0.8, draft_num_hidden_layers=1))
    loaded = load_drafter(tmp_path, target)
    assert isinstance(loaded, Eagle3Drafter) and loaded.config.ttt_length == 7
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        feats = target(ids, hidden_layers=[0, 1]).layer_hidden
        torch.testing.assert_close(loaded(ids, feats), drafter(ids, feats), rtol=0, atol=0)


def tiny_eagle3(target, seed, layer_ids=(0, 1)):
    backbone = LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": 1})
    drafter = Eagle3Drafter(Eagle3Config(backbone=backbone, target_layer_ids=list(layer_ids),
                                         num_target_layers=target.config.num_hidden_layers), target)
    randomize(drafter, seed)
    return drafter.eval()


def test_eagle3_matches_reference_and_cache(seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    drafter = tiny_eagle3(target, seed + 3)
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        feats = target(ids, hidden_layers=[0, 1]).layer_hidden
        full = drafter(ids, feats)
        cache = DenseKVCache.for_model(drafter, 2, 16)
        a = drafter(ids[:, :5], feats[:, :5], kv=cache)
        b = drafter(ids[:, 5:], feats[:, 5:], kv=cache)
        # Drafting from the drafter's own output: the last row fed back with from_target=False.
        nxt = drafter(ids[:, :1], full[:, -1:], kv=cache, from_target=False)
    torch.testing.assert_close(torch.cat((a, b), 1), full, rtol=1e-5, atol=1e-5)
    sd = slots_state_dict(drafter.slots())
    for r in range(2):
        torch.testing.assert_close(full[r].double(), ref.eagle3(sd, drafter.config.backbone, target.embed_tokens.weight,
                                                                feats[r], ids[r]), rtol=1e-4, atol=1e-4)
    assert nxt.shape == (2, 1, 32) and cache.lengths.tolist() == [10, 10]
    assert drafter.compute_logits(nxt).shape == (2, 1, VOCAB)


def test_drafter_mismatches(tmp_path):
    target = tiny_model()
    wide_cfg = LlamaConfig(**{**target.config.__dict__, "hidden_size": 48})
    with pytest.raises(ValueError, match="hidden_size 48 does not match the target's 32"):
        DSparkDrafter(DSparkConfig(backbone=wide_cfg, target_layer_ids=[0], num_target_layers=2), target)
    with pytest.raises(ValueError, match="vocab_size 99"):
        DSparkDrafter(DSparkConfig(backbone=LlamaConfig(**{**target.config.__dict__, "vocab_size": 99}),
                                   target_layer_ids=[0], num_target_layers=2), target)
    with pytest.raises(ValueError, match="3 layers"):
        DSparkDrafter(DSparkConfig(backbone=target.config, target_layer_ids=[0], num_target_layers=3), target)
    with pytest.raises(ValueError, match=r"target_layer_ids \[2\]"):
        Eagle3Drafter(Eagle3Config(backbone=target.config, target_layer_ids=[0, 2], num_target_layers=2), target)
    with pytest.raises(ValueError, match="strictly increasing"):
        DSparkDrafter(DSparkConfig(backbone=target.config, target_layer_ids=[1, 0], num_target_layers=2), target)
    with pytest.raises(ValueError, match="mask_token_id 100"):
        DSparkDrafter(DSparkConfig(backbone=target.config, target_layer_ids=[0], num_target_layers=2,
                                   mask_token_id=100), target)
    with pytest.raises(TypeError, match="LlamaModel"):
        DSparkDrafter(DSparkConfig(backbone=target.config, target_layer_ids=[0], num_target_layers=2), object())
    drafter = tiny_drafter(target)
    cache = DenseKVCache.for_model(drafter, 1, 16)
    with pytest.raises(ValueError, match="last dimension 96"):
        drafter.extend_context(torch.randn(1, 3, 64), kv=cache)
    with pytest.raises(ValueError, match="needs a cache"):
        drafter.draft_block(torch.tensor([3]), kv=None)
    with pytest.raises(ValueError, match="anchor_ids must lie"):
        drafter.draft_block(torch.tensor([VOCAB]), kv=cache)
    with pytest.raises(ValueError, match="must equal the DenseKVCache lengths"):
        drafter.draft_block(torch.tensor([3]), torch.tensor([5]), kv=cache)
    # A checkpoint saved for another target: loading reports the mismatch.
    drafter.save_pretrained(tmp_path)
    other = LlamaModel(tiny_config(hidden_size=48, num_attention_heads=4, head_dim=12))
    with pytest.raises(ValueError, match="hidden_size 32 does not match the target's 48"):
        load_drafter(tmp_path, other)
    # DeepSpec-style copies of the embedding that do not fit the target are rejected.
    sd = slots_state_dict(drafter.slots())
    save_safetensors(dict(sd, **{"embed_tokens.weight": torch.zeros(VOCAB, 16)}), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="embed_tokens.weight.*shape"):
        load_drafter(tmp_path, target)
    with pytest.raises(FileNotFoundError):
        load_drafter(tmp_path / "missing", target)


# --------------------------------------------------------------------------- paged backend

def _paged_ops():
    ops = [ref.ContractOps]
    if hasattr(dspark_ops, "draft_block_attention") and hasattr(dspark_ops, "append_kv"):
        ops.append(dspark_ops)
    return ops


class PagedSetup:
    """Shuffled pages for B requests; slots and page tables as the engine would build them."""

    def __init__(self, model, batch, page_size=4, pages_per_request=8, seed=0):
        num_layers, hkv, d = model.kv_cache_shape()
        num_pages = batch * pages_per_request + 3
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(num_pages, generator=gen)
        self.page_size = page_size
        self.page_table = perm[:batch * pages_per_request].view(batch, pages_per_request).to(torch.int32)
        self.caches = [(torch.full((num_pages, page_size, hkv, d), float("nan")),
                        torch.full((num_pages, page_size, hkv, d), float("nan"))) for _ in range(num_layers)]

    def slots(self, request, positions):
        pos = torch.as_tensor(positions)
        return self.page_table[request, pos // self.page_size].long() * self.page_size + pos % self.page_size

    def backend(self, ops, starts, counts, *, causal, seq_lens=None):
        slot = torch.cat([self.slots(b, torch.arange(s, s + n)) for b, (s, n) in enumerate(zip(starts, counts))])
        cu = torch.tensor([0] + list(counts)).cumsum(0).to(torch.int32)
        lens = torch.tensor([s + n for s, n in zip(starts, counts)], dtype=torch.int32) if seq_lens is None else seq_lens
        return PagedAttention(self.caches, slot_mapping=slot, page_table=self.page_table, seq_lens=lens,
                              cu_q_lens=cu, causal=causal, ops=ops), slot


@pytest.mark.parametrize("ops", _paged_ops(), ids=lambda o: getattr(o, "__name__", "ops"))
def test_paged_target_matches_dense(ops, seed):
    model = tiny_model("llama-gqa-tied", seed=seed)
    paged = PagedSetup(model, 3, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (5, 3, 7)]
    with torch.no_grad():
        backend, _ = paged.backend(ops, [0, 0, 0], [5, 3, 7], causal=True)
        flat = torch.cat(prompts)
        pos = torch.cat([torch.arange(len(p)) for p in prompts])
        got = model(flat, pos, kv=backend).logits
        want = torch.cat([model(p.view(1, -1)).logits[0] for p in prompts])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # A verification step: ragged causal blocks (one request verifies nothing new but its anchor).
        blocks = [torch.randint(0, VOCAB, (n,), generator=gen) for n in (2, 1, 4)]
        backend, _ = paged.backend(ops, [5, 3, 7], [2, 1, 4], causal=True)
        got = model(torch.cat(blocks), torch.cat([torch.arange(s, s + len(b)) for s, b in zip((5, 3, 7), blocks)]),
                    kv=backend).logits
        want = torch.cat([model(torch.cat((p, b)).view(1, -1)).logits[0, -len(b):] for p, b in zip(prompts, blocks)])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ops", _paged_ops(), ids=lambda o: getattr(o, "__name__", "ops"))
def test_paged_drafter_matches_dense(ops, seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    drafter = tiny_drafter(target, seed=seed)
    paged = PagedSetup(drafter, 2, seed=seed)
    ids = torch.randint(0, VOCAB - 1, (2, 10))
    ctx_lens = [6, 3]
    with torch.no_grad():
        feats = target(ids, hidden_layers=[-1, 0, 1]).layer_hidden
        backend, _ = paged.backend(ops, [0, 0], ctx_lens, causal=False)
        drafter.extend_context(torch.cat([feats[b, :n] for b, n in enumerate(ctx_lens)]),
                               torch.cat([torch.arange(n) for n in ctx_lens]), kv=backend)
        anchors = torch.tensor(ctx_lens)
        backend, _ = paged.backend(ops, ctx_lens, [4, 4], causal=False)
        got = drafter.draft_block(ids[torch.arange(2), anchors], anchors, kv=backend)
        for b, n in enumerate(ctx_lens):
            cache = DenseKVCache.for_model(drafter, 1, 16)
            drafter.extend_context(feats[b:b + 1, :n], kv=cache)
            want = drafter.draft_block(ids[b:b + 1, n], kv=cache)
            torch.testing.assert_close(got.logits[b], want.logits[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(got.hidden[b], want.hidden[0], rtol=1e-4, atol=1e-4)


def test_linear_impl_hook_sees_every_projection():
    model = tiny_model()
    drafter = tiny_drafter(model)
    seen = []

    def spy(x, w, b):
        seen.append(w)
        return torch.nn.functional.linear(x, w, b)

    model.set_linear_impl(spy)
    drafter.set_linear_impl(spy)
    with torch.no_grad():
        feats = model(torch.tensor([[1, 2, 3]]), hidden_layers=[-1, 0, 1]).layer_hidden
        cache = DenseKVCache.for_model(drafter, 1, 16)
        drafter.extend_context(feats, kv=cache)
        blk = drafter.draft_block(torch.tensor([3]), kv=cache)
        drafter.confidence_logits(blk.hidden, torch.tensor([[3, 4, 5, 6]]))
    matrices = {id(p) for n, p in list(model.named_parameters()) + list(drafter.named_parameters())
                if p.dim() == 2 and "markov" not in n}
    assert {id(w) for w in seen} == matrices


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_half_precision_matches_cpu(dtype, seed):
    target = tiny_model("qwen3-qknorm-untied", seed=seed)
    drafter = tiny_drafter(target, seed=seed)
    ids = torch.randint(0, VOCAB - 1, (2, 12))
    with torch.no_grad():
        want = target(ids, hidden_layers=[-1, 0, 1])
        want_blk = drafter.forward_train(ids, want.layer_hidden, torch.tensor([[8], [8]]))
        target.to("cuda", dtype)
        drafter.to("cuda", dtype)
        assert target.rotary.inv_freq.dtype == torch.float32
        cache = DenseKVCache.for_model(target, 2, 16)
        got = torch.cat([target(ids[:, :8].cuda(), kv=cache).logits, target(ids[:, 8:].cuda(), kv=cache).logits], 1)
        feats = target(ids.cuda(), hidden_layers=[-1, 0, 1]).layer_hidden
        dcache = DenseKVCache.for_model(drafter, 2, 16)
        drafter.extend_context(feats[:, :8], kv=dcache)
        blk = drafter.draft_block(ids[:, 8].cuda(), kv=dcache)
    tol = 0.1 if dtype == torch.bfloat16 else 0.03     # of the largest logit; bf16 keeps 8 mantissa bits
    assert (got.float().cpu() - want.logits).abs().max() < tol * want.logits.abs().max()
    assert (blk.logits.float().cpu() - want_blk.logits[:, 0]).abs().max() < tol * want_blk.logits.abs().max()
