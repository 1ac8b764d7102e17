"""markov_sample: kernel == reference, exact sampling law, greedy, r = 0, confidence head, lossless with verify."""
from __future__ import annotations

import pytest
import torch

import dspark_ops
from dspark_ops import reference as ref
from cuda_graphs import capture
from randomness import CHI2_MIN_PVALUE, chi2_pvalue, fresh_seed

CUDA = torch.cuda.is_available()


def _problem(gen, B, G, V, r, H=0, dtype=torch.float32, scale=2.0):
    U = (torch.randn(B, G, V, generator=gen) * scale).to(dtype)
    w1 = (torch.randn(V, r, generator=gen) * 0.6).to(dtype)
    w2 = (torch.randn(r, V, generator=gen) * 0.6).to(dtype)
    anchor = torch.randint(0, V, (B,), generator=gen)
    hidden = torch.randn(B, G, H, generator=gen).to(dtype) if H else None
    return U, anchor, w1, w2, hidden


def _exact_step(U_k: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, prev: int, T: float) -> torch.Tensor:
    """softmax((U_k + w1[prev] @ w2) / T) in float64: the law the kernel must sample from."""
    z = U_k.double() + w1[prev].double() @ w2.double()
    return torch.softmax(z / T, dim=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("V,r,H", [(37, 5, 9), (150, 3, 0), (70, 0, 4)])
def test_matches_reference(dtype, V, r, H):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G = 6, 3  # 6 rows: one 4-row register block + two single rows; V: full 64-column tiles + tail
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H, dtype)
    conf_w = torch.randn(H + r, generator=gen) * 0.3
    kw = dict(hidden=hidden, conf_weight=conf_w, conf_bias=0.25, conf_temperature=torch.tensor([1.0, 1.7, 0.6]),
              temperature=torch.tensor([1.0, 0.0, 0.7, 1.3, 1.0, 0.0]), seed=torch.randint(0, 2**62, (B,), generator=gen),
              offset=torch.randint(0, 2**40, (B,), generator=gen))
    tokens, probs, conf = dspark_ops.markov_sample(U, anchor, w1, w2, **kw)
    r_tokens, r_probs, r_conf = ref.markov_sample(U, anchor, w1, w2, **kw)
    assert torch.equal(tokens, r_tokens)
    assert torch.equal(probs, r_probs)
    assert torch.equal(conf, r_conf)
    # Each token was drawn from its row of draft_probs (positive), which is a distribution.
    assert bool((probs.gather(2, tokens.long().unsqueeze(2)) > 0).all())
    torch.testing.assert_close(probs.double().sum(-1), torch.ones(B, G, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])])
def test_previous_tokens_from_a_larger_vocabulary(device):
    """A draft vocabulary: the logits cover K drawable ids that come first in w1's V_prev > K rows, and the
    anchor may be any of the V_prev ids. Same tokens, probs and confidences as the reference."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, K, V_prev, r, H = 5, 4, 70, 113, 6, 8
    U, _, _, w2, hidden = _problem(gen, B, G, K, r, H)
    w1 = torch.randn(V_prev, r, generator=gen) * 0.6
    anchor = torch.tensor([0, K - 1, K, V_prev - 1, 90])  # drawable ids and ids only the anchor can be
    kw = dict(hidden=hidden, conf_weight=torch.randn(H + r, generator=gen), conf_bias=0.1,
              temperature=torch.tensor([1.0, 0.0, 0.6, 1.2, 0.0]), seed=torch.randint(0, 2**62, (B,), generator=gen))
    want = ref.markov_sample(U, anchor, w1, w2, **kw)
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    got = dspark_ops.markov_sample(on(U), on(anchor), on(w1), on(w2), **{k: on(v) for k, v in kw.items()})
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    assert int(want[0].max()) < K
    with pytest.raises(ValueError, match=r"anchor\[1\] = 113 is outside \[0, 113\)"):
        dspark_ops.markov_sample(U, torch.tensor([0, V_prev, 1, 2, 3]), w1, w2)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")])])
def test_per_step_confidence_bias(device):
    """conf_bias [G] (calibrated offsets folded in): step k uses bias k, as in the reference; the tokens do not
    depend on the confidence head."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r, H = 5, 4, 53, 6, 7
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H)
    bias = torch.randn(G, generator=gen)
    kw = dict(hidden=hidden, conf_weight=torch.randn(H + r, generator=gen) * 0.4, conf_bias=bias,
              conf_temperature=torch.linspace(0.7, 1.9, G), temperature=torch.tensor([1.0, 0.0, 0.6, 1.2, 1.0]),
              seed=torch.randint(0, 2**62, (B,), generator=gen))
    want = ref.markov_sample(U, anchor, w1, w2, **kw)
    on = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    got = dspark_ops.markov_sample(on(U), on(anchor), on(w1), on(w2), **{k: on(v) for k, v in kw.items()})
    for a, b in zip(got, want):
        assert torch.equal(a.cpu(), b)
    # Step k alone: the same as a shared bias equal to bias[k].
    for k in range(G):
        shared = dspark_ops.markov_sample(on(U), on(anchor), on(w1), on(w2),
                                          **{**{n: on(v) for n, v in kw.items()}, "conf_bias": float(bias[k])})
        assert torch.equal(shared[0], got[0]) and torch.equal(shared[2][:, k], got[2][:, k])
    with pytest.raises(ValueError, match="conf_bias"):
        dspark_ops.markov_sample(U, anchor, w1, w2, **{**kw, "conf_bias": torch.zeros(G - 1)})


