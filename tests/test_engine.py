"""SpeculativeEngine: lossless greedy (token for token), lossless sampling (chi-square), continuous
batching, cache invariants, bad input."""
from __future__ import annotations

import pytest
import torch
from scipy import stats

from dspark_ops.engine import SamplingParams, SpeculativeEngine
from dspark_ops.models import DSparkConfig, DSparkDrafter, LlamaConfig, LlamaModel, build_drafter_from_target


def fresh_seed() -> int:
    return int(torch.randint(0, 2**31 - 1, ()).item())


def tiny_target(seed: int, vocab: int = 96, layers: int = 3, scale: float = 0.35) -> LlamaModel:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    return model.eval()


def random_drafter(target: LlamaModel, seed: int, *, rank: int, confidence: bool, block: int = 5) -> DSparkDrafter:
    tc = target.config
    backbone = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": 1})
    cfg = DSparkConfig(backbone=backbone, target_layer_ids=[-1, 0, tc.num_hidden_layers - 1],
                       num_target_layers=tc.num_hidden_layers, block_size=block, mask_token_id=tc.vocab_size - 1,
                       markov_rank=rank, enable_confidence_head=confidence, confidence_head_with_markov=rank > 0)
    return DSparkDrafter(cfg, target, seed=seed, init_std=0.2).eval()


def plain_greedy(target: LlamaModel, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation: full forward over the sequence each step (no cache)."""
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits = target(torch.tensor([seq])).logits[0, -1]
            seq.append(int(torch.argmax(logits)))
    return seq[len(prompt):]


def drafters(target, seed):
    return {
        "none": None,
        "self_copy": build_drafter_from_target(target, num_layers=2, block_size=6),
        "dflash_random": random_drafter(target, seed, rank=0, confidence=False),
        "dspark_random": random_drafter(target, seed, rank=8, confidence=True),
    }


@pytest.mark.parametrize("kind", ["none", "self_copy", "dflash_random", "dspark_random"])
def test_greedy_equals_target_greedy_batch1(kind):
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = drafters(target, seed)[kind]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 95, (11,), generator=gen).tolist()
    engine = SpeculativeEngine(target, drafter, max_batch=1, max_tokens=256)
    out = engine.generate([prompt], max_new_tokens=24)[0]
    assert out == plain_greedy(target, prompt, 24), f"seed {seed}"
    assert engine.target_cache.num_free_pages == engine.target_cache.num_pages


@pytest.mark.parametrize("scheduler", ["fixed", "sync", "async"])
def test_greedy_batch8_with_requests_joining_midway(scheduler):
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = random_drafter(target, seed, rank=8, confidence=True) if scheduler != "fixed" else \
        build_drafter_from_target(target, num_layers=1, block_size=4)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist()
               for n in torch.randint(1, 30, (10,), generator=gen)]
    budgets = [int(n) for n in torch.randint(1, 20, (10,), generator=gen)]
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=8, max_tokens=1024,
                               sps_table=torch.tensor([0.0] + [100.0 / (1 + 0.05 * b) for b in range(1, 80)]))
    ids = []
    for i in range(4):  # four first, the rest join while those run
        ids.append(engine.add_request(prompts[i], SamplingParams(max_new_tokens=budgets[i])))
    engine.step()
    engine.step()
    for i in range(4, 10):
        ids.append(engine.add_request(prompts[i], SamplingParams(max_new_tokens=budgets[i])))
    while engine.has_work:
        engine.step()
        for req in engine.running:  # cache invariant: K/V for every consumed token, nothing more
            assert engine.context_length(req.id) == len(req.prompt) + len(req.output) - 1
    for i, rid in enumerate(ids):
        assert engine.finished[rid].output == plain_greedy(target, prompts[i], budgets[i]), f"seed {seed}, request {i}"
    assert engine.target_cache.num_free_pages == engine.target_cache.num_pages
    assert engine.drafter_cache.num_free_pages == engine.drafter_cache.num_pages


def test_stop_tokens_and_streaming():
    seed = fresh_seed()
    target = tiny_target(seed)
    prompt = [3, 1, 4, 1, 5]
    full = plain_greedy(target, prompt, 16)
    stop = full[5]
    engine = SpeculativeEngine(target, build_drafter_from_target(target, num_layers=1, block_size=5))
    streamed = []
    for i, toks in engine.stream([prompt], max_new_tokens=16, stop_token_ids=[stop]):
        assert i == 0
        streamed.extend(toks)
    assert streamed == full[:full.index(stop) + 1]


@pytest.mark.parametrize("kind", ["dspark", "one_hot_drafts", "plain"])
@pytest.mark.parametrize("scheduler", ["fixed", "sync"])
def test_sampling_distribution_matches_target(kind, scheduler):
    """First three generated tokens at T = 1 follow the target's joint distribution (chi-square)."""
    if kind != "dspark" and scheduler != "fixed":
        pytest.skip("scheduler variants need the confidence head")
    seed = fresh_seed()
    V = 6
    target = tiny_target(seed, vocab=V, layers=2, scale=0.6)
    drafter = None if kind == "plain" else random_drafter(target, seed, rank=4 if kind == "dspark" else 0,
                                                          confidence=kind == "dspark", block=3)
    prompt = [1, 2]
    # exact joint of 3 tokens from the target
    with torch.no_grad():
        seqs = torch.cartesian_prod(*[torch.arange(V)] * 3)
        full = torch.cat([torch.tensor(prompt).expand(len(seqs), 2), seqs], 1)
        logp = torch.log_softmax(target(full).logits.double(), -1)
        joint = (logp[:, 1, :].gather(1, seqs[:, :1]) + logp[:, 2, :].gather(1, seqs[:, 1:2]) +
                 logp[:, 3, :].gather(1, seqs[:, 2:3])).exp().squeeze(1)
    N = 3000
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=256, max_tokens=N * 8,
                               sps_table=torch.tensor([0.0] + [100.0 / (1 + 0.1 * b) for b in range(1, 400)]))
    outs = engine.generate([prompt] * N, max_new_tokens=3, temperature=1.0, seed=seed)
    codes = torch.tensor([o[0] * V * V + o[1] * V + o[2] for o in outs])
    counts = torch.bincount(codes, minlength=V ** 3).double()
    keep = joint * N >= 5
    obs = torch.cat([counts[keep], counts[~keep].sum().reshape(1)])
    exp = torch.cat([joint[keep], joint[~keep].sum().reshape(1)]) * N
    p = stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue
    assert p > 1e-4, f"seed {seed}: p = {p}"


