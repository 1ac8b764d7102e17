"""SpeculativeEngine: lossless greedy (token for token), lossless sampling (chi-square), continuous
batching, cache invariants, bad input."""
from __future__ import annotations

import pytest
import torch

from dspark_ops.draft_vocab import DraftVocab
from dspark_ops.engine import SamplingParams, SpeculativeEngine
from dspark_ops.models import (DenseKVCache, DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter, LlamaConfig,
                               LlamaModel, build_drafter_from_target)
import model_reference
import verify_law
from dspark_ops.models.llama import slots_state_dict
from dspark_ops.proposers import Proposer, register_proposer
from randomness import CHI2_MIN_PVALUE, SequentialChi2, fresh_seed


def tiny_target(seed: int, vocab: int = 96, layers: int = 3, scale: float = 0.35, head_dim: int = 16) -> LlamaModel:
    """head_dim=64 for CUDA (its attention kernel takes head_dim 64, 96, 128 or 256)."""
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=4 * head_dim, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-5,
                      max_position_embeddings=512, tie_word_embeddings=True)
    model = LlamaModel(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if name.endswith("norm.weight") else scale * noise)
    return model.eval()


def random_drafter(target: LlamaModel, seed: int, *, rank: int, confidence: bool, block: int = 5,
                   block_context: bool = False, init_std: float = 0.2) -> DSparkDrafter:
    tc = target.config
    backbone = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": 1})
    cfg = DSparkConfig(backbone=backbone, target_layer_ids=[-1, 0, tc.num_hidden_layers - 1],
                       num_target_layers=tc.num_hidden_layers, block_size=block, mask_token_id=tc.vocab_size - 1,
                       markov_rank=rank, enable_confidence_head=confidence, confidence_head_with_markov=rank > 0,
                       block_context=block_context)
    return DSparkDrafter(cfg, target, seed=seed, init_std=init_std).eval()


def eagle_drafter(target: LlamaModel, seed: int, *, block: int = 5, init_std: float = 0.2) -> Eagle3Drafter:
    tc = target.config
    backbone = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": 1})
    cfg = Eagle3Config(backbone=backbone, target_layer_ids=[0, tc.num_hidden_layers - 1],
                       num_target_layers=tc.num_hidden_layers, ttt_length=block)
    return Eagle3Drafter(cfg, target, seed=seed, init_std=init_std).eval()


def with_draft_vocab(drafter, seed: int, size: int):
    """The drafter with a random draft vocabulary of ``size`` ids (its proposals are restricted to them)."""
    V = drafter.target.config.vocab_size
    ids = torch.randperm(V, generator=torch.Generator().manual_seed(seed))[:size]
    drafter.draft_vocab = DraftVocab(torch.sort(ids).values, V)
    return drafter


# Sampling settings that differ from request to request in one batch: plain, every filter, greedy.
SETTINGS = (dict(temperature=1.0), dict(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05),
            dict(temperature=1.3, top_p=0.8), dict(temperature=0.7, top_k=3, min_p=0.1), dict(temperature=0.0))


def sampled_law_test(engine: SpeculativeEngine, reference: LlamaModel, requests: int, tokens: int, seed: int,
                     settings=SETTINGS):
    """Runs ``requests`` requests in one engine (prompts of 1-4 random ids, ``settings`` in turn, a seed each) for
    ``tokens`` tokens, and checks every emitted token against the exact law the target gives it after its prefix,
    computed by ``reference`` (a copy of the target the engine never rewired) with verify_law.ideal_filter:
    greedy requests emit the argmax, no token of probability 0 is emitted, and the sampled tokens are returned as
    two SequentialChi2 against their laws: by id, and by rank in their law (the most likely id is rank 0), which
    sees biases that keep each id's overall frequency (drawing too greedily, or too flatly, in every context).
    Positions whose filter decisions lie within 0.1% of a threshold (the engine's logits differ from the
    reference's by rounding) are left out, by their prefix only."""
    V = reference.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, V, (int(torch.randint(1, 5, (), generator=gen)),), generator=gen).tolist()
               for _ in range(requests)]
    settings = [settings[i % len(settings)] for i in range(requests)]
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=tokens, seed=seed + i, **s))
           for i, (p, s) in enumerate(zip(prompts, settings))]
    while engine.has_work:
        engine.step()
    outputs = [engine.finished[i].output for i in ids]
    assert all(len(o) == tokens for o in outputs)
    width = max(map(len, prompts)) + tokens
    seqs = torch.zeros(requests, width, dtype=torch.long)
    for r, (p, o) in enumerate(zip(prompts, outputs)):
        seqs[r, :len(p) + tokens] = torch.tensor(p + o)
    with torch.no_grad():
        logits = torch.cat([reference(chunk).logits for chunk in seqs.split(256)])
    at = torch.tensor([len(p) - 1 for p in prompts]).unsqueeze(1) + torch.arange(tokens)   # position before each
    rows = logits[torch.arange(requests).unsqueeze(1), at].reshape(-1, V)
    param = {k: torch.tensor([s.get(k, d) for s in settings]).repeat_interleave(tokens)
             for k, d in (("temperature", 1.0), ("top_k", 0), ("top_p", 1.0), ("min_p", 0.0))}
    law, ambiguous = verify_law.ideal_filter(rows, **param, margin=2.0**-30, relative=1e-3)
    emitted = torch.tensor(outputs).reshape(-1)
    clear = ~ambiguous
    assert bool((law[clear, emitted[clear]] > 0).all()), f"seed {seed}: a token of probability 0 was emitted"
    greedy = param["temperature"] == 0
    assert bool((law[clear & greedy, emitted[clear & greedy]] == 1).all()), f"seed {seed}: greedy emitted another"
    sampled = clear & ~greedy
    assert int(ambiguous.sum()) < 0.05 * len(emitted)
    law, emitted = law[sampled], emitted[sampled]
    order = torch.sort(law, dim=1, descending=True, stable=True).indices
    rank = (order == emitted.unsqueeze(1)).int().argmax(1)
    return SequentialChi2(emitted, law), SequentialChi2(rank, law.gather(1, order))


