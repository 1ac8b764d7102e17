"""verify: agreement with the reference, losslessness (exact enumeration + chi-square), greedy,
determinism, edge cases, bad input, torch.compile, CUDA parity and graph replay."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import dspark_ops
from dspark_ops import reference
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
    vocabulary, corrections land there as often as the target says."""
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
    with pytest.raises(RuntimeError, match="draft_probs row 0"):
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
# Losslessness by exact enumeration of the acceptance rule (tiny vocabulary, tree-shaped target
# and drafter so that every conditional distribution is defined).


def _exact_rule_distribution(target, drafter, K, V, filters, one_hot):
    """Probability of each length-(K+1) token sequence when one speculative round (K drafts)
    is followed by plain target sampling for the positions the round did not emit.

    target(prefix) / drafter(prefix) give logits / probabilities for the next token. The
    acceptance arithmetic is the kernel's (fixed-point masses from reference.filtered_masses,
    accept with probability min(1, p/q), residual max(0, p - q)).
    """
    def p_of(prefix):
        m = reference.filtered_masses(target(prefix), **filters).double()
        return m / m.sum()

    def continue_target(prefix, weight, out):
        if len(prefix) == K + 1:
            out[tuple(prefix)] = out.get(tuple(prefix), 0.0) + weight
            return
        p = p_of(prefix)
        for y in range(V):
            if p[y] > 0:
                continue_target(prefix + [y], weight * float(p[y]), out)

    out = {}

    def round_from(prefix, weight):
        j = len(prefix)
        p = p_of(prefix)
        if j == K:  # all drafts accepted: bonus from p
            continue_target(prefix, weight, out)
            return
        q = drafter(prefix)
        for x in range(V):
            qx = float(q[x])
            if qx == 0:
                continue
            q_rule = torch.zeros(V, dtype=torch.float64)
            q_rule[x] = 1.0
            qv = q_rule if one_hot else q.double()
            acc = min(1.0, float(p[x]) / float(qv[x]))
            if acc > 0:
                round_from(prefix + [x], weight * qx * acc)
            residual = (p - qv).clamp(min=0)
            if residual.sum() > 0 and acc < 1:
                residual = residual / residual.sum()
                for y in range(V):
                    if residual[y] > 0:
                        continue_target(prefix + [y], weight * qx * (1 - acc) * float(residual[y]), out)

    round_from([], 1.0)
    return out


@pytest.mark.parametrize("K", [1, 2, 3])
@pytest.mark.parametrize("filters", [{}, {"top_k": 3}, {"top_p": 0.7}, {"min_p": 0.2}, {"temperature": 0.6}],
                         ids=lambda f: str(f))
@pytest.mark.parametrize("one_hot", [False, True])
def test_lossless_exact_enumeration(K, filters, one_hot):
    V = 4
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    full = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    full.update(filters)
    cache_t, cache_d = {}, {}

    def target(prefix):
        return cache_t.setdefault(tuple(prefix), torch.randn(V, generator=gen) * 1.5)

    def drafter(prefix):
        if tuple(prefix) not in cache_d:
            # one_hot: the drafter still samples from qq; the verifier is just not told qq
            qq = torch.softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 1.5, -1)
            cache_d[tuple(prefix)] = qq
        return cache_d[tuple(prefix)]

    spec = _exact_rule_distribution(target, drafter, K, V, full, one_hot)

    def target_joint(prefix, w, out):
        if len(prefix) == K + 1:
            out[tuple(prefix)] = w
            return
        m = reference.filtered_masses(target(prefix), **full).double()
        p = m / m.sum()
        for y in range(V):
            if p[y] > 0:
                target_joint(prefix + [y], w * float(p[y]), out)

    exact = {}
    target_joint([], 1.0, exact)
    keys = set(spec) | set(exact)
    err = max(abs(spec.get(k, 0.0) - exact.get(k, 0.0)) for k in keys)
    assert abs(sum(spec.values()) - 1.0) < 1e-9
    assert err < 1e-9, f"seed {seed}: max |P_spec - P_target| = {err}"


# ---------------------------------------------------------------------------------------------
# Losslessness of the kernel itself, by sampling (chi-square on many seeded rows in one call).


@pytest.mark.parametrize("case", ["probs", "one_hot", "ragged", "top_k", "top_p", "min_p", "all_filters"])
def test_kernel_first_two_tokens_follow_target(case):
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
    """Keeping the draft distribution accepts more than treating drafts as argmax (vLLM #41044)."""
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
    with pytest.raises(RuntimeError, match="draft_probs row 1"):
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