def test_bad_requests_raise_and_leave_others_running():
    target = tiny_target(1)
    engine = SpeculativeEngine(target, build_drafter_from_target(target, num_layers=1, block_size=4), max_tokens=128)
    good = engine.add_request([1, 2, 3], SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="prompt token ids"):
        engine.add_request([1, 96], SamplingParams())
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.add_request([1], SamplingParams(max_new_tokens=0))
    with pytest.raises(ValueError, match="KV cache"):
        engine.add_request([1] * 100, SamplingParams(max_new_tokens=300))
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request([1], SamplingParams(temperature=-1.0))
    while engine.has_work:
        engine.step()
    assert engine.finished[good].output == plain_greedy(target, [1, 2, 3], 8)


def test_mismatched_drafter_is_rejected():
    target = tiny_target(1)
    other = tiny_target(2, vocab=50)
    with pytest.raises(ValueError, match="vocab"):
        SpeculativeEngine(target, random_drafter(other, 0, rank=0, confidence=False).__class__(
            random_drafter(other, 0, rank=0, confidence=False).config, target))
    with pytest.raises(ValueError, match="confidence head"):
        SpeculativeEngine(target, random_drafter(target, 0, rank=0, confidence=False), scheduler="sync")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_engine_greedy_equals_target_greedy(dtype):
    seed = fresh_seed()
    target = tiny_target(seed).to("cuda", dtype)
    drafter = random_drafter(target, seed, rank=8, confidence=True).to("cuda", dtype)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist() for n in (5, 17, 9)]
    engine = SpeculativeEngine(target, drafter, scheduler="sync", max_batch=3, max_tokens=512,
                               sps_table=torch.tensor([0.0] + [100.0 / (1 + 0.05 * b) for b in range(1, 40)]))
    outs = engine.generate(prompts, max_new_tokens=16)
    plain = SpeculativeEngine(target, None, max_batch=3, max_tokens=512).generate(prompts, max_new_tokens=16)
    assert outs == plain, f"seed {seed}"