def plain_greedy(target: LlamaModel, prompt: list[int], n: int) -> list[int]:
    """The target's own greedy continuation, from the float64 reference of model_reference.py over the weights
    read by their Hugging Face names: nothing of the engine's wiring (packed linear layers, paged attention, the
    fused layouts) is shared, so a bug there cannot hide in the reference too."""
    weights = slots_state_dict(target.hf_slots())
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model_reference.llama(weights, target.config, torch.tensor(seq))
            seq.append(int(torch.argmax(logits[-1])))
    return seq[len(prompt):]


def with_oracle_drafts(engine: SpeculativeEngine, prompts: dict[int, list[int]], greedy: dict[int, list[int]],
                       seed: int) -> SpeculativeEngine:
    """The engine with a random prefix of every drafted block replaced by the target's own greedy tokens
    (``greedy``: request id -> its plain greedy continuation, ``prompts``: request id -> prompt), so that greedy
    runs accept drafts at every block position whatever drafter runs (a random drafter's tokens are almost never
    the target's argmax); the drafter still runs and proposes the rest of each block. Positions come from the
    slots' device state, so the CUDA-graph code path on CPU is served too. Greedy decoding only (the
    distributions the drafter returned no longer match the tokens)."""
    gen = torch.Generator().manual_seed(seed)
    draft = engine._draft

    def oracle(s):
        drafts, probs, confidence = draft(s)
        for b, request in enumerate(engine.running[:drafts.shape[0]]):
            if request.id not in greedy:
                continue
            upcoming = greedy[request.id][int(s.start[b]) - len(prompts[request.id]) + 1:]
            n = min(int(torch.randint(0, drafts.shape[1] + 1, (), generator=gen)), len(upcoming))
            drafts[b, :n] = torch.tensor(upcoming[:n], dtype=drafts.dtype)
        return drafts, probs, confidence

    engine._draft = oracle
    return engine


def accepted(engine: SpeculativeEngine) -> int:
    """Drafts the engine accepted."""
    return sum(engine.stats.accepts)


def drafters(target, seed):
    return {
        "none": None,
        "self_copy": build_drafter_from_target(target, num_layers=2, block_size=6),
        "dflash_random": random_drafter(target, seed, rank=0, confidence=False),
        "dspark_random": random_drafter(target, seed, rank=8, confidence=True),
        "dspark_bf16_valued": bf16_valued(random_drafter(target, seed + 1, rank=8, confidence=True)),
        "eagle_random": eagle_drafter(target, seed),
        "dspark_draft_vocab": with_draft_vocab(random_drafter(target, seed, rank=8, confidence=True), seed, 40),
        "dspark_block_context": random_drafter(target, seed, rank=8, confidence=True, block_context=True),
        "eagle_draft_vocab": with_draft_vocab(eagle_drafter(target, seed), seed, 40),
    }


def bf16_valued(drafter: DSparkDrafter) -> DSparkDrafter:
    """The drafter with every weight rounded to a bfloat16 value (as when loaded from a bf16 checkpoint)."""
    with torch.no_grad():
        for p in drafter.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return drafter


@pytest.mark.parametrize("kind", ["none", "self_copy", "dflash_random", "dspark_random", "dspark_bf16_valued",
                                  "eagle_random", "dspark_draft_vocab", "eagle_draft_vocab", "dspark_block_context"])
