"""verify: agreement with the reference, losslessness (exact enumeration + chi-square), greedy,
determinism, edge cases, bad input, torch.compile, CUDA parity and graph replay."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import dspark_ops
import verify_law
from dspark_ops import reference
from dspark_ops.reference import numerics
from cuda_graphs import capture
from randomness import CHI2_MIN_PVALUE, chi2_pvalue, fresh_seed

FLOATS = [torch.float32, torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def random_problem(B, K, V, *, gen, dtype=torch.float32, probs=True, scale=2.0):
    logits = (torch.randn(B, K + 1, V, generator=gen) * scale).to(dtype)
    q = torch.softmax(torch.randn(B, K, V, generator=gen) * scale, -1) if probs else None
    drafts = torch.randint(0, V, (B, K), generator=gen)
    if probs:  # draft from q, as a drafter would
        drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    return logits, drafts, q


FILTERS = [
    {},
    {"temperature": 0.0},
    {"temperature": 0.7},
    {"top_k": 3},
    {"top_p": 0.6},
    {"min_p": 0.15},
    {"temperature": 1.3, "top_k": 5, "top_p": 0.8, "min_p": 0.02},
]


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("probs", [True, False], ids=["draft_probs", "one_hot"])
def test_matches_reference(filters, probs):
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 24, 4, 37
    logits, drafts, q = random_problem(B, K, V, gen=gen, probs=probs)
    num_draft = torch.randint(0, K + 1, (B,), generator=gen)
    seeds = torch.randint(0, 2**62, (B,), generator=gen)
    kw = dict(num_draft=num_draft, seed=seeds, offset=torch.randint(0, 2**40, (B,), generator=gen), **filters)
    got = dspark_ops.verify(logits, drafts, q, **kw)
    want = reference.verify(logits, drafts, q, **kw)
    assert torch.equal(got[0], want[0]), f"seed {seed}"
    assert torch.equal(got[1], want[1]), f"seed {seed}"
    # structure: accepted drafts, one emitted token, then -1
    for b in range(B):
        n = int(got[1][b])
        assert 0 <= n <= int(num_draft[b])
        assert torch.equal(got[0][b, :n], drafts[b, :n].int())
        assert 0 <= int(got[0][b, n]) < V
        assert bool((got[0][b, n + 1:] == -1).all())


def row_params(B, V, gen):
    """Sampling parameters that differ from row to row: greedy and sampled rows mixed, each filter on in about
    half the rows, with its own value."""
    def some(on, value, off):
        return torch.where(torch.rand(B, generator=gen) < on, value, off)
    return dict(temperature=some(0.75, 0.4 + 1.2 * torch.rand(B, generator=gen), torch.tensor(0.0)),
                top_k=some(0.5, torch.randint(1, V, (B,), generator=gen), torch.tensor(0)),
                top_p=some(0.5, 0.3 + 0.7 * torch.rand(B, generator=gen), torch.tensor(1.0)),
                min_p=some(0.5, 0.3 * torch.rand(B, generator=gen), torch.tensor(0.0)))


def random_mask(logits, gen, *, keep_one=True):
    """-inf on about a third of the ids at each position (at least one id left unmasked)."""
    mask = torch.rand(logits.shape, generator=gen) < 0.35
    if keep_one:
        mask.scatter_(-1, torch.randint(0, logits.shape[-1], logits.shape[:-1] + (1,), generator=gen), False)
    return logits.masked_fill(mask, float("-inf")), mask


@pytest.mark.parametrize("probs", [True, False], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_per_row_parameters_match_reference_and_each_row_alone(probs, masked):
    """Temperature, top-k, top-p, min-p, num_draft, seed and offset all differ per row (greedy and sampled rows
    in one batch): the kernel equals the reference, and every row equals the row verified alone with its own
    parameters as numbers (a kernel reading another row's parameters fails this). With masked ids (-inf, drafts
    of masked ids included), no masked id is ever emitted or accepted."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 32, 4, 29
    logits, drafts, q = random_problem(B, K, V, gen=gen, probs=probs)
    mask = torch.zeros(logits.shape, dtype=torch.bool)
    if masked:
        logits, mask = random_mask(logits, gen)
    params = row_params(B, V, gen)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen), seed=torch.randint(0, 2**62, (B,), generator=gen),
              offset=torch.randint(0, 2**40, (B,), generator=gen), **params)
    got = dspark_ops.verify(logits, drafts, q, **kw)
    want = reference.verify(logits, drafts, q, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"
    for b in range(B):
        alone = dspark_ops.verify(logits[b:b + 1], drafts[b:b + 1], None if q is None else q[b:b + 1],
                                  **{k: v[b].item() for k, v in kw.items()})
        assert torch.equal(alone[0][0], got[0][b]) and int(alone[1][0]) == int(got[1][b]), f"seed {seed}, row {b}"
        n = int(got[1][b])
        emitted = got[0][b, :n + 1].long()
        assert not bool(mask[b, torch.arange(n + 1), emitted].any()), f"seed {seed}, row {b}: a masked id emitted"
    assert bool((params["temperature"] == 0).any()) and bool((params["temperature"] > 0).any())


@pytest.mark.parametrize("dtype", FLOATS)
def test_masked_ids_are_never_emitted_and_drafts_of_them_always_rejected(dtype):
    """-inf in fp32, bf16 and fp16 logits: a draft of a masked id is rejected in every row (sampled and greedy,
    one-hot and with draft probabilities), and the token emitted instead is never masked; the kernel equals the
    reference."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 48, 3, 40
    logits, _, q = random_problem(B, K, V, gen=gen, dtype=dtype)
    logits, mask = random_mask(logits, gen)
    masked_ids = torch.multinomial(mask[:, 0].float() + 1e-9, 1, generator=gen)   # a masked id of position 0
    drafts = torch.randint(0, V, (B, K), generator=gen)
    drafts[:, 0] = masked_ids[:, 0]
    q[:, 0].scatter_(-1, masked_ids, 0.5)      # the drafter likes it
    for probs in (q, None):
        for temperature in (1.0, 0.0, torch.linspace(0.0, 1.5, B)):
            kw = dict(temperature=temperature, seed=torch.randint(0, 2**62, (B,), generator=gen), top_k=5)
            tokens, n = dspark_ops.verify(logits, drafts, probs, **kw)
            want = reference.verify(logits, drafts, probs, **kw)
            assert torch.equal(tokens, want[0]) and torch.equal(n, want[1]), f"seed {seed}"
            assert n.tolist() == [0] * B, f"seed {seed}: a draft of a masked id was accepted"
            assert not bool(mask[torch.arange(B), 0, tokens[:, 0].long()].any()), f"seed {seed}"


@pytest.mark.parametrize("draft", ["one_hot", "draft_probs"])
@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.6}, {"min_p": 0.3},
                                     {"temperature": 0.7, "top_k": 4, "top_p": 0.9, "min_p": 0.05}],
                         ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
def test_masked_ids_have_probability_zero_filters_included(draft, filters):
    """The first token of N copies of one row, under one seed (each row its own stream), follows the exact
    filtered softmax over the unmasked ids (chi-square): filters rank and sum the unmasked ids only (top-k = 3
    keeps 3 unmasked ids), and a draft of a masked id is always rejected, its residual being the target itself.
    False alarm < 1e-6; a bias that moves 0.013 of probability between two ids of probability 0.2 is detected
    with probability 0.99 (noncentral chi-square, at most 5 degrees of freedom, N = 40000)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    N, V = 40000, 10
    masked = [0, 3, 5, 6]
    row = torch.randn(V, generator=gen)
    row[masked] = float("-inf")
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    full.update(filters)
    while True:
        try:
            law = verify_law.ideal_probs(row, **full)
            break
        except verify_law.NearThreshold:
            row[row.isfinite()] = torch.randn(V - len(masked), generator=gen)
    logits = row.expand(N, 2, V).contiguous()
    drafts = torch.full((N, 1), 3)
    q = None
    if draft == "draft_probs":   # a drafter that proposes masked ids only: every unmasked id keeps its residual
        q = torch.zeros(N, 1, V)
        q[:, 0, masked] = 1.0 / len(masked)
    tokens, n = dspark_ops.verify(logits, drafts, q, seed=seed, **filters)
    assert int(n.sum()) == 0
    counts = torch.bincount(tokens[:, 0].long(), minlength=V)
    assert counts[masked].sum() == 0
    assert chi2_pvalue(counts, law) > CHI2_MIN_PVALUE, f"seed {seed}"


def test_greedy_never_picks_a_masked_id():
    """Ties among unmasked ids go to the lowest unmasked one; -inf at lower ids (or everywhere but one id) is
    skipped, in every dtype."""
    inf = float("inf")
    logits = torch.tensor([[[-inf, 2.0, 2.0, -inf], [-inf, -inf, -inf, -5.0]],
                           [[-inf, -inf, 7.0, 7.0], [1.0, -inf, 1.0, -inf]]])
    for dtype in FLOATS:
        tokens, n = dspark_ops.verify(logits.to(dtype), torch.tensor([[0], [2]]), temperature=0.0)
        assert tokens.tolist() == [[1, -1], [2, 0]] and n.tolist() == [0, 1]


def test_a_position_with_every_id_masked_is_an_error_where_the_row_reads_it():
    """Every id of a verified position masked: ValueError naming target_logits and the row. A position past the
    row's first rejection is never read, so it may be anything."""
    logits = torch.randn(2, 3, 6)
    logits[1, 1] = float("-inf")
    with pytest.raises(ValueError, match=r"target_logits row 1 masks every id"):
        dspark_ops.verify(logits, logits[:, :2].argmax(-1), temperature=0.0)   # row 1 accepts position 0
    drafts = logits[:, :2].argmax(-1)
    drafts[1, 0] = (drafts[1, 0] + 1) % 6                                       # now rejected at position 0
    tokens, n = dspark_ops.verify(logits, drafts, temperature=0.0)
    assert n.tolist() == [2, 0]
    with pytest.raises(ValueError, match=r"target_logits row 0 masks every id"):
        dspark_ops.verify(torch.full((1, 1, 4), float("-inf")), torch.zeros(1, 0, dtype=torch.long))


def test_one_seed_gives_every_row_its_own_stream():
    """seed as one number: rows draw from streams keyed by the seed and the row index, so 4000 copies of one row
    sample independently: their first tokens follow the target (chi-square: a one-hot draft's first token is
    the draft with probability p(x), else drawn from p without x, so it follows p); the reference agrees. A [B]
    seed tensor keeps a row's result a function of its own seed and offset: equal seeds give equal rows. A 0-d
    or 1-element tensor is one seed, like the number; row 0 of a batch seed is the row verified alone with that
    seed. False alarm < 1e-6; detects a 0.031 shift between two ids of probability 0.1 with probability 0.99
    (at most 11 degrees of freedom)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    N, K, V = 4000, 2, 12
    logits, drafts, _ = random_problem(1, K, V, gen=gen, probs=False)
    logits, drafts = logits.expand(N, -1, -1), drafts.expand(N, -1)
    s = int(torch.randint(0, 2**62, (), generator=gen))
    shared = dspark_ops.verify(logits, drafts, seed=s, offset=3)
    assert torch.equal(shared[0], reference.verify(logits, drafts, seed=s, offset=3)[0])
    p0 = verify_law.ideal_probs(logits[0, 0], 1.0, 0, 1.0, 0.0)
    first = torch.bincount(shared[0][:, 0].long(), minlength=V)
    assert chi2_pvalue(first, p0) > CHI2_MIN_PVALUE, f"seed {seed}"
    for same in (torch.tensor(s), torch.tensor([s])):
        assert torch.equal(dspark_ops.verify(logits, drafts, seed=same, offset=3)[0], shared[0])
    per_row = dspark_ops.verify(logits, drafts, seed=torch.full((N,), s), offset=3)
    assert bool((per_row[0] == per_row[0][0]).all()) and bool((per_row[1] == per_row[1][0]).all())
    assert torch.equal(per_row[0][0], shared[0][0])
    alone = dspark_ops.verify(logits[:1], drafts[:1], seed=s, offset=3)
    assert torch.equal(alone[0][0], shared[0][0])


def test_every_drafted_id_is_checked_before_sampling():
    """An id outside [0, V) anywhere within num_draft raises ValueError naming draft_tokens, also past the first
    rejection (where the kernel never looks at it), greedy or sampled, one-hot or with draft_probs; ids past a
    row's num_draft are not drafts and are not checked."""
    for temperature in (1.0, 0.0):
        for probs in (None, torch.full((2, 2, 10), 0.1)):
            with pytest.raises(ValueError, match=r"draft_tokens row 0 holds a token id outside \[0, 10\)"):
                dspark_ops.verify(torch.randn(2, 3, 10), torch.tensor([[1, 10], [0, 0]]), probs,
                                  temperature=temperature)
            logits = torch.zeros(2, 3, 10)
            logits[:, :, 9] = 50.0       # drafts of 1 and 0 are (almost surely) rejected at position 0
            with pytest.raises(ValueError, match="draft_tokens row 1"):
                dspark_ops.verify(logits, torch.tensor([[1, 0], [0, -1]]), probs, temperature=temperature)
            tokens, n = dspark_ops.verify(torch.randn(2, 3, 10), torch.tensor([[1, 10], [0, 77]]), probs,
                                          num_draft=torch.tensor([1, 1]), temperature=temperature)
            assert (n <= 1).all() and (tokens[:, :2] < 10).all()


@pytest.mark.parametrize("ldtype", FLOATS)
@pytest.mark.parametrize("qdtype", FLOATS)
def test_dtypes_read_directly_match_reference(ldtype, qdtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 16, 3, 300
    logits, drafts, q = random_problem(B, K, V, gen=gen, dtype=ldtype)
    q = q.to(qdtype)
    kw = dict(seed=torch.randint(0, 2**62, (B,), generator=gen), top_p=0.9, temperature=0.8)
    got = dspark_ops.verify(logits, drafts, q, **kw)
    want = reference.verify(logits, drafts, q, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_non_contiguous_logits_rows():
    gen = torch.Generator().manual_seed(fresh_seed())
    big = torch.randn(8, 6, 50, generator=gen)
    logits = big[:, 1:5]  # strided view: rows are not adjacent
    drafts = torch.randint(0, 50, (8, 3), generator=gen)
    kw = dict(seed=5, offset=1, top_k=7)
    got = dspark_ops.verify(logits, drafts, **kw)
    want = dspark_ops.verify(logits.contiguous(), drafts, **kw)
    assert torch.equal(got[0], want[0])


def random_draft_vocabulary(B, K, V, Vd, *, gen, scale=2.0):
    """Drafts over Vd of the V ids (in a random order, so columns are not sorted by id): the [V] draft_index,
    q [B, K, Vd], the same q as [B, K, V] (zero outside), and drafts (target ids) drawn from q."""
    ids = torch.randperm(V, generator=gen)[:Vd]
    index = torch.full((V,), -1, dtype=torch.int32)
    index[ids] = torch.arange(Vd, dtype=torch.int32)
    q = torch.softmax(torch.randn(B, K, Vd, generator=gen) * scale, -1)
    dense = torch.zeros(B, K, V)
    dense[..., ids] = q
    drafts = ids[torch.multinomial(q.reshape(-1, Vd), 1, generator=gen).reshape(B, K)]
    return index, q, dense, drafts


@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("qdtype", FLOATS)
def test_draft_index_reads_a_draft_vocabulary_as_the_dense_distribution(filters, qdtype):
    """q over a draft vocabulary through draft_index picks exactly the tokens of the same q written out over
    all V ids (so it inherits the dense path's losslessness), and agrees with the reference."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V, Vd = 24, 4, 97, 31
    logits = torch.randn(B, K + 1, V, generator=gen) * 2
    index, q, dense, drafts = random_draft_vocabulary(B, K, V, Vd, gen=gen)
    q, dense = q.to(qdtype), dense.to(qdtype)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen),
              seed=torch.randint(0, 2**62, (B,), generator=gen), offset=torch.randint(0, 2**40, (B,), generator=gen),
              **filters)
    got = dspark_ops.verify(logits, drafts, q, draft_index=index, **kw)
    want = dspark_ops.verify(logits, drafts, dense, **kw)
    ref = reference.verify(logits, drafts, q, draft_index=index, **kw)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"seed {seed}"
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]), f"seed {seed}"
    assert torch.equal(dspark_ops.verify(logits, drafts, q, draft_index=index.long(), **kw)[0], got[0])


def test_draft_index_rejections_resample_outside_the_draft_vocabulary():
    """The residual covers every target id: with a target that puts most of its mass outside the draft
    vocabulary, corrections land there as often as the target says. Chi-square: false alarm < 1e-6; a bias
    moving 0.04 of probability between two ids of probability 0.2 is detected with probability 0.99."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, V, Vd = 4000, 6, 2
    index = torch.tensor([0, 1, -1, -1, -1, -1], dtype=torch.int32)
    q = torch.tensor([0.5, 0.5]).expand(B, 1, Vd).contiguous()
    p = torch.tensor([0.1, 0.1, 0.2, 0.2, 0.2, 0.2])
    logits = p.log().expand(B, 2, V).contiguous()
    drafts = torch.multinomial(q[:, 0], 1, generator=gen)
    tokens, n = dspark_ops.verify(logits, drafts, q, draft_index=index, seed=torch.randint(0, 2**62, (B,), generator=gen))
    first = tokens[:, 0].long()
    counts = torch.bincount(first, minlength=V).double()
    assert chi2_pvalue(counts, p.double()) > CHI2_MIN_PVALUE   # lossless: the first token follows p


def test_draft_outside_the_draft_vocabulary_is_a_zero_probability_error():
    index = torch.tensor([-1, 0, 1], dtype=torch.int32)
    with pytest.raises(ValueError, match="draft_probs row 0"):
        dspark_ops.verify(torch.randn(1, 2, 3), torch.tensor([[0]]), torch.tensor([[[0.5, 0.5]]]), draft_index=index)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_every_cpu_isa_build_agrees(isa):
    code = textwrap.dedent("""
        import torch, dspark_ops
        g = torch.Generator().manual_seed(7)
        lg = torch.randn(16, 5, 1000, generator=g) * 3
        q = torch.softmax(torch.randn(16, 4, 1000, generator=g), -1)
        d = torch.multinomial(q.reshape(-1, 1000), 1, generator=g).reshape(16, 4)
        outs = [dspark_ops.verify(lg.to(dt), d, q, seed=torch.arange(16), top_p=0.85, top_k=50)
                for dt in (torch.float32, torch.bfloat16, torch.float16)]
        print(dspark_ops.build_info()["cpu_isa"])
        print([o[0].tolist() for o in outs])
    """)
    import os

    def run(env_isa):
        env = dict(os.environ)
        env.pop("DSPARK_CPU_ISA", None)
        if env_isa:
            env["DSPARK_CPU_ISA"] = env_isa
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        return out.stdout.splitlines()

    forced, best = run(isa), run(None)
    assert forced[0] == isa
    assert forced[1] == best[1]


# ---------------------------------------------------------------------------------------------
# Losslessness of the fixed-point arithmetic, exactly (tiny vocabulary, tree-shaped target and drafter so that
# every conditional law is defined; verify_law.py states the rules): the law the rules give equals the ideal
# target law within sampling.h's quantisation bound, and the kernel follows the rules token for token.

EXACT_FILTERS = [{}, {"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.2}, {"temperature": 0.6},
                 {"temperature": 0.8, "top_k": 3, "top_p": 0.9, "min_p": 0.05}]


def _exact_case(K, filters, masked, seed):
    """A tree problem whose ideal filter decisions are all unambiguous, and its full filter settings."""
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    full.update(filters)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        problem = verify_law.TreeProblem(4, K, gen, masked)
        try:
            ideal = verify_law.ideal_joint(problem, full)
        except verify_law.NearThreshold:
            continue
        return problem, full, ideal
    raise AssertionError(f"seed {seed}: no problem without a near-threshold filter decision in 50 draws")


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("filters", EXACT_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("masked", [(), (1,)], ids=["", "masked"])
def test_fixed_point_rules_are_lossless_within_the_quantisation_bound(K, filters, one_hot, masked):
    """The exact law of one verify row under the kernels' rules (acceptance as a count of the 2^23 values of u,
    draws as counts of the 2^64 values of their bits, 40-bit masses, the filters' thresholds on them), followed
    by ideal target sampling, is within total variation (K+1)(V 2^-21 + 2^-22) of the ideal target's joint law.
    With an id masked by -inf at every position (and proposed by the drafter), both give it probability 0."""
    seed = fresh_seed()
    problem, full, ideal = _exact_case(K, filters, masked, seed)
    law = verify_law.fixed_round_law(problem, full, one_hot)
    assert abs(sum(law.values()) - 1.0) < 1e-12, f"seed {seed}"
    for tokens in law:
        assert not set(masked) & set(tokens), f"seed {seed}: a masked id was emitted"
    tv = verify_law.total_variation(law, ideal)
    assert tv <= verify_law.bound(4, K + 1), f"seed {seed}: total variation {tv}"


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("filters", EXACT_FILTERS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "plain")
@pytest.mark.parametrize("one_hot", [False, True], ids=["draft_probs", "one_hot"])
@pytest.mark.parametrize("masked", [(), (1,)], ids=["", "masked"])
def test_kernel_follows_the_fixed_point_rules_token_for_token(K, filters, one_hot, masked):
    """Rows of the same tree problem (drafts drawn from the drafter, a seed each): every accept decision is
    k < accept_count (k: the top 23 bits of the row's Philox word) and every emitted token the draw interval
    holding the row's Philox bits, as verify_law computes them for the exact law above."""
    seed = fresh_seed()
    problem, full, _ = _exact_case(K, filters, masked, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    N, V = 256, problem.V
    drafts = torch.zeros(N, K, dtype=torch.long)
    logits, probs = torch.empty(N, K + 1, V), torch.empty(N, K, V)
    for b in range(N):
        for j in range(K + 1):
            logits[b, j] = problem.target(drafts[b, :j].tolist())
            if j < K:
                probs[b, j] = problem.drafter(drafts[b, :j].tolist())
                drafts[b, j] = int(torch.multinomial(probs[b, j].double(), 1, generator=gen))
    seeds = torch.randint(0, 2**62, (N,), generator=gen)
    offsets = torch.randint(0, 2**40, (N,), generator=gen)
    tokens, n = dspark_ops.verify(logits, drafts, None if one_hot else probs, seed=seeds, offset=offsets, **filters)
    for b in range(N):
        s, off, out = int(seeds[b]), int(offsets[b]), []
        for j in range(K + 1):
            prefix = drafts[b, :j].tolist()
            p = problem.masses(prefix, full)
            if j < K:
                x, q = int(drafts[b, j]), problem.drafter(prefix).tolist()
                k = numerics.random_words(s, 0, off, j, numerics.PURPOSE_VERIFY_ACCEPT)[0] >> 9
                if k < verify_law.accept_count(1.0 if one_hot else q[x], p[x], sum(p)):
                    out.append(x)
                    continue
                p = verify_law.residual_masses(p, None if one_hot else q, x)
            bits = numerics.random_u64(numerics.random_words(s, 0, off, j, numerics.PURPOSE_VERIFY_SAMPLE))
            out.append(verify_law.draw(p, bits))
            break
        assert tokens[b, :len(out)].tolist() == out and int(n[b]) == len(out) - 1, f"seed {seed}, row {b}"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, needs_cuda])])
def test_accept_decision_is_the_double_product_on_the_u_grid(device):
    """Each row's draft probability q sits on the accept boundary of its own u: the largest float q with
    u q z < p(x) in double is accepted, the next float up rejected (any other u, rounding or product breaks
    one side of some row)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, V = 64, 7
    logits = torch.randn(B, 2, V, generator=gen) * 2
    drafts = torch.randint(0, V, (B, 1), generator=gen)
    seeds = torch.randint(0, 2**62, (B,), generator=gen)
    q_accept, q_reject = torch.full((B, 1, V), 0.1), torch.full((B, 1, V), 0.1)
    for b in range(B):
        p = reference.filtered_masses(logits[b, 0], 1.0, 0, 1.0, 0.0).tolist()
        x, z = int(drafts[b, 0]), sum(p)
        u = numerics.uniform_open01(numerics.random_words(int(seeds[b]), 0, 0, 0, numerics.PURPOSE_VERIFY_ACCEPT)[0])
        q = torch.tensor(p[x] / (u * z), dtype=torch.float32)
        inf = torch.tensor(float("inf"))
        while not u * float(q) * z < p[x]:
            q = torch.nextafter(q, -inf)
        while u * float(torch.nextafter(q, inf)) * z < p[x]:
            q = torch.nextafter(q, inf)
        q_accept[b, 0, x], q_reject[b, 0, x] = q, torch.nextafter(q, inf)
    on = lambda t: t.to(device)  # noqa: E731
    _, n_accept = dspark_ops.verify(on(logits), on(drafts), on(q_accept), seed=on(seeds), check=True)
    _, n_reject = dspark_ops.verify(on(logits), on(drafts), on(q_reject), seed=on(seeds), check=True)
    assert n_accept.tolist() == [1] * B and n_reject.tolist() == [0] * B, f"seed {seed}"


# ---------------------------------------------------------------------------------------------
# Losslessness of the kernel itself, by sampling (chi-square on many seeded rows in one call).


@pytest.mark.parametrize("case", ["probs", "one_hot", "ragged", "top_k", "top_p", "min_p", "all_filters"])
def test_kernel_first_two_tokens_follow_target(case):
    """The first token and the first two tokens of 40000 rows of a tree target follow the target's laws
    (chi-square, each check a false alarm < 1e-6). Detected with probability 0.99: a bias moving 0.0125 of
    the first token's probability between two ids of probability 0.2, or 0.007 of the pair's between two
    pairs of probability 0.04."""
    V, K, N = 5, 3, 40000
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    filters = {"top_k": dict(top_k=3), "top_p": dict(top_p=0.75), "min_p": dict(min_p=0.25),
               "all_filters": dict(temperature=0.8, top_k=4, top_p=0.9, min_p=0.05)}.get(case, {})
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    full.update(filters)
    # Tree target: position 0 logits fixed, position 1 logits depend on the first token.
    l0 = torch.randn(V, generator=gen) * 1.5
    l1 = torch.randn(V, V, generator=gen) * 1.5
    q0 = torch.softmax(torch.randn(V, generator=gen), -1)
    q1 = torch.softmax(torch.randn(V, V, generator=gen), -1)
    x1 = torch.multinomial(q0, N, replacement=True, generator=gen)
    x2 = torch.multinomial(q1[x1], 1, generator=gen)[:, 0]
    x3 = torch.randint(0, V, (N,), generator=gen)
    drafts = torch.stack([x1, x2, x3], 1)
    logits = torch.randn(N, K + 1, V, generator=gen)  # positions 2.. are never needed below
    logits[:, 0] = l0
    logits[:, 1] = l1[x1]
    probs = None if case == "one_hot" else torch.cat(
        [q0.expand(N, 1, V), q1[x1].unsqueeze(1), torch.full((N, 1, V), 1.0 / V)], 1)
    num_draft = torch.randint(0, 3, (N,), generator=gen) if case == "ragged" else 2
    tokens, n_acc = dspark_ops.verify(logits, drafts, probs, num_draft=num_draft,
                                      seed=torch.randint(0, 2**62, (N,), generator=gen), **filters)
    y1 = tokens[:, 0].long()
    # Second token: from the round if it emitted one, else sampled from the target given y1.
    p1_all = torch.stack([reference.filtered_masses(l1[v], **full).double() for v in range(V)])
    p1_all = p1_all / p1_all.sum(1, keepdim=True)
    fallback = torch.multinomial(p1_all[y1].float(), 1, generator=gen)[:, 0]
    y2 = torch.where(n_acc >= 1, tokens[:, 1].long(), fallback)
    p0 = reference.filtered_masses(l0, **full).double()
    p0 = p0 / p0.sum()
    assert chi2_pvalue(torch.bincount(y1, minlength=V), p0) > CHI2_MIN_PVALUE, f"seed {seed}"
    joint = (p0[:, None] * p1_all).reshape(-1)
    assert chi2_pvalue(torch.bincount(y1 * V + y2, minlength=V * V), joint) > CHI2_MIN_PVALUE, f"seed {seed}"


def test_one_hot_vs_probabilistic_drafts_acceptance():
    """Keeping the draft distribution accepts more than treating drafts as argmax (vLLM #41044). The acceptance
    rate of 20000 rows is within 0.02 of sum(min(p, q)): false alarm 2e-8 (5.7 standard deviations); a rate off
    by 0.028 fails with probability 0.99."""
    gen = torch.Generator().manual_seed(fresh_seed())
    N, V = 20000, 8
    logits = torch.randn(V, generator=gen).expand(N, 2, V).contiguous()
    q = torch.softmax(logits[0, 0] + 0.3 * torch.randn(V, generator=gen), -1)
    drafts = torch.multinomial(q, N, replacement=True, generator=gen)[:, None]
    seeds = torch.arange(N)
    _, acc_probs = dspark_ops.verify(logits, drafts, q.expand(N, 1, V), seed=seeds)
    _, acc_onehot = dspark_ops.verify(logits, drafts, seed=seeds)
    p = torch.softmax(logits[0, 0], -1)
    expected_probs = float(torch.minimum(p, q).sum())
    assert abs(acc_probs.float().mean() - expected_probs) < 0.02
    assert acc_probs.float().mean() > acc_onehot.float().mean()


# ---------------------------------------------------------------------------------------------
# Greedy, determinism, batch invariance.


def test_greedy_is_argmax_chain_with_lowest_index_ties():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 32, 5, 64
    logits = torch.randint(-3, 3, (B, K + 1, V), generator=gen).float()  # many ties
    best = logits.argmax(-1)  # torch.argmax returns the first maximal index
    accept_until = torch.randint(0, K + 1, (B,), generator=gen)
    drafts = best[:, :K].clone()
    for b in range(B):
        if accept_until[b] < K:
            drafts[b, accept_until[b]] = (best[b, accept_until[b]] + 1) % V
    tokens, n = dspark_ops.verify(logits, drafts, temperature=0.0)
    for b in range(B):
        a = int(accept_until[b])
        assert int(n[b]) == a
        assert tokens[b, :a + 1].tolist() == best[b, :a + 1].tolist()


def test_same_seed_same_tokens_and_batch_invariance():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 12, 4, 200
    logits, drafts, q = random_problem(B, K, V, gen=gen)
    seeds = torch.randint(0, 2**62, (B,), generator=gen)
    offsets = torch.randint(0, 1000, (B,), generator=gen)
    kw = dict(top_p=0.9)
    a = dspark_ops.verify(logits, drafts, q, seed=seeds, offset=offsets, **kw)
    b = dspark_ops.verify(logits, drafts, q, seed=seeds, offset=offsets, **kw)
    assert torch.equal(a[0], b[0])
    perm = torch.randperm(B, generator=gen)
    c = dspark_ops.verify(logits[perm], drafts[perm], q[perm], seed=seeds[perm], offset=offsets[perm], **kw)
    assert torch.equal(c[0], a[0][perm]) and torch.equal(c[1], a[1][perm])
    sub = perm[:5]
    d = dspark_ops.verify(logits[sub], drafts[sub], q[sub], seed=seeds[sub], offset=offsets[sub], **kw)
    assert torch.equal(d[0], a[0][sub])
    # a different offset gives fresh randomness
    e = dspark_ops.verify(logits, drafts, q, seed=seeds, offset=offsets + 1, **kw)
    assert not torch.equal(e[0], a[0])


# ---------------------------------------------------------------------------------------------
# Edge cases.


def test_num_draft_zero_emits_only_the_bonus_token():
    gen = torch.Generator().manual_seed(fresh_seed())
    logits, drafts, q = random_problem(6, 3, 20, gen=gen)
    tokens, n = dspark_ops.verify(logits, drafts, q, num_draft=0, seed=3)
    assert n.tolist() == [0] * 6
    assert bool((tokens[:, 1:] == -1).all()) and bool((tokens[:, 0] >= 0).all())
    ref = reference.verify(logits, drafts, q, num_draft=0, seed=3)
    assert torch.equal(tokens, ref[0])


def test_k_zero_and_v_one():
    logits = torch.randn(3, 1, 9)
    tokens, n = dspark_ops.verify(logits, torch.zeros(3, 0, dtype=torch.long), seed=1)
    assert tokens.shape == (3, 1) and n.tolist() == [0, 0, 0]
    tokens, n = dspark_ops.verify(torch.randn(2, 3, 1), torch.zeros(2, 2, dtype=torch.long))
    assert tokens.tolist() == [[0, 0, 0]] * 2 and n.tolist() == [2, 2]


def test_zero_target_probability_draft_is_never_accepted():
    N, V = 5000, 10
    logits = torch.randn(V).expand(N, 2, V).contiguous()
    worst = int(logits[0, 0].argmin())
    drafts = torch.full((N, 1), worst)
    q = torch.full((N, 1, V), 1.0 / V)
    # top_k = 3 gives the drafted token target probability 0
    tokens, n = dspark_ops.verify(logits, drafts, q, top_k=3, seed=torch.arange(N))
    assert int(n.sum()) == 0
    assert not bool((tokens[:, 0] == worst).any())


def test_zero_draft_probability_for_drafted_token_is_an_error():
    logits = torch.randn(2, 2, 6)
    q = torch.full((2, 1, 6), 1.0 / 6)
    q[1, 0, 4] = 0.0
    with pytest.raises(ValueError, match="draft_probs row 1"):
        dspark_ops.verify(logits, torch.tensor([[1], [4]]), q)


@pytest.mark.parametrize("filters", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_filters_that_leave_only_the_argmax(filters):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 40, 2, 30
    logits, drafts, q = random_problem(B, K, V, gen=gen)
    best = logits.argmax(-1)
    tokens, n = dspark_ops.verify(logits, drafts, q, seed=torch.arange(B), **filters)
    for b in range(B):
        for j in range(int(n[b]) + 1):
            assert int(tokens[b, j]) == int(best[b, j])


# ---------------------------------------------------------------------------------------------
# Bad input: a Python exception naming the argument, never a crash.

def _verify(logits=None, drafts=None, probs=None, **kw):
    """verify on a small valid problem (B = 2, K = 2, V = 5) with the given arguments replaced."""
    logits = torch.randn(2, 3, 5) if logits is None else logits
    drafts = torch.zeros(2, 2, dtype=torch.long) if drafts is None else drafts
    return dspark_ops.verify(logits, drafts, probs, **kw)


def _logits_with(row, position, value, dtype=torch.float32):
    logits = torch.randn(2, 3, 5)
    logits[row, position] = value if isinstance(value, float) else torch.tensor(value)
    return logits.to(dtype)


_NEG_INF = float("-inf")
_IDX = dict(probs=torch.rand(2, 2, 3))

# name: (exception type, pattern the message must match, call). The same class of bad input raises the same
# type whether the wrapper or the kernel finds it: bad values ValueError, bad types TypeError.
BAD_CALLS = {
    "rank": (ValueError, r"target_logits must be \[B, K\+1, V\]", lambda: _verify(torch.randn(4, 5))),
    "int_logits": (TypeError, "target_logits must be float32, bfloat16 or float16",
                   lambda: _verify(torch.zeros(2, 3, 5, dtype=torch.long))),
    "draft_shape": (ValueError, r"draft_tokens must be \[B, K\]", lambda: _verify(drafts=torch.zeros(2, 3))),
    "draft_float": (TypeError, "draft_tokens must be an integer tensor", lambda: _verify(drafts=torch.zeros(2, 2))),
    "probs_shape": (ValueError, r"draft_probs must be \[B, K, V\]", lambda: _verify(probs=torch.rand(2, 2, 4))),
    "id_high": (ValueError, r"draft_tokens row 0 holds a token id outside \[0, 5\)",
                lambda: _verify(drafts=torch.full((2, 2), 5))),
    "id_negative": (ValueError, r"draft_tokens row 0 holds a token id outside",
                    lambda: _verify(drafts=torch.full((2, 2), -3))),
    "id_huge": (ValueError, r"draft_tokens row 1 holds a token id outside",
                lambda: _verify(drafts=torch.tensor([[0, 0], [0, 2**33 + 1]]))),
    "id_after_rejection": (ValueError, r"draft_tokens row 0 holds a token id outside",
                           lambda: _verify(_logits_with(0, 0, [9.0, -9, -9, -9, -9]), torch.tensor([[4, 5], [0, 0]]),
                                           temperature=0.0)),
    "nan": (ValueError, "target_logits row 1 contains NaN or \\+inf",
            lambda: _verify(_logits_with(1, 0, float("nan")))),
    "inf": (ValueError, "target_logits row 0 contains NaN or \\+inf",
            lambda: _verify(_logits_with(0, 0, float("inf")), temperature=0.0)),
    "inf_bf16": (ValueError, "target_logits row 0 contains NaN or \\+inf",
                 lambda: _verify(_logits_with(0, 0, float("inf"), torch.bfloat16))),
    "all_masked": (ValueError, "target_logits row 1 masks every id", lambda: _verify(_logits_with(1, 0, _NEG_INF))),
    "all_masked_fp16": (ValueError, "target_logits row 0 masks every id",
                        lambda: _verify(_logits_with(0, 0, _NEG_INF, torch.float16), temperature=0.0)),
    "neg_temp": (ValueError, "temperature must satisfy", lambda: _verify(temperature=-1.0)),
    "neg_temp_tensor": (ValueError, "temperature must satisfy", lambda: _verify(temperature=torch.tensor([1.0, -0.5]))),
    "top_p_zero": (ValueError, "top_p must satisfy", lambda: _verify(top_p=0.0)),
    "top_p_big": (ValueError, "top_p must satisfy", lambda: _verify(top_p=1.5)),
    "min_p": (ValueError, "min_p must satisfy", lambda: _verify(min_p=-0.1)),
    "num_draft": (ValueError, "num_draft must satisfy", lambda: _verify(num_draft=3)),
    "zero_draft_prob": (ValueError, "draft_probs row 0 gives a drafted token probability 0",
                        lambda: _verify(probs=torch.zeros(2, 2, 5))),
    "index_shape": (ValueError, r"draft_index must be \[V\]",
                    lambda: _verify(draft_index=torch.zeros(4, dtype=torch.int32), **_IDX)),
    "index_float": (TypeError, "draft_index must be an integer tensor",
                    lambda: _verify(draft_index=torch.zeros(5), **_IDX)),
    "index_high": (ValueError, r"draft_index\[0\] = 3 is outside \[-1, 3\)",
                   lambda: _verify(draft_index=torch.full((5,), 3), **_IDX)),
    "index_low": (ValueError, r"draft_index\[0\] = -2 is outside",
                  lambda: _verify(draft_index=torch.full((5,), -2), **_IDX)),
    "index_huge": (ValueError, r"draft_index\[0\] = -2 is outside",
                   lambda: _verify(draft_index=torch.full((5,), -2**40), **_IDX)),
    "index_not_one_to_one": (ValueError, "draft_index maps target ids 1 and 2 to the same column 1",
                             lambda: _verify(draft_index=torch.tensor([0, 1, 1, -1, 2], dtype=torch.int32), **_IDX)),
    "index_no_probs": (ValueError, "draft_index maps draft_probs' columns, and no draft_probs",
                       lambda: _verify(draft_index=torch.zeros(5, dtype=torch.int32))),
    "index_probs_shape": (ValueError, r"draft_probs must be \[B, K, Vd\]",
                          lambda: _verify(draft_index=torch.zeros(5, dtype=torch.int32), probs=torch.rand(2, 3, 3))),
    "seed_shape": (ValueError, r"seed must have shape \[2\] \(a seed per row\) or \[1\]",
                   lambda: _verify(seed=torch.zeros(3, dtype=torch.long))),
    "seed_float": (TypeError, "seed must be an integer tensor", lambda: _verify(seed=torch.zeros(2))),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_names_the_argument(name):
    exc, pattern, call = BAD_CALLS[name]
    with pytest.raises(exc, match=pattern):
        call()


def test_raw_op_bad_input_raises_not_crashes():
    """The registered op checks its own arguments (callers may bypass the wrapper), naming the argument; run in
    a subprocess."""
    code = textwrap.dedent("""
        import re, torch, dspark_ops
        op = torch.ops.dspark.verify
        B, K, V = 2, 2, 5
        good = dict(num_draft=torch.full((B,), K, dtype=torch.int32), temperature=torch.ones(B),
                    top_k=torch.zeros(B, dtype=torch.int32), top_p=torch.ones(B), min_p=torch.zeros(B),
                    seed=torch.zeros(B, dtype=torch.long), offset=torch.zeros(B, dtype=torch.long))
        def call(logits, drafts, probs=None, index=None, **over):
            a = dict(good); a.update(over)
            return op(logits, drafts, probs, a["num_draft"], a["temperature"], a["top_k"], a["top_p"], a["min_p"],
                      a["seed"], a["offset"], index)
        lg = torch.randn(B, K + 1, V)
        d = torch.zeros(B, K, dtype=torch.int32)
        masked = lg.clone(); masked[1, 0] = float("-inf")
        ids = lambda v: torch.full((B, K), v, dtype=torch.int32)
        nd = lambda v: torch.full((B,), v, dtype=torch.int32)
        cols = torch.rand(B, K, 3)
        index = lambda *v: torch.tensor(v, dtype=torch.int32)
        cases = [
            (ValueError, r"draft_tokens row 0 holds a token id outside \\[0, 5\\)", lambda: call(lg, ids(99))),
            (ValueError, "draft_tokens row 0", lambda: call(lg, ids(-7))),
            (RuntimeError, "draft_tokens must be Int", lambda: call(lg, d.long())),
            (ValueError, "row 0 has invalid parameters", lambda: call(lg, d, num_draft=nd(9))),
            (ValueError, "row 0 has invalid parameters", lambda: call(lg, d, num_draft=nd(-1))),
            (ValueError, "row 1 has invalid parameters", lambda: call(lg, d, top_p=torch.tensor([1.0, 0.0]))),
            (ValueError, "target_logits row 1 masks every id", lambda: call(masked, d)),
            (RuntimeError, r"draft_probs must be \\[B, K, V\\]", lambda: call(lg, d, torch.rand(B, K, V + 1))),
            (RuntimeError, "seed must be Long", lambda: call(lg, d, seed=torch.zeros(B))),
            (RuntimeError, r"seed must have shape \\[2\\]", lambda: call(lg, d, seed=torch.zeros(3, dtype=torch.long))),
            (RuntimeError, r"top_k must have shape \\[2\\]", lambda: call(lg, d, top_k=nd(0)[:1].expand(3))),
            (RuntimeError, "target_logits must be contiguous in the vocab", lambda: call(lg.transpose(1, 2), d)),
            (ValueError, r"draft_index\\[0\\] = 3 is outside", lambda: call(lg, d, cols, index(3, 3, 3, 3, 3))),
            (ValueError, r"draft_index\\[0\\] = -9 is outside", lambda: call(lg, d, cols, index(-9, 0, 1, 2, -1))),
            (RuntimeError, "draft_index must be Int", lambda: call(lg, d, cols, torch.zeros(V, dtype=torch.long))),
            (RuntimeError, r"draft_index must have shape \\[5\\]", lambda: call(lg, d, cols, index(0, 1, 2, -1, -1, 2))),
            (ValueError, "draft_index maps target ids 0 and 1 to the same column 0",
             lambda: call(lg, d, cols, index(0, 0, -1, -1, -1))),
            (RuntimeError, "draft_index maps draft_probs' columns", lambda: call(lg, d, None, index(0, 1, 2, 3, 4))),
            (RuntimeError, r"draft_probs must be \\[B, K, V\\]", lambda: call(lg, d, cols)),
        ]
        for i, (exc, pattern, c) in enumerate(cases):
            try:
                c()
            except Exception as e:
                if type(e) is not exc or not re.search(pattern, str(e)):
                    raise SystemExit(f"case {i}: {type(e).__name__}: {e}")
                continue
            raise SystemExit(f"case {i} did not raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok"


def test_mismatched_devices_are_rejected():
    if not torch.cuda.is_available():
        # device checks are exercised with the meta device: same code path, no GPU needed
        with pytest.raises(ValueError, match="draft_tokens"):
            dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long, device="meta"))
        return
    with pytest.raises(ValueError, match="draft_tokens"):
        dspark_ops.verify(torch.randn(2, 3, 5, device="cuda"), torch.zeros(2, 2, dtype=torch.long))


# ---------------------------------------------------------------------------------------------
# torch.compile / fake tensors.


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        lg = torch.empty(4, 6, 100)
        tokens, n = dspark_ops.verify(lg, torch.zeros(4, 5, dtype=torch.long), temperature=torch.ones(4))
    assert tokens.shape == (4, 6) and tokens.dtype == torch.int32 and n.shape == (4,)


@pytest.mark.parametrize("draft_vocabulary", [False, True], ids=["dense", "draft_index"])
def test_torch_compile_fullgraph(draft_vocabulary):
    def step(logits, drafts, probs, index, seed, offset):
        tokens, n = dspark_ops.verify(logits, drafts, probs, draft_index=index, seed=seed, offset=offset, top_p=0.9)
        return tokens, n + 1

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    gen = torch.Generator().manual_seed(fresh_seed())
    logits, drafts, q = random_problem(4, 3, 50, gen=gen)
    index = None
    if draft_vocabulary:
        index, q, _, drafts = random_draft_vocabulary(4, 3, 50, 20, gen=gen)
    seed, offset = torch.arange(4), torch.zeros(4, dtype=torch.long)
    got = compiled(logits, drafts, q, index, seed, offset)
    want = step(logits, drafts, q, index, seed, offset)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU).


def cuda_launches() -> list[str]:
    """The CUDA launch shapes of verify this GPU and build run (DSPARK_VERIFY_LAUNCH): the chain of positions
    per row, all positions at once, and those in 8-CTA clusters over the vocabulary (sm_90 builds on sm_90+)."""
    sm90 = torch.cuda.get_device_capability()[0] >= 9 and "90" in dspark_ops.build_info()["cuda_archs"].split(",")
    return ["chain", "positions"] + (["clusters"] if sm90 else [])


def verify_each_launch(monkeypatch, *args, **kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """verify's output under every launch shape, and with the automatic choice ("auto")."""
    outs = {}
    for launch in ["auto"] + cuda_launches():
        monkeypatch.setenv("DSPARK_VERIFY_LAUNCH", launch)
        tokens, n = dspark_ops.verify(*args, **kwargs)
        outs[launch] = (tokens.cpu(), n.cpu())
    monkeypatch.delenv("DSPARK_VERIFY_LAUNCH")
    return outs


def assert_each_launch_equals(outs, want, msg=""):
    for launch, (tokens, n) in outs.items():
        assert torch.equal(tokens, want[0]) and torch.equal(n, want[1]), f"{launch}: {msg}"


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("filters", FILTERS, ids=lambda f: str(f))
def test_cuda_matches_cpu_token_for_token(dtype, filters, monkeypatch):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 64, 5, 32000
    logits, drafts, q = random_problem(B, K, V, gen=gen, dtype=dtype)
    # drafts that often survive: q close to the target
    q = torch.softmax(logits[:, :K].float() + 0.1 * torch.randn(B, K, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen), seed=torch.randint(0, 2**62, (B,), generator=gen),
              offset=7, **filters)
    cpu = dspark_ops.verify(logits, drafts, q, **kw)
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    outs = verify_each_launch(monkeypatch, logits.cuda(), drafts.cuda(), q.cuda(), check=True, **kw_cuda)
    assert_each_launch_equals(outs, cpu)


LARGE_VOCAB_FILTERS = [{}, {"temperature": 0.0}, {"temperature": 0.8, "top_k": 50, "top_p": 0.9, "min_p": 0.01}]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("qdtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("ldtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("filters", LARGE_VOCAB_FILTERS, ids=lambda f: str(f))
def test_cuda_half_draft_probs_and_a_152k_vocabulary_match_cpu(qdtype, ldtype, filters, monkeypatch):
    """Qwen's V = 151936 with bf16 / fp16 draft probabilities read directly, at a small batch (where the
    automatic launch spreads the vocabulary over CTAs): every launch shape gives the CPU's tokens."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 6, 5, 151936
    logits = (torch.randn(B, K + 1, V, generator=gen) * 3).to(ldtype)
    q = torch.softmax(logits[:, :K].float() + 0.3 * torch.randn(B, K, V, generator=gen), -1).to(qdtype)
    drafts = torch.multinomial(q.float().reshape(-1, V), 1, generator=gen).reshape(B, K)   # from q as stored
    kw = dict(num_draft=torch.tensor([K, K, 3, 0, 1, K]), seed=torch.randint(0, 2**62, (B,), generator=gen),
              offset=torch.randint(0, 2**40, (B,), generator=gen), **filters)
    cpu = dspark_ops.verify(logits, drafts, q, **kw)
    assert int(cpu[1].min()) >= 0
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    outs = verify_each_launch(monkeypatch, logits.cuda(), drafts.cuda(), q.cuda(), **kw_cuda)
    assert_each_launch_equals(outs, cpu, f"seed {seed}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_launches_agree_on_a_large_batch(monkeypatch):
    """A batch past the GPU's SM count (the automatic launch walks chains) with rows that stop early and rows
    that reach the bonus position."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 3, 4, 4096
    logits, drafts, q = random_problem(B, K, V, gen=gen)
    q = torch.softmax(logits[:, :K] + 0.2 * torch.randn(B, K, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen), seed=torch.randint(0, 2**62, (B,), generator=gen),
              temperature=torch.rand(B, generator=gen) * 1.5, top_p=0.95)
    cpu = dspark_ops.verify(logits, drafts, q, **kw)
    assert int(cpu[1].max()) == K and int(cpu[1].min()) == 0   # both ends of the chain occur
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    outs = verify_each_launch(monkeypatch, logits.cuda(), drafts.cuda(), q.cuda(), **kw_cuda)
    assert_each_launch_equals(outs, cpu, f"seed {seed}")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("filters", FILTERS[:3], ids=lambda f: str(f))
def test_cuda_draft_index_matches_cpu_token_for_token(filters):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V, Vd = 64, 5, 32000, 4096
    logits = torch.randn(B, K + 1, V, generator=gen) * 2
    index, q, _, drafts = random_draft_vocabulary(B, K, V, Vd, gen=gen)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen), seed=torch.randint(0, 2**62, (B,), generator=gen),
              offset=3, **filters)
    cpu = dspark_ops.verify(logits, drafts, q, draft_index=index, **kw)
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = dspark_ops.verify(logits.cuda(), drafts.cuda(), q.cuda(), draft_index=index.cuda(), check=True, **kw_cuda)
    assert torch.equal(gpu[0].cpu(), cpu[0]) and torch.equal(gpu[1].cpu(), cpu[1])


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("seed_kind", ["per_row", "batch"])
def test_cuda_per_row_parameters_and_masked_logits_match_cpu(dtype, seed_kind, monkeypatch):
    """Parameters that differ per row (greedy and sampled rows mixed), -inf masks (drafts of masked ids included),
    one seed for the batch or a seed per row: the same tokens as the CPU kernel under every launch shape."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, K, V = 48, 5, 9000
    logits, _, _ = random_problem(B, K, V, gen=gen, probs=False)
    logits, mask = random_mask(logits, gen)
    q = torch.softmax(logits[:, :K].float().nan_to_num(neginf=-30.0) + 0.1 * torch.randn(B, K, V, generator=gen), -1)
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=gen).reshape(B, K)
    drafts[::4, 0] = torch.multinomial(mask[::4, 0].float() + 1e-9, 1, generator=gen)[:, 0]
    logits = logits.to(dtype)
    seeds = int(torch.randint(0, 2**62, (), generator=gen)) if seed_kind == "batch" else \
        torch.randint(0, 2**62, (B,), generator=gen)
    kw = dict(num_draft=torch.randint(0, K + 1, (B,), generator=gen), seed=seeds,
              offset=torch.randint(0, 2**40, (B,), generator=gen), **row_params(B, V, gen))
    kw_cuda = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    for probs in (q, None):
        cpu = dspark_ops.verify(logits, drafts, probs, **kw)
        gpu = verify_each_launch(monkeypatch, logits.cuda(), drafts.cuda(), None if probs is None else probs.cuda(),
                                 check=True, **kw_cuda)
        assert_each_launch_equals(gpu, cpu, f"seed {seed}")


@pytest.mark.cuda
@needs_cuda
def test_cuda_invalid_rows_are_marked_and_check_raises(monkeypatch):
    """Logit errors count only at positions the chain reaches, under every launch shape (the positions launch
    computes every position and must ignore the ones past the first rejection); a position with every id masked
    is such an error, ids merely masked are not; a drafted id out of range is an error wherever it lies within
    num_draft (checked before sampling, like the CPU)."""
    V = 10
    lg = torch.randn(9, 3, V)
    best = lg.argmax(-1)
    drafts = best[:, :2].clone()
    lg[1, 0, 3] = float("nan")                 # row 1: NaN at position 0: an error
    drafts[2, 0] = (best[2, 0] + 1) % V        # row 2: rejected at position 0 ...
    lg[2, 1, 5] = float("nan")                 # ... so the NaN at position 1 is never reached
    lg[3, 2, 0] = float("inf")                 # row 3: both drafts accepted, the bonus position is bad
    drafts[4, 1] = V + 3                       # row 4: an id out of range at position 1, reached
    lg[5, 1] = float("-inf")                   # row 5: position 1 reached with every id masked
    lg[6, :, :5] = float("-inf")               # row 6: half the ids masked: fine
    drafts[6] = lg[6, :2].argmax(-1)
    drafts[7, 0] = (best[7, 0] + 1) % V        # row 7: rejected at position 0, an id out of range after it
    drafts[7, 1] = -1
    drafts[8, 0] = (best[8, 0] + 1) % V        # row 8: rejected at position 0, every id of position 1 masked
    lg[8, 1] = float("-inf")
    valid = [0, 2, 6, 8]
    want = dspark_ops.verify(lg[valid], drafts[valid], temperature=0.0)
    for launch in ["auto"] + cuda_launches():
        monkeypatch.setenv("DSPARK_VERIFY_LAUNCH", launch)
        tokens, n = dspark_ops.verify(lg.cuda(), drafts.cuda(), temperature=0.0)
        assert n.tolist() == [2, -1, 0, -1, -1, -1, 2, -1, 0], launch
        assert torch.equal(tokens[valid].cpu(), want[0]) and int(tokens[6, 2]) >= 5, launch
        assert bool((tokens[[1, 3, 4, 5, 7]] == -1).all()), launch
        with pytest.raises(ValueError, match="row 1"):
            dspark_ops.verify(lg.cuda(), drafts.cuda(), temperature=0.0, check=True)
        with pytest.raises(ValueError, match="row 0"):
            dspark_ops.verify(lg[7:].cuda(), drafts[7:].cuda(), temperature=0.0, check=True)
    monkeypatch.setenv("DSPARK_VERIFY_LAUNCH", "sideways")
    with pytest.raises(RuntimeError, match="DSPARK_VERIFY_LAUNCH must be"):
        dspark_ops.verify(lg.cuda(), drafts.cuda())


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replay_with_offsets_updated_in_place():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, K, V = 8, 4, 5000
    logits, drafts, q = random_problem(B, K, V, gen=gen)
    logits, drafts, q = logits.cuda(), drafts.cuda(), q.cuda()
    seed = torch.arange(B, device="cuda")
    offset = torch.zeros(B, dtype=torch.long, device="cuda")
    temperature = torch.full((B,), 0.9, device="cuda")
    graph, (g_tokens, g_n) = capture(
        lambda: dspark_ops.verify(logits, drafts, q, seed=seed, offset=offset, temperature=temperature))
    for step in range(3):
        offset.fill_(step * 11)
        graph.replay()
        eager = dspark_ops.verify(logits, drafts, q, seed=seed, offset=offset, temperature=temperature)
        assert torch.equal(g_tokens, eager[0]) and torch.equal(g_n, eager[1])