BAD_CALLS = {
    "rank": ("target_logits", lambda: dspark_ops.verify(torch.randn(4, 5), torch.zeros(4, 4, dtype=torch.long))),
    "int_logits": ("target_logits", lambda: dspark_ops.verify(torch.zeros(2, 3, 5, dtype=torch.long),
                                                             torch.zeros(2, 2, dtype=torch.long))),
    "draft_shape": ("draft_tokens", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long))),
    "draft_float": ("draft_tokens", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2))),
    "probs_shape": ("draft_probs", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                             torch.rand(2, 2, 4))),
    "id_high": ("draft_tokens", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.full((2, 2), 5))),
    "id_negative": ("draft_tokens", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.full((2, 2), -3))),
    "id_huge": ("draft_tokens", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.full((2, 2), 2**33 + 1))),
    "nan": ("target_logits", lambda: dspark_ops.verify(
        torch.tensor([[[0.0, float("nan"), 1.0]] * 2]), torch.zeros(1, 1, dtype=torch.long))),
    "inf": ("target_logits", lambda: dspark_ops.verify(
        torch.tensor([[[0.0, float("inf"), 1.0]] * 2]), torch.zeros(1, 1, dtype=torch.long), temperature=0.0)),
    "neg_temp": ("temperature", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                          temperature=-1.0)),
    "neg_temp_tensor": ("temperature", lambda: dspark_ops.verify(
        torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long), temperature=torch.tensor([1.0, -0.5]))),
    "top_p_zero": ("top_p", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                      top_p=0.0)),
    "top_p_big": ("top_p", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                     top_p=1.5)),
    "min_p": ("min_p", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                 min_p=-0.1)),
    "num_draft": ("num_draft", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                         num_draft=3)),
    "index_shape": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                             torch.rand(2, 2, 3), draft_index=torch.zeros(4, dtype=torch.int32))),
    "index_float": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                             torch.rand(2, 2, 3), draft_index=torch.zeros(5))),
    "index_high": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                            torch.rand(2, 2, 3), draft_index=torch.full((5,), 3))),
    "index_low": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                           torch.rand(2, 2, 3), draft_index=torch.full((5,), -2))),
    "index_huge": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                            torch.rand(2, 2, 3), draft_index=torch.full((5,), -2**40))),
    "index_not_one_to_one": ("draft_index", lambda: dspark_ops.verify(
        torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 2, 3),
        draft_index=torch.tensor([0, 1, 1, -1, 2], dtype=torch.int32))),
    "index_no_probs": ("draft_index", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                                draft_index=torch.zeros(5, dtype=torch.int32))),
    "index_probs_shape": ("draft_probs", lambda: dspark_ops.verify(
        torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long), torch.rand(2, 3, 3),
        draft_index=torch.zeros(5, dtype=torch.int32))),
    "seed_shape": ("seed", lambda: dspark_ops.verify(torch.randn(2, 3, 5), torch.zeros(2, 2, dtype=torch.long),
                                                     seed=torch.zeros(3, dtype=torch.long))),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_names_the_argument(name):
    arg, call = BAD_CALLS[name]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=arg):
        call()


def test_raw_op_bad_input_raises_not_crashes():
    """The registered op checks its own arguments (callers may bypass the wrapper); run in a subprocess."""
    code = textwrap.dedent("""
        import torch, dspark_ops
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
        cases = [
            lambda: call(lg, torch.full((B, K), 99, dtype=torch.int32)),
            lambda: call(lg, torch.full((B, K), -7, dtype=torch.int32)),
            lambda: call(lg, d.long()),
            lambda: call(lg, d, num_draft=torch.full((B,), 9, dtype=torch.int32)),
            lambda: call(lg, d, num_draft=torch.full((B,), -1, dtype=torch.int32)),
            lambda: call(lg, d, torch.rand(B, K, V + 1)),
            lambda: call(lg, d, seed=torch.zeros(B)),
            lambda: call(lg, d, top_k=torch.zeros(B + 1, dtype=torch.int32)),
            lambda: call(lg.transpose(1, 2), d),
            lambda: call(lg, d, torch.rand(B, K, 3), torch.full((V,), 3, dtype=torch.int32)),
            lambda: call(lg, d, torch.rand(B, K, 3), torch.full((V,), -9, dtype=torch.int32)),
            lambda: call(lg, d, torch.rand(B, K, 3), torch.zeros(V, dtype=torch.long)),
            lambda: call(lg, d, torch.rand(B, K, 3), torch.zeros(V + 1, dtype=torch.int32)),
            lambda: call(lg, d, torch.rand(B, K, 3), torch.tensor([0, 0, -1, -1, -1], dtype=torch.int32)),
            lambda: call(lg, d, None, torch.zeros(V, dtype=torch.int32)),
            lambda: call(lg, d, torch.rand(B, K, 3)),
        ]
        for i, c in enumerate(cases):
            try:
                c()
            except RuntimeError as e:
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
def test_cuda_invalid_rows_are_marked_and_check_raises(monkeypatch):
    """Errors count only at positions the chain reaches, under every launch shape (the positions launch
    computes every position and must ignore the ones past the first rejection)."""
    V = 10
    lg = torch.randn(5, 3, V)
    best = lg.argmax(-1)
    drafts = best[:, :2].clone()
    lg[1, 0, 3] = float("nan")                 # row 1: NaN at position 0: an error
    drafts[2, 0] = (best[2, 0] + 1) % V        # row 2: rejected at position 0 ...
    lg[2, 1, 5] = float("nan")                 # ... so the NaN at position 1 is never reached
    lg[3, 2, 0] = float("inf")                 # row 3: both drafts accepted, the bonus position is bad
    drafts[4, 1] = V + 3                       # row 4: an id out of range at position 1, reached
    for launch in ["auto"] + cuda_launches():
        monkeypatch.setenv("DSPARK_VERIFY_LAUNCH", launch)
        tokens, n = dspark_ops.verify(lg.cuda(), drafts.cuda(), temperature=0.0)
        assert n.tolist() == [2, -1, 0, -1, -1], launch
        assert tokens[0].tolist() == best[0].tolist() and tokens[2].tolist() == [int(best[2, 0]), -1, -1], launch
        assert bool((tokens[[1, 3, 4]] == -1).all()), launch
        with pytest.raises(ValueError, match="row 1"):
            dspark_ops.verify(lg.cuda(), drafts.cuda(), temperature=0.0, check=True)
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