def test_greedy_equals_target_greedy_batch1(kind):
    """Greedy output equals the target's own greedy output (an independent float64 reference), with blocks whose
    drafts are accepted in part (with_oracle_drafts): drafts were accepted, and every page returned."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = drafters(target, seed)[kind]
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 95, (11,), generator=gen).tolist()
    want = plain_greedy(target, prompt, 24)
    engine = SpeculativeEngine(target, drafter, max_batch=1, max_tokens=256)
    if drafter is not None:
        with_oracle_drafts(engine, {0: prompt}, {0: want}, seed)
    out = engine.generate([prompt], max_new_tokens=24)[0]
    assert out == want, f"seed {seed}"
    assert drafter is None or accepted(engine) > 0, f"seed {seed}: no draft was accepted"
    assert engine.target_cache.num_free_pages == engine.target_cache.num_pages
    if kind == "dspark_bf16_valued":   # bf16-valued weights are kept (exactly) in bf16: half the bytes to stream
        assert all(w.dtype == torch.bfloat16 for w in engine.proposer.markov)
    elif kind == "dspark_random":
        assert all(w.dtype == torch.float32 for w in engine.proposer.markov)


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
    want = [plain_greedy(target, p, n) for p, n in zip(prompts, budgets)]
    with_oracle_drafts(engine, dict(enumerate(prompts)), dict(enumerate(want)), seed)
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
        assert engine.finished[rid].output == want[i], f"seed {seed}, request {i}"
    assert accepted(engine) > 0, f"seed {seed}: no draft was accepted"
    assert engine.target_cache.num_free_pages == engine.target_cache.num_pages
    assert engine.drafter_cache.num_free_pages == engine.drafter_cache.num_pages


def test_stop_tokens_and_streaming():
    seed = fresh_seed()
    target = tiny_target(seed)
    prompt = [3, 1, 4, 1, 5]
    full = plain_greedy(target, prompt, 16)
    stop = full[5]
    engine = SpeculativeEngine(target, build_drafter_from_target(target, num_layers=1, block_size=5))
    with_oracle_drafts(engine, {0: prompt}, {0: full}, seed)
    streamed = []
    for i, toks in engine.stream([prompt], max_new_tokens=16, stop_token_ids=[stop]):
        assert i == 0
        streamed.extend(toks)
    assert streamed == full[:full.index(stop) + 1]
    assert accepted(engine) > 0


@pytest.mark.parametrize("kind", ["dspark", "eagle"])
def test_sampling_settings_and_stop_tokens_per_request_in_one_batch(kind):
    """Six requests in one batch, each with its own temperature (greedy ones among them), top-k, top-p, min-p,
    seed and stop tokens: every request's tokens are those it gets alone (a request's random numbers are its
    seed's and its step's, so a batch that read another row's settings or stop tokens fails), cut after its
    first stop token; greedy requests emit the target's greedy tokens."""
    seed = fresh_seed()
    target = tiny_target(seed, vocab=12, scale=0.2)
    drafter = eagle_drafter(target, seed, block=4) if kind == "eagle" else \
        random_drafter(target, seed, rank=4, confidence=True, block=4)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 12, (int(n),), generator=gen).tolist() for n in (3, 9, 5, 12, 1, 7)]
    settings = [dict(temperature=0.0), dict(temperature=1.0, top_k=3), dict(temperature=0.7, top_p=0.8),
                dict(temperature=1.2, min_p=0.2), dict(temperature=0.0), dict(temperature=0.9, top_k=5, top_p=0.9,
                                                                               min_p=0.05)]

    def run(batch, stops):
        engine = SpeculativeEngine(target, drafter, max_batch=6, max_tokens=6 * 64)
        ids = [engine.add_request(prompts[i], SamplingParams(max_new_tokens=24, seed=seed + i,
                                                             stop_token_ids=stops.get(i, ()), **settings[i]))
               for i in batch]
        while engine.has_work:
            engine.step()
        return [engine.finished[r].output for r in ids]

    alone = [run([i], {})[0] for i in range(6)]
    for i in (0, 4):
        assert alone[i] == plain_greedy(target, prompts[i], 24), f"seed {seed}, request {i}"
    stops = {i: (alone[i][6 + i], alone[(i + 1) % 6][3]) for i in range(6)}   # each request its own stop tokens
    together = run(range(6), stops)
    for i in range(6):
        first = min(alone[i].index(t) for t in stops[i] if t in alone[i])
        assert together[i] == alone[i][:first + 1], f"seed {seed}, request {i}"
    assert len({tuple(o) for o in alone}) == 6


@pytest.mark.parametrize("graph_path", [False, True])
@pytest.mark.parametrize("kind,scheduler", [("dspark", "fixed"), ("dspark", "sync"), ("dspark", "async"),
                                            ("one_hot_drafts", "fixed"), ("plain", "fixed"), ("eagle", "fixed"),
                                            ("dspark_draft_vocab", "sync"), ("eagle_draft_vocab", "fixed")])