def test_return_flags_and_determinism():
    gen = torch.Generator().manual_seed(fresh_seed())
    U, anchor, w1, w2, _ = _problem(gen, 3, 4, 40, 4)
    seed = torch.randint(0, 2**62, (3,), generator=gen)
    t1, p1, c1 = dspark_ops.markov_sample(U, anchor, w1, w2, seed=seed)
    t2, p2, c2 = dspark_ops.markov_sample(U, anchor, w1, w2, seed=seed, return_probs=False)
    assert p2 is None and c1 is None and c2 is None
    assert torch.equal(t1, t2)  # draft_probs are an output only: they never change the draw
    t3, _, _ = dspark_ops.markov_sample(U, anchor, w1, w2, seed=seed, offset=1)
    assert not torch.equal(t1, t3)  # a new offset is a new stream (V = 40, 12 tokens: a tie has odds ~1e-8)


def test_bf16_weights_of_bf16_values_give_identical_results():
    """fp32 logits with bf16 W1/W2 holding the same values as fp32 ones: bit-identical drafts, probs and
    confidences (the engine keeps a bf16 checkpoint's Markov head in bf16 for half the W2 traffic)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r, H = 3, 6, 300, 8, 16
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H)
    w1, w2 = w1.to(torch.bfloat16), w2.to(torch.bfloat16)
    cw, cb = torch.randn(H + r, generator=gen), torch.randn((), generator=gen)
    seed = torch.randint(0, 2**62, (B,), generator=gen)
    for T in (0.0, 0.8):
        kw = dict(temperature=T, seed=seed, hidden=hidden, conf_weight=cw, conf_bias=cb)
        narrow = dspark_ops.markov_sample(U, anchor, w1, w2, **kw)
        wide = dspark_ops.markov_sample(U, anchor, w1.float(), w2.float(), **kw)
        for a, b in zip(narrow, wide):
            assert torch.equal(a, b), T


def test_joint_distribution_chi_square():
    """The empirical law of (x1, x2) and of (x2, x3) over seeded rows equals the Markov-conditioned softmaxes.
    Chi-square over 36 pairs, N = 30000: false alarm < 1e-6 each; a bias moving 0.007 of probability between two
    pairs of probability 1/36 is detected with probability 0.99."""
    gen = torch.Generator().manual_seed(fresh_seed())
    N, G, V, r, T = 30000, 3, 6, 2, 0.8
    U1, a1, w1, w2, _ = _problem(gen, 1, G, V, r, scale=1.0)
    w1, w2 = w1 * 1.5, w2 * 1.5
    U = U1.expand(N, G, V)
    anchor = a1.expand(N)
    tokens, probs, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=T, seed=torch.arange(N) * 7919 + 3)
    a = int(a1[0])
    p1 = _exact_step(U1[0, 0], w1, w2, a, T)
    p2 = torch.stack([_exact_step(U1[0, 1], w1, w2, x, T) for x in range(V)])  # [x1, x2]
    p3 = torch.stack([_exact_step(U1[0, 2], w1, w2, x, T) for x in range(V)])
    joint12 = p1[:, None] * p2
    joint23 = joint12.sum(0)[:, None] * p3
    x = tokens.long()
    obs12 = torch.bincount(x[:, 0] * V + x[:, 1], minlength=V * V)
    obs23 = torch.bincount(x[:, 1] * V + x[:, 2], minlength=V * V)
    assert chi2_pvalue(obs12, joint12) > CHI2_MIN_PVALUE
    assert chi2_pvalue(obs23, joint23) > CHI2_MIN_PVALUE
    # draft_probs at step 2 is the conditional law given the sampled x1.
    torch.testing.assert_close(probs[:, 1].double(), p2[x[:, 0]], atol=1e-6, rtol=0)


def _masked(U, gen):
    """U with -inf on about a third of the ids of every step (at least one left)."""
    mask = torch.rand(U.shape, generator=gen) < 0.35
    mask.scatter_(-1, torch.randint(0, U.shape[-1], U.shape[:-1] + (1,), generator=gen), False)
    return U.masked_fill(mask, float("-inf")), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("seed_kind", ["per_row", "batch"])
def test_masked_ids_are_never_drawn_and_rows_match_alone(dtype, seed_kind):
    """-inf base logits mask ids: they are never drawn (sampled or greedy), draft_probs is 0 there, and the kernel
    equals the reference, with a seed per row or one seed for the batch. With a seed per row, every row equals
    the row sampled alone with its own temperature and seed (a kernel reading another row's parameters fails)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, G, V, r, H = 9, 4, 70, 5, 6
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H)
    U, mask = _masked(U, gen)
    U = U.to(dtype)
    seeds = torch.randint(0, 2**62, (B,), generator=gen) if seed_kind == "per_row" else \
        int(torch.randint(0, 2**62, (), generator=gen))
    temperature = torch.where(torch.rand(B, generator=gen) < 0.3, 0.0, 0.3 + 1.4 * torch.rand(B, generator=gen))
    kw = dict(hidden=hidden, conf_weight=torch.randn(H + r, generator=gen) * 0.3, temperature=temperature,
              seed=seeds, offset=torch.randint(0, 2**40, (B,), generator=gen))
    tokens, probs, conf = dspark_ops.markov_sample(U, anchor, w1, w2, **kw)
    want = ref.markov_sample(U, anchor, w1, w2, **kw)
    assert torch.equal(tokens, want[0]) and torch.equal(probs, want[1]) and torch.equal(conf, want[2]), f"seed {seed}"
    drawn = mask.gather(2, tokens.long().unsqueeze(2))
    assert not bool(drawn.any()) and bool((probs[mask] == 0).all()), f"seed {seed}"
    if seed_kind == "per_row":
        for b in range(B):
            alone = dspark_ops.markov_sample(U[b:b + 1], anchor[b:b + 1], w1, w2, hidden=hidden[b:b + 1],
                                             conf_weight=kw["conf_weight"], temperature=float(temperature[b]),
                                             seed=int(seeds[b]), offset=int(kw["offset"][b]))
            for a, w in zip(alone, (tokens, probs, conf)):
                assert torch.equal(a[0], w[b]), f"seed {seed}, row {b}"