def test_sampling_distribution_matches_target(kind, scheduler, graph_path):
    """256 requests in one engine, each with its own sampling settings (SETTINGS: plain, every filter, greedy), 16
    tokens each: every token follows the target's exact law after its prefix (sampled_law_test), eagerly and along
    the CUDA-graph code path (see graph_path_on_cpu); the confidence schedulers need DSpark's confidence head. With
    a draft vocabulary of half the ids, the other half is only ever emitted by verify's residual resampling.
    Sequential chi-squares by id and by rank over about 3200 sampled tokens: false alarm < 2e-6; each detects with
    probability 0.99 a bias that emits one id (one rank) instead of another for 6% of the tokens, for any two
    (asserted from the run's laws; 5% typically)."""
    seed = fresh_seed()
    V = 8
    target, reference = (tiny_target(seed, vocab=V, layers=2, scale=0.1) for _ in range(2))
    if kind.startswith("eagle"):
        drafter = eagle_drafter(target, seed, block=3, init_std=0.5)
    else:
        dspark = kind.startswith("dspark")
        drafter = None if kind == "plain" else random_drafter(target, seed, rank=4 if dspark else 0,
                                                              confidence=dspark, block=3)
    if kind.endswith("draft_vocab"):
        with_draft_vocab(drafter, seed, V // 2)
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=256, max_tokens=256 * 24,
                               sps_table=torch.tensor([0.0] + [100.0 / (1 + 0.1 * b) for b in range(1, 400)]))
    if graph_path:
        graph_path_on_cpu(engine)
    for chi in sampled_law_test(engine, reference, 256, 16, seed):
        assert chi.pvalue() > CHI2_MIN_PVALUE, f"seed {seed}: p = {chi.pvalue()}"
        assert chi.power(0.06) > 0.99, f"seed {seed}"


@pytest.mark.slow
def test_sampling_distribution_detects_a_bias_of_0_01():
    """The DSpark engine (Markov-head drafts verified with their distributions), 3072 requests of 40 tokens with
    sampling settings that differ per request (temperatures, top-k, top-p, min-p): every token, at each of the 40
    positions, follows the target's exact law after its prefix. Sequential chi-squares by id and by rank over
    about 120000 tokens: false alarm < 2e-6; each detects with probability 0.99 a bias that emits one id (one
    rank: e.g. the most likely id instead of the second) instead of another for 1% of the tokens, for any two
    (asserted from the run's laws; 0.8% typically). About a minute on 2 cores."""
    seed = fresh_seed()
    V = 8
    target, reference = (tiny_target(seed, vocab=V, layers=2, scale=0.1) for _ in range(2))
    drafter = random_drafter(target, seed, rank=4, confidence=True, block=3)
    engine = SpeculativeEngine(target, drafter, max_batch=1024, max_tokens=1024 * 52)
    for chi in sampled_law_test(engine, reference, 3072, 40, seed, settings=SETTINGS[:4]):
        assert chi.pvalue() > CHI2_MIN_PVALUE, f"seed {seed}: p = {chi.pvalue()}"
        assert chi.power(0.01) > 0.99, f"seed {seed}"


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


class RepeatDrafter:
    """A drafting method from outside the package: every draft repeats the anchor (one-hot drafts)."""

    def __init__(self, block_size: int):
        self.block_size = block_size


class RepeatProposer(Proposer):
    def __init__(self, target, drafter: RepeatDrafter, *, block_size: int | None, draft_vocab: bool):
        self.block_size = block_size or drafter.block_size

    def propose(self, s):
        drafts = s.anchor.to(torch.int32).unsqueeze(1).expand(-1, self.block_size).contiguous()
        return drafts, None, None   # verify takes None as one-hot draft distributions


@pytest.mark.parametrize("graph_path", [False, True])
def test_a_drafting_method_plugs_in_without_touching_the_engine(graph_path):
    """A Proposer registered for its drafter class drives the engine like the built-in ones: greedy output
    equals the target's own (drafts accepted in part, with_oracle_drafts), sampled output follows the
    target's law (sampled_law_test), every step drafts, and every page comes back."""
    register_proposer(RepeatDrafter, RepeatProposer)
    seed = fresh_seed()
    target, reference = (tiny_target(seed, vocab=8, layers=2, scale=0.1) for _ in range(2))
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 8, (n,), generator=gen).tolist() for n in (5, 2, 9)]
    want = [plain_greedy(target, p, 20) for p in prompts]
    engine = SpeculativeEngine(target, RepeatDrafter(4), max_batch=4, max_tokens=256)
    if graph_path:
        graph_path_on_cpu(engine)
    with_oracle_drafts(engine, dict(enumerate(prompts)), dict(enumerate(want)), seed)
    assert engine.generate(prompts, 20) == want, f"seed {seed}"
    assert accepted(engine) > 0 and engine.stats.drafting_steps == engine.stats.steps > 0, f"seed {seed}"
    assert engine.target_cache.num_free_pages == engine.target_cache.num_pages - graph_path   # the padding page
    engine = SpeculativeEngine(target, RepeatDrafter(3), max_batch=128, max_tokens=128 * 24)
    if graph_path:
        graph_path_on_cpu(engine)
    for chi in sampled_law_test(engine, reference, 128, 16, seed):
        assert chi.pvalue() > CHI2_MIN_PVALUE, f"seed {seed}: p = {chi.pvalue()}"
    with pytest.raises(TypeError, match="drafter must be one of DSparkDrafter, Eagle3Drafter"):
        SpeculativeEngine(target, object())


CUDA_SPS = torch.tensor([0.0] + [100.0 / (1 + 0.05 * b) for b in range(1, 40)])
# Speculative and plain bf16 decoding run the target over different row counts (a verify block against one
# row), so their GEMMs round differently and two logits within a few bf16 roundings of each other may swap
# places: a documented, legitimate flip. At the first token where the outputs part, the two tokens' fp32
# logits (the same bf16 weights, upcast) must lie within NEAR_TIE_ULPS bf16 roundings of the larger logit.
NEAR_TIE_ULPS = 8


def cuda_engines(target, drafter, prompts, n: int):
    """(plain, speculative) greedy outputs of the engine over ``prompts``."""
    plain = SpeculativeEngine(target, None, max_batch=3, max_tokens=512).generate(prompts, max_new_tokens=n)
    spec = SpeculativeEngine(target, drafter, scheduler="sync", max_batch=3, max_tokens=512,
                             sps_table=CUDA_SPS).generate(prompts, max_new_tokens=n)
    return plain, spec


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_engine_fp32_equals_cpu_engine_token_for_token():
    """The same fp32 weights on the CPU and the GPU give the same greedy tokens, plain and speculative (the two
    devices only sum in other orders: fp32 leaves no near-ties at this model's logit spread)."""
    import copy

    seed = fresh_seed()
    target = tiny_target(seed, head_dim=64, scale=0.2)
    drafter = random_drafter(target, seed, rank=8, confidence=True)
    gpu_target, gpu_drafter = copy.deepcopy((target, drafter))   # before the CPU engine packs its weights
    gpu_target.to("cuda"), gpu_drafter.to("cuda")
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist() for n in (5, 17, 9)]
    cpu_plain, cpu_spec = cuda_engines(target, drafter, prompts, 24)
    gpu_plain, gpu_spec = cuda_engines(gpu_target, gpu_drafter, prompts, 24)
    assert cpu_spec == cpu_plain, f"seed {seed}"
    assert gpu_plain == cpu_plain, f"seed {seed}: plain decoding, CUDA vs CPU"
    assert gpu_spec == cpu_plain, f"seed {seed}: speculative decoding, CUDA vs CPU"
    # Eagerly on the GPU (the splice runs on the host at every step), with drafts accepted in part.
    eager = SpeculativeEngine(gpu_target, gpu_drafter, scheduler="sync", max_batch=3, max_tokens=512,
                              sps_table=CUDA_SPS, cuda_graphs=False)
    with_oracle_drafts(eager, dict(enumerate(prompts)), dict(enumerate(cpu_plain)), seed)
    assert eager.generate(prompts, max_new_tokens=24) == cpu_plain, f"seed {seed}"
    assert accepted(eager) > 0, f"seed {seed}: no draft was accepted"


def near_tie_margin(fp32_target, prompt: list[int], a: list[int], b: list[int]) -> tuple[int, float, float] | None:
    """Where a and b (two continuations of prompt) first differ: (index, |logit a - logit b|, the larger |logit|)
    from one fp32 forward over the prompt and the common prefix; None when they agree."""
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if i is None:
        assert len(a) == len(b)
        return None
    with torch.no_grad():
        logits = fp32_target(torch.tensor([prompt + a[:i]])).logits[0, -1].double()
    la, lb = float(logits[a[i]]), float(logits[b[i]])
    return i, abs(la - lb), max(abs(la), abs(lb))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_speculative_equals_bf16_greedy_up_to_near_ties():
    """bf16 on the GPU: speculative decoding gives the target's own bf16 greedy tokens, except that at the
    first token where they part the two tokens are a near-tie (NEAR_TIE_ULPS): a wrong verify, attention or
    cache would part them at a clear margin."""
    import copy

    seed = fresh_seed()
    base = tiny_target(seed, head_dim=64, scale=0.2)
    fp32_target = copy.deepcopy(base).to(torch.bfloat16).float().eval()   # the bf16 weights, upcast
    target = base.to("cuda", torch.bfloat16)
    drafter = random_drafter(target, seed, rank=8, confidence=True).to("cuda", torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist() for n in (5, 17, 9)]
    plain, spec = cuda_engines(target, drafter, prompts, 24)
    for prompt, p, s in zip(prompts, plain, spec):
        found = near_tie_margin(fp32_target, prompt, p, s)
        if found is not None:
            i, margin, scale = found
            assert margin <= NEAR_TIE_ULPS * 2.0 ** -8 * max(scale, 1.0), (
                f"seed {seed}: token {i} differs ({p[i]} plain, {s[i]} speculative) at a logit margin of {margin:.4g}")