def test_one_seed_gives_every_row_its_own_stream():
    """seed as one number: 20000 copies of one row draw independently (their first two tokens follow the
    Markov-conditioned softmaxes, chi-square), as the reference does; a [B] tensor of equal seeds gives equal
    rows; row 0 of a batch seed is the row sampled alone with it. False alarm < 1e-6; a bias moving 0.0095 of
    probability between two pairs of probability 0.04 is detected with probability 0.99."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    N, G, V, r, T = 20000, 2, 5, 3, 0.9
    U1, a1, w1, w2, _ = _problem(gen, 1, G, V, r, scale=1.0)
    U, anchor = U1.expand(N, G, V), a1.expand(N)
    s = int(torch.randint(0, 2**62, (), generator=gen))
    tokens, _, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=T, seed=s, offset=5)
    assert torch.equal(tokens[:64], ref.markov_sample(U[:64], anchor[:64], w1, w2, temperature=T, seed=s, offset=5)[0])
    p1 = _exact_step(U1[0, 0], w1, w2, int(a1[0]), T)
    joint = p1[:, None] * torch.stack([_exact_step(U1[0, 1], w1, w2, x, T) for x in range(V)])
    x = tokens.long()
    assert chi2_pvalue(torch.bincount(x[:, 0] * V + x[:, 1], minlength=V * V), joint) > CHI2_MIN_PVALUE, f"seed {seed}"
    same, _, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=T, seed=torch.full((N,), s), offset=5)
    assert bool((same == same[0]).all()) and torch.equal(same[0], tokens[0])
    alone, _, _ = dspark_ops.markov_sample(U[:1], anchor[:1], w1, w2, temperature=T, seed=torch.tensor(s), offset=5)
    assert torch.equal(alone[0], tokens[0])


def test_greedy_is_deterministic_argmax():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r = 5, 4, 90, 6
    U, anchor, w1, w2, _ = _problem(gen, B, G, V, r)
    U[0, 0, 10] = U[0, 0, 20] = 1e4  # a tie in the first step of row 0: the lower id wins
    w2[:, 20] = w2[:, 10]
    t1, p1, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=0.0, seed=1)
    t2, p2, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=0.0, seed=12345, offset=99)
    assert torch.equal(t1, t2) and torch.equal(p1, p2)
    assert int(t1[0, 0]) == 10
    for b in range(B):
        prev = int(anchor[b])
        for k in range(G):
            z = ref.markov.markov_logits(U[b, k], w1[prev], w2)
            assert int(t1[b, k]) == int(torch.argmax(z))
            prev = int(t1[b, k])
    assert torch.equal(p1, torch.nn.functional.one_hot(t1.long(), V).float())


def test_rank_zero_is_independent_per_position():
    """r = 0 (DFlash): each position samples softmax(U_k / T) alone; the anchor and earlier tokens do not matter.
    Chi-square over 25 pairs, N = 20000: false alarm < 1e-6; detects (probability 0.99) a bias moving 0.0095 of
    probability between two pairs of probability 0.04."""
    gen = torch.Generator().manual_seed(fresh_seed())
    N, G, V, T = 20000, 2, 5, 1.2
    U1 = torch.randn(1, G, V, generator=gen)
    w1, w2 = torch.empty(V, 0), torch.empty(0, V)
    seeds = torch.arange(N) + 17
    t_a, p_a, _ = dspark_ops.markov_sample(U1.expand(N, G, V), torch.zeros(N, dtype=torch.long), w1, w2,
                                           temperature=T, seed=seeds)
    t_b, p_b, _ = dspark_ops.markov_sample(U1.expand(N, G, V), torch.full((N,), V - 1), w1, w2,
                                           temperature=T, seed=seeds)
    assert torch.equal(t_a, t_b) and torch.equal(p_a, p_b)
    for k in range(G):
        marginal = torch.softmax(U1[0, k].double() / T, -1)
        torch.testing.assert_close(p_a[0, k].double(), marginal, atol=1e-6, rtol=0)
    x = t_a.long()
    joint = torch.softmax(U1[0, 0].double() / T, -1)[:, None] * torch.softmax(U1[0, 1].double() / T, -1)[None, :]
    assert chi2_pvalue(torch.bincount(x[:, 0] * V + x[:, 1], minlength=V * V), joint) > CHI2_MIN_PVALUE


def test_confidence_formula():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r, H = 4, 3, 50, 8, 24
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H)
    w = torch.randn(H + r, generator=gen) * 0.2
    temps = torch.tensor([1.0, 2.0, 0.5])
    tokens, _, conf = dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden, conf_weight=w, conf_bias=-0.4,
                                               conf_temperature=temps, seed=3)
    prev = torch.cat([anchor[:, None], tokens[:, :-1].long()], 1)  # x_{k-1}
    feats = torch.cat([hidden.double(), w1.double()[prev]], -1)  # [B, G, H + r]
    expected = torch.sigmoid(((feats @ w.double()) - 0.4) / temps.double())
    torch.testing.assert_close(conf.double(), expected, atol=1e-6, rtol=1e-5)
    # No hidden states: the head sees only the Markov feature w1[x_{k-1}].
    _, _, conf2 = dspark_ops.markov_sample(U, anchor, w1, w2, conf_weight=w[H:], conf_bias=0.1, seed=3)
    torch.testing.assert_close(conf2.double(), torch.sigmoid(w1.double()[prev] @ w[H:].double() + 0.1),
                               atol=1e-6, rtol=1e-5)


def _target_logits(Tm: torch.Tensor, anchor: torch.Tensor, drafts: torch.Tensor) -> torch.Tensor:
    """A first-order toy target: the logits after token x are Tm[x]; [B, K+1, V] for the anchor then the drafts."""
    ctx = torch.cat([anchor[:, None].long(), drafts.long()], 1)
    return Tm[ctx]


def test_lossless_end_to_end_with_verify():
    """Draft with markov_sample, verify with verify: the first two emitted tokens follow the target's law.
    Chi-square over 25 pairs, N = 24000: false alarm < 1e-6; detects (probability 0.99) a bias moving 0.0087 of
    probability between two pairs of probability 0.04."""
    gen = torch.Generator().manual_seed(fresh_seed())
    N, G, V = 24000, 3, 5
    Tm = torch.randn(V, V, generator=gen) * 1.2  # target: p_t(. | prev) = softmax(Tm[prev])
    # A drafter close to the target (w1 @ w2 ~ Tm, rank r = V) but not equal to it, plus a small base term.
    U = (torch.randn(1, G, V, generator=gen) * 0.3).expand(N, G, V)
    w1 = Tm + torch.randn(V, V, generator=gen) * 0.4
    w2 = torch.eye(V) + torch.randn(V, V, generator=gen) * 0.1
    anchor = torch.full((N,), 2)
    seeds = torch.arange(N) * 104729 + 11

    def emit(anchor, offset):
        drafts, probs, _ = dspark_ops.markov_sample(U, anchor, w1, w2, temperature=0.9, seed=seeds, offset=offset)
        out, n_acc = dspark_ops.verify(_target_logits(Tm, anchor, drafts), drafts, probs, seed=seeds, offset=offset)
        return out, n_acc

    out1, n1 = emit(anchor, 0)
    y1 = out1[:, 0].long()
    # Rows that emitted one token continue from it; the second token is the first one of the next round.
    out2, _ = emit(y1.to(torch.int32), 1)
    y2 = torch.where(n1 >= 1, out1[:, 1].long(), out2[:, 0].long())
    pt = torch.softmax(Tm.double(), -1)
    joint = pt[2][:, None] * pt  # p(y1 | anchor) p(y2 | y1)
    assert chi2_pvalue(torch.bincount(y1 * V + y2, minlength=V * V), joint) > CHI2_MIN_PVALUE
    # The drafts are mostly accepted and sometimes rejected: both branches of verify are exercised.
    assert 0.5 < float(n1.float().mean()) < G


def test_bad_inputs():
    gen = torch.Generator().manual_seed(fresh_seed())
    U, anchor, w1, w2, hidden = _problem(gen, 2, 3, 20, 4, H=5)
    with pytest.raises(ValueError, match="w2"):
        dspark_ops.markov_sample(U, anchor, w1, w2[:, :-1])
    with pytest.raises(ValueError, match="w1"):
        dspark_ops.markov_sample(U, anchor, w1[:-1], w2)
    with pytest.raises(TypeError, match="w1 and w2"):
        dspark_ops.markov_sample(U, anchor, w1, w2.half())
    with pytest.raises(ValueError, match=r"anchor\[1\] = 20 is outside \[0, 20\)"):
        dspark_ops.markov_sample(U, torch.tensor([0, 20]), w1, w2)
    with pytest.raises(ValueError, match=r"anchor\[0\] = -1 is outside"):
        dspark_ops.markov_sample(U, torch.tensor([-1, 0]), w1, w2)
    with pytest.raises(ValueError, match="anchor"):
        dspark_ops.markov_sample(U, anchor[:1], w1, w2)
    with pytest.raises(ValueError, match="temperature"):
        dspark_ops.markov_sample(U, anchor, w1, w2, temperature=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        dspark_ops.markov_sample(U, anchor, w1, w2, temperature=torch.tensor([1.0, float("nan")]))
    bad = U.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"row 1 has NaN or \+inf"):
        dspark_ops.markov_sample(bad, anchor, w1, w2)
    bad[1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"row 1 has NaN or \+inf"):
        dspark_ops.markov_sample(bad, anchor, w1, w2, temperature=0.0)
    bad[1, 2] = float("-inf")
    with pytest.raises(ValueError, match="row 1 masks every id"):
        dspark_ops.markov_sample(bad, anchor, w1, w2)
    with pytest.raises(ValueError, match=r"seed must have shape \[2\] \(a seed per row\) or \[1\]"):
        dspark_ops.markov_sample(U, anchor, w1, w2, seed=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="conf_weight"):
        dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden, conf_weight=torch.randn(5))
    with pytest.raises(ValueError, match="hidden"):
        dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden)
    with pytest.raises(ValueError, match="conf_temperature"):
        dspark_ops.markov_sample(U, anchor, w1, w2, conf_weight=torch.randn(4), conf_temperature=0.0)
    with pytest.raises(ValueError, match=r"conf_temperature\[1\] = -1 must be finite and > 0"):
        dspark_ops.markov_sample(U, anchor, w1, w2, conf_weight=torch.randn(4),
                                 conf_temperature=torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(TypeError, match="base_logits"):
        dspark_ops.markov_sample(U.double(), anchor, w1, w2)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(fresh_seed())
    U, anchor, w1, w2, _ = _problem(gen, 3, 3, 30, 4)
    temperature = torch.tensor([1.0, 0.5, 0.0])
    seed = torch.tensor([1, 2, 3])
    offset = torch.zeros(3, dtype=torch.long)

    def fn(U, anchor, w1, w2):
        return torch.ops.dspark.markov_sample(U, anchor.int(), w1, w2, None, None, None, None, temperature, seed,
                                              offset, True)

    compiled = torch.compile(fn, fullgraph=True)
    got = compiled(U, anchor, w1, w2)
    want = fn(U, anchor, w1, w2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(dtype):
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r, H = 5, 7, 3001, 16, 32
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H, dtype)
    kw = dict(conf_weight=torch.randn(H + r, generator=gen) * 0.1, conf_bias=0.2,
              conf_temperature=torch.linspace(0.8, 1.6, G), temperature=torch.tensor([1.0, 0.0, 0.6, 1.0, 2.0]),
              seed=torch.randint(0, 2**62, (B,), generator=gen), offset=torch.randint(0, 9, (B,), generator=gen))
    cpu = dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden, **kw)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = dspark_ops.markov_sample(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), hidden=hidden.cuda(), check=True,
                                   **dev)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("seed_kind", ["per_row", "batch"])
def test_cuda_masked_logits_and_batch_seed_match_cpu(seed_kind):
    """-inf masks, temperatures that differ per row (greedy rows among them), one seed for the batch or a seed
    per row: the tokens, draft_probs and confidences of the CPU kernel."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    B, G, V, r, H = 6, 5, 3001, 8, 16
    U, anchor, w1, w2, hidden = _problem(gen, B, G, V, r, H, torch.bfloat16)
    U, _ = _masked(U, gen)
    seeds = torch.randint(0, 2**62, (B,), generator=gen) if seed_kind == "per_row" else 12345
    kw = dict(conf_weight=torch.randn(H + r, generator=gen) * 0.1, seed=seeds,
              temperature=torch.tensor([1.0, 0.0, 0.6, 1.0, 2.0, 0.0]), offset=torch.randint(0, 9, (B,), generator=gen))
    cpu = dspark_ops.markov_sample(U, anchor, w1, w2, hidden=hidden, **kw)
    dev = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    gpu = dspark_ops.markov_sample(U.cuda(), anchor.cuda(), w1.cuda(), w2.cuda(), hidden=hidden.cuda(), check=True,
                                   **dev)
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu()), f"seed {seed}"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_row_errors():
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, r = 4, 5, 2000, 8
    U, anchor, w1, w2, _ = _problem(gen, B, G, V, r)
    U, anchor, w1, w2 = U.cuda(), anchor.cuda().int(), w1.cuda(), w2.cuda()
    seed = torch.arange(B, device="cuda")
    offset = torch.zeros(B, dtype=torch.long, device="cuda")
    temperature = torch.ones(B, device="cuda")
    run = lambda: torch.ops.dspark.markov_sample(U, anchor, w1, w2, None, None, None, None, temperature, seed,
                                                 offset, True)
    graph, out = capture(run)
    for step in range(3):
        offset.fill_(step)
        graph.replay()
        want = dspark_ops.markov_sample(U.cpu(), anchor.cpu(), w1.cpu(), w2.cpu(), seed=seed.cpu(), offset=step)
        assert torch.equal(out[0].cpu(), want[0]) and torch.equal(out[1].cpu(), want[1])
    bad_anchor = anchor.clone()
    bad_anchor[2] = V
    tokens, _, _ = dspark_ops.markov_sample(U, bad_anchor, w1, w2)
    assert bool((tokens[2] == -1).all()) and bool((tokens[[0, 1, 3]] >= 0).all())
    with pytest.raises(ValueError, match="row 2"):
        dspark_ops.markov_sample(U, bad_anchor, w1, w2, check=True)
    masked = U.clone()
    masked[1, 3] = float("-inf")      # every id of row 1's step 3 masked
    masked[3, :, :V // 2] = float("-inf")   # half the ids of row 3: not an error
    tokens, _, _ = dspark_ops.markov_sample(masked, anchor, w1, w2)
    assert bool((tokens[1] == -1).all()) and bool((tokens[[0, 2, 3]] >= 0).all())
    assert bool((tokens[3] >= V // 2).all())
    with pytest.raises(ValueError, match="row 1"):
        dspark_ops.markov_sample(masked, anchor, w1, w2, check=True)