def greedy_reference_steps(target: LlamaModel, drafter, prompt: list[int], n: int, block: int, propose):
    """Greedy drafting + verification at batch 1 on dense caches, written out step by step: (output, the
    drafts of each step, how many of them were accepted). ``propose(dcache, feats, followers, g)`` gives g
    drafts from the drafter's cache and the new target rows ``feats`` [1, T, m*d], each followed by the
    token in ``followers`` [T]."""
    layers = drafter.config.target_layer_ids
    cap = len(prompt) + n + block + 2
    tcache, dcache = DenseKVCache.for_model(target, 1, cap), DenseKVCache.for_model(drafter, 1, cap)
    with torch.no_grad():
        out = target(torch.tensor([prompt]), kv=tcache, hidden_layers=layers)
        output = [int(out.logits[0, -1].argmax())]
        feats, followers, rounds, accepted = out.layer_hidden, prompt[1:] + output, [], []
        while len(output) < n:
            g = min(block, n - len(output) - 1)
            drafts = propose(dcache, feats, followers, g)
            rounds.append(drafts)
            vout = target(torch.tensor([[output[-1]] + drafts]), kv=tcache, hidden_layers=layers)
            greedy = vout.logits[0].argmax(-1).tolist()
            a = next((j for j in range(g) if drafts[j] != greedy[j]), g)
            accepted.append(a)
            tcache.truncate([int(tcache.lengths[0]) - g + a])
            new = drafts[:a] + [greedy[a]]
            output.extend(new)
            feats, followers = vout.layer_hidden[:, :a + 1], new
    return output[:n], rounds, accepted


def eagle_proposer(drafter: Eagle3Drafter):
    """EAGLE-3: the new rows (paired with the token after each) extend the cache; each further draft feeds
    the previous output with the token just drafted, in scratch rows past the context."""
    def propose(dcache, feats, followers, g):
        start = int(dcache.lengths[0])
        h = drafter(torch.tensor([followers]), feats, kv=dcache)[:, -1:]
        drafts = []
        for j in range(g):
            drafts.append(int(drafter.compute_logits(h)[0, 0].argmax()))
            if j + 1 < g:
                h = drafter(torch.tensor([[drafts[-1]]]), h, kv=dcache, from_target=False)
        dcache.truncate([start + len(followers)])
        return drafts
    return propose


def dspark_proposer(drafter: DSparkDrafter):
    """DSpark: the new rows extend the context; one parallel block from the anchor (with block_context, also
    from the context of the row before it), then the Markov head left to right."""
    def propose(dcache, feats, followers, g):
        ctx = drafter.extend_context(feats, kv=dcache)
        context = ctx[:, -1] if drafter.config.block_context else None
        blk = drafter.draft_block(torch.tensor([followers[-1]]), kv=dcache, context=context)
        drafts, prev = [], followers[-1]
        for k in range(g):
            prev = int(drafter.markov_logits(blk.logits[0, k], torch.tensor(prev)).argmax())
            drafts.append(prev)
        return drafts
    return propose


@pytest.mark.parametrize("kind", ["eagle", "dspark", "dspark_block_context"])
def test_drafts_match_reference_drafting(kind):
    """The engine drafts exactly as the step-by-step reference (the same drafts every step), four requests of
    different lengths sharing the batch. With block_context, each block reads the context of the position
    before its anchor, which the engine carries from prefill and from each verify step."""
    seed = fresh_seed()
    target = tiny_target(seed, vocab=6, scale=0.5)
    if kind == "eagle":   # large weights: drafts react to every input
        drafter, proposer = eagle_drafter(target, seed, block=4, init_std=1.0), eagle_proposer
    else:
        drafter = random_drafter(target, seed, rank=4, confidence=False, block=4,
                                 block_context=kind == "dspark_block_context", init_std=1.0)
        proposer = dspark_proposer
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 6, (n,), generator=gen).tolist() for n in (9, 3, 14, 6)]
    engine = SpeculativeEngine(target, drafter, max_batch=4, max_tokens=256)
    drafted, draft = {}, engine._draft

    def recording_draft(s):   # slot b drafts for engine.running[b]
        out = draft(s)
        for b, request in enumerate(engine.running[:s.anchor.shape[0]]):
            drafted.setdefault(request.id, []).append(out[0][b].tolist())
        return out

    engine._draft = recording_draft
    outs = engine.generate(prompts, max_new_tokens=64)
    for i, prompt in enumerate(prompts):
        ref, rounds, accepted = greedy_reference_steps(target, drafter, prompt, 64, 4, proposer(drafter))
        assert outs[i] == ref == plain_greedy(target, prompt, 64), f"seed {seed}, request {i}"
        st = engine.finished[i].stats
        assert st.rounds == len(rounds), f"seed {seed}, request {i}"
        got = [d[:len(r)] for d, r in zip(drafted[i], rounds)]
        assert got == rounds, f"seed {seed}, request {i}: drafts {got} vs reference {rounds}"
        want = [sum(a > j for a in accepted) for j in range(len(st.accepts))]
        assert st.accepts == want, f"seed {seed}, request {i}: accepts {st.accepts} vs reference {want}"


@pytest.mark.parametrize("kind", ["eagle", "dspark", "dspark_block_context", "dspark_async"])
def test_draft_max_batch_decodes_plainly_past_it_and_drafts_from_the_whole_context(kind):
    """With draft_max_batch=2 the engine drafts nothing while 3 or 4 requests run; as they finish, drafting
    resumes, and every draft equals fresh drafting from the request's whole sequence (the drafter read the
    tokens of the plain steps too). Greedy output equals plain decoding throughout."""
    seed = fresh_seed()
    target = tiny_target(seed, vocab=6, scale=0.5)
    scheduler = "async" if kind == "dspark_async" else "fixed"
    if kind == "eagle":
        drafter, proposer = eagle_drafter(target, seed, block=4, init_std=1.0), eagle_proposer
    else:
        drafter = random_drafter(target, seed, rank=4, confidence=scheduler != "fixed", block=4,
                                 block_context=kind == "dspark_block_context", init_std=1.0)
        proposer = dspark_proposer
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 6, (n,), generator=gen).tolist() for n in (9, 3, 14, 6)]
    budgets = [8, 20, 40, 64]
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=4, max_tokens=256,
                               draft_max_batch=2, sps_table=torch.tensor([0.0] + [100.0] * 40))
    drafted, draft = [], engine._draft

    def recording_draft(s):
        out = draft(s)
        assert s.anchor.shape[0] <= 2, "drafted for a batch past draft_max_batch"
        for b, request in enumerate(engine.running[:s.anchor.shape[0]]):
            drafted.append((request.id, len(request.output), out[0][b].tolist()))
        return out

    engine._draft = recording_draft
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n)) for p, n in zip(prompts, budgets)]
    while engine.has_work:
        engine.step()
    for i, prompt, n in zip(ids, prompts, budgets):
        assert engine.finished[i].output == plain_greedy(target, prompt, n), f"seed {seed}, request {i}"
    assert len({i for i, _, _ in drafted}) >= 2 and len(drafted) >= 10, drafted
    for i, emitted, drafts in drafted:
        seq = prompts[i] + engine.finished[i].output[:emitted]
        with torch.no_grad():
            feats = target(torch.tensor([seq[:-1]]), hidden_layers=drafter.config.target_layer_ids).layer_hidden
            want = proposer(drafter)(DenseKVCache.for_model(drafter, 1, len(seq) + 8), feats, seq[1:], 4)
        assert drafts == want, f"seed {seed}, request {i} after {emitted} tokens: {drafts} vs {want}"
    with pytest.raises(ValueError, match="draft_max_batch"):
        SpeculativeEngine(target, drafter, draft_max_batch=0)
    with pytest.raises(ValueError, match="draft_max_batch"):
        SpeculativeEngine(target, None, draft_max_batch=2)


def _run_joining(engine: SpeculativeEngine, prompts, budgets, temperature: float) -> list[list[int]]:
    """Two requests first, the rest join after two steps (the batch bucket changes as they come and go)."""
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=temperature, seed=7 + i))
           for i, (p, n) in enumerate(zip(prompts[:2], budgets[:2]))]
    engine.step()
    engine.step()
    ids += [engine.add_request(p, SamplingParams(max_new_tokens=n, temperature=temperature, seed=9 + i))
            for i, (p, n) in enumerate(zip(prompts[2:], budgets[2:]))]
    while engine.has_work:
        engine.step()
    return [engine.finished[i].output for i in ids]


class _ReplayEagerly:
    """Stands in for a captured CUDA graph on CPU: replay runs the step again into the same output buffer."""

    def __init__(self, engine: SpeculativeEngine, B: int, drafting: bool):
        self.engine, self.B, self.drafting = engine, B, drafting
        self.packed = torch.full((B, engine.block_size + 3), -7, dtype=torch.int32)

    def replay(self):
        self.packed.copy_(self.engine._decode(self.B, self.drafting))


def graph_path_on_cpu(engine: SpeculativeEngine) -> SpeculativeEngine:
    """Run the CUDA-graph code path on CPU: fixed-shape blocks, padded buckets, results read one step late."""
    engine.fixed_shapes, engine._lag, engine.cuda_graphs = True, 1, True
    engine.policy.fixed_shapes = True
    if not engine._pad_pages:
        engine._pad_pages = engine.pages.padding()
        engine.slots.freeze(0, engine._pad_pages)

    def capture(B, drafting):
        engine.graphs.warm_up(B, drafting)   # as the real capture does: must leave no trace
        graph = _ReplayEagerly(engine, B, drafting)
        return graph, graph.packed

    engine.graphs.capture = capture
    return engine


def graph_case(kind: str, target: LlamaModel, seed: int):
    """(drafter, scheduler, other engine arguments) of a graph-path test case."""
    if kind == "none":
        return None, "fixed", {}
    if kind == "eagle":
        return eagle_drafter(target, seed, block=4), "fixed", {}
    if kind == "eagle_draft_vocab":
        return with_draft_vocab(eagle_drafter(target, seed, block=4), seed, 40), "fixed", {}
    if kind == "dspark_draft_vocab":
        return with_draft_vocab(random_drafter(target, seed, rank=8, confidence=True), seed, 40), "fixed", {}
    if kind == "dspark_block_context":
        return random_drafter(target, seed, rank=8, confidence=True, block_context=True), "fixed", {}
    if kind == "dspark_draft_max_batch":   # bucket 4 decodes plainly, buckets 1 and 2 draft
        return random_drafter(target, seed, rank=8, confidence=True), "fixed", dict(draft_max_batch=2)
    if kind == "dspark_draft_auto":        # the step costs profiled over each bucket's graphs
        return random_drafter(target, seed, rank=8, confidence=True), "sync", dict(draft_max_batch="auto")
    return random_drafter(target, seed, rank=8, confidence=True), kind.removeprefix("dspark_"), {}


@pytest.mark.parametrize("kind", ["none", "dspark_sync", "dspark_async", "eagle", "dspark_draft_vocab",
                                  "eagle_draft_vocab", "dspark_block_context", "dspark_draft_max_batch",
                                  "dspark_draft_auto"])
def test_graph_code_path_on_cpu(kind):
    """The step as the CUDA-graph path runs it (fixed shapes, padding slots, one-step-late results, requests
    joining and leaving across buckets) gives the eager engine's tokens: greedy always, sampled too where the
    verify lengths do not depend on the batch (the confidence schedulers plan over the whole padded batch,
    and draft_max_batch decides on the batch, which the one-step-late results keep larger for a step, so
    their sampled tokens may differ, losslessly)."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter, scheduler, kw = graph_case(kind, target, seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist() for n in (5, 17, 9, 30, 2, 11)]
    budgets = [12, 20, 7, 16, 1, 9]
    sps = torch.tensor([0.0] + [100.0 / (1 + 0.05 * b) for b in range(1, 60)])

    def engine(d):
        return SpeculativeEngine(target, d, scheduler=scheduler if d is not None else "fixed", max_batch=4,
                                 max_tokens=512, sps_table=sps, **(kw if d is not None else {}))

    want = [plain_greedy(target, p, n) for p, n in zip(prompts, budgets)]
    for temperature in (0.0, 1.0) if scheduler == "fixed" and not kw else (0.0,):
        graphed, eager = graph_path_on_cpu(engine(drafter)), engine(drafter)
        if temperature == 0.0 and drafter is not None:   # drafts accepted in part, on both paths
            for e in (graphed, eager):
                with_oracle_drafts(e, dict(enumerate(prompts)), dict(enumerate(want)), seed)
        out = _run_joining(graphed, prompts, budgets, temperature)
        assert out == _run_joining(eager, prompts, budgets, temperature), f"seed {seed}, T {temperature}"
        assert {b for b, _ in graphed.graphs.graphs} <= {1, 2, 4} and len(graphed.graphs.graphs) >= 2
        pad = graphed.target_cache.num_pages - graphed.target_cache.num_free_pages
        assert pad == 1, "only the padding page stays reserved"
        if temperature == 0.0:
            assert out == want, f"seed {seed}"
            assert drafter is None or accepted(graphed) > 0, f"seed {seed}: no draft was accepted"

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["none", "dspark_sync", "dspark_async", "eagle", "dspark_draft_vocab",
                                  "eagle_draft_vocab", "dspark_block_context", "dspark_draft_max_batch",
                                  "dspark_draft_auto"])
def test_cuda_graph_replay_equals_eager(kind):
    """The captured decode step gives the same tokens as the same step run eagerly (greedy; sampled too with the
    fixed scheduler, see test_graph_code_path_on_cpu), greedy equals plain decoding, and each batch bucket is
    captured once."""
    seed = fresh_seed()
    target = tiny_target(seed, head_dim=64, scale=0.2).to("cuda")
    drafter, scheduler, kw = graph_case(kind, target, seed)
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 95, (int(n),), generator=gen).tolist() for n in (5, 17, 9, 30, 2)]
    budgets = [12, 20, 7, 16, 1]
    sps = torch.tensor([0.0] + [100.0 / (1 + 0.05 * b) for b in range(1, 60)])

    def engine(d, graphs):
        return SpeculativeEngine(target, d, scheduler=scheduler if d is not None else "fixed", max_batch=4,
                                 max_tokens=512, sps_table=sps, cuda_graphs=graphs, **(kw if d is not None else {}))

    plain = _run_joining(engine(None, False), prompts, budgets, 0.0)
    for temperature in (0.0, 1.0) if scheduler == "fixed" else (0.0,):
        graphed = engine(drafter, True)
        out = _run_joining(graphed, prompts, budgets, temperature)
        eager = _run_joining(engine(drafter, False), prompts, budgets, temperature)
        assert out == eager, f"seed {seed}, T {temperature}"
        assert {b for b, _ in graphed.graphs.graphs} <= {1, 2, 4}
        assert graphed.target_cache.num_free_pages == graphed.target_cache.num_pages - 1   # the padding page
        if temperature == 0.0:
            assert out == plain, f"seed {seed}"
