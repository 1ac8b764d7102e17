"""Confidence scheduler: Algorithm 1 (sync, with break), async top-K, plan_capacity, profile_sps."""
from __future__ import annotations

import itertools
import json

import pytest
import torch
from scipy.stats import chisquare

import dspark_ops
from dspark_ops import reference as ref
from cuda_graphs import capture
from randomness import CHI2_MIN_PVALUE, fresh_seed

CUDA = torch.cuda.is_available()
APPENDIX_SPS = torch.tensor([0.0, 1.0, 0.5, 0.45], dtype=torch.float64)  # SPS(1) = 1.0, SPS(2) = 0.5, SPS(3) = 0.45


def _random_problem(gen, jagged: bool):
    R = int(torch.randint(1, 24, (), generator=gen))
    G = int(torch.randint(1, 9, (), generator=gen))
    c = torch.rand(R, G, generator=gen) ** 0.3
    if bool(torch.rand((), generator=gen) < 0.4):  # coarse values: many exact ties, some c = 0 and c = 1
        c = (c * 4).round() / 4
    N = int(torch.randint(1, R * (G + 1) + 4, (), generator=gen))
    sps = torch.rand(N, dtype=torch.float64, generator=gen) * 100
    if not jagged:
        sps = torch.sort(sps, descending=True).values
    return c, sps


def test_appendix_a_counterexample():
    """DSpark paper, Appendix A: R = 1, gamma = 2, a1 = 0.8, SPS(1..3) = 1.0, 0.5, 0.45."""
    for c2, retrospective in ((0.9, 2), (0.0, 0)):
        conf = torch.tensor([[0.8, c2]])
        # Algorithm 1: Theta_1 = 1.8 * 0.5 = 0.9 <= Theta_0 = 1.0, so it stops before looking at c2.
        assert dspark_ops.schedule_verify_lengths(conf, APPENDIX_SPS).tolist() == [0]
        # The retrospective global search picks l = 2 when x1 gave c2 = 0.9 (Theta_2 = 2.52 * 0.45 = 1.134), else 0.
        cap = dspark_ops.plan_capacity(conf, APPENDIX_SPS)
        assert cap.tolist() == [1 + retrospective]
        assert dspark_ops.schedule_verify_lengths(conf, APPENDIX_SPS, mode="async", capacity=cap).tolist() == \
            [retrospective]
        assert ref.schedule_verify_lengths(conf, APPENDIX_SPS).tolist() == [0]
        assert ref.plan_capacity(conf, APPENDIX_SPS).tolist() == [1 + retrospective]


def test_hand_worked_two_requests():
    # a: r0 = (0.9, 0.45), r1 = (0.6, 0.6); ranked: (0,0) 0.9, (1,0) 0.6, (1,1) 0.6, (0,1) 0.45.
    conf = torch.tensor([[0.9, 0.5], [0.6, 1.0]])
    sps = torch.tensor([0, 10, 10, 9, 8, 5, 4], dtype=torch.float64)
    # Theta: B=2: 2*10=20; B=3: 2.9*9=26.1; B=4: 3.5*8=28; B=5: 4.1*5=20.5 (break); B=6: 4.55*4=18.2.
    assert dspark_ops.schedule_verify_lengths(conf, sps).tolist() == [1, 1]
    assert dspark_ops.plan_capacity(conf, sps).tolist() == [4]
    assert dspark_ops.schedule_verify_lengths(conf, sps, mode="async", capacity=5).tolist() == [1, 2]
    assert dspark_ops.schedule_verify_lengths(conf, sps, mode="async", capacity=100).tolist() == [2, 2]
    assert dspark_ops.schedule_verify_lengths(conf, sps, mode="async", capacity=2).tolist() == [0, 0]
    assert dspark_ops.schedule_verify_lengths(conf, sps, max_len=torch.tensor([2, 0])).tolist() == [2, 0]
    # Past the table SPS is 0: nothing beyond B = 2 can improve.
    assert dspark_ops.schedule_verify_lengths(conf, sps[:3]).tolist() == [0, 0]


@pytest.mark.parametrize("jagged", [False, True])
def test_kernel_matches_reference(jagged):
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(150):
        c, sps = _random_problem(gen, jagged)
        R, G = c.shape
        max_len = torch.randint(0, G + 1, (R,), generator=gen) if bool(torch.rand((), generator=gen) < 0.5) else None
        assert torch.equal(dspark_ops.schedule_verify_lengths(c, sps, max_len=max_len),
                           ref.schedule_verify_lengths(c, sps, max_len=max_len))
        cap = dspark_ops.plan_capacity(c, sps, max_len=max_len)
        assert torch.equal(cap, ref.plan_capacity(c, sps, max_len=max_len))
        cap2 = int(torch.randint(R, R * (G + 1) + 3, (), generator=gen))
        for capacity in (cap, cap2):
            assert torch.equal(dspark_ops.schedule_verify_lengths(c, sps, mode="async", capacity=capacity, max_len=max_len),
                               ref.schedule_verify_lengths(c, sps, mode="async", capacity=capacity, max_len=max_len))


def _survival(c):
    """a_{r,j} as the kernels form it: float32 products, left to right."""
    cols, a = [], torch.ones(c.shape[0])
    for j in range(c.shape[1]):
        a = a * c[:, j]
        cols.append(a)
    return torch.stack(cols, 1)


def _admitted_set(lengths):
    return {(r, j) for r, n in enumerate(lengths.tolist()) for j in range(n)}


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_lengths_are_prefixes_of_the_ranking(mode):
    """Monotone survival: the admitted set is the top of the global ranking and, per request, a prefix."""
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(100):
        c, sps = _random_problem(gen, jagged=True)
        R, G = c.shape
        cap = int(torch.randint(R, R * (G + 1) + 3, (), generator=gen))
        lengths = dspark_ops.schedule_verify_lengths(c, sps, mode=mode, capacity=cap if mode == "async" else None)
        assert bool(((lengths >= 0) & (lengths <= G)).all())
        a = _survival(c)
        admitted = _admitted_set(lengths)
        for r, j in admitted:
            assert a[r, j] > 0
        rest = [float(a[r, j]) for r in range(R) for j in range(G) if (r, j) not in admitted and a[r, j] > 0]
        if admitted and rest:
            assert min(float(a[r, j]) for r, j in admitted) >= max(rest)


def test_async_equals_brute_force():
    """Top-(capacity - R) admission maximises expected accepted tokens over all prefix-shaped schedules of that size."""
    gen = torch.Generator().manual_seed(fresh_seed())
    R, G = 3, 3
    for _ in range(40):
        c = torch.rand(R, G, generator=gen) * 0.98 + 0.01  # distinct values: the optimum is unique
        a = torch.cumprod(c.double(), 1)
        sps = torch.ones(R * (G + 1) + 1, dtype=torch.float64)
        for capacity in range(R, R * (G + 1) + 2):
            size = min(capacity - R, R * G)
            best = max((ls for ls in itertools.product(range(G + 1), repeat=R) if sum(ls) == size),
                       key=lambda ls: sum(float(a[r, :n].sum()) for r, n in enumerate(ls)))
            got = dspark_ops.schedule_verify_lengths(c, sps, mode="async", capacity=capacity)
            assert tuple(got.tolist()) == best


def test_plan_capacity_is_the_global_argmax():
    gen = torch.Generator().manual_seed(fresh_seed())
    for _ in range(60):
        c, sps = _random_problem(gen, jagged=True)
        R = c.shape[0]
        thetas, cands = ref.schedule.admission_path(c, sps)
        cap = int(dspark_ops.plan_capacity(c, sps))
        assert thetas[cap - R] == max(thetas)
        assert all(t < max(thetas) for t in thetas[:cap - R])  # the first argmax
        sync_len = int(dspark_ops.schedule_verify_lengths(c, sps).sum())
        assert thetas[sync_len] <= thetas[cap - R]  # the early stop never beats the global search


def _appendix_simulation(trials: int, rule: str) -> torch.Tensor:
    """Appendix A as an experiment: V = {A, B}, p_t = (0.7, 0.3), p_d = (0.5, 0.5); the Markov confidence head
    gives c2 = 0.9 after x1 = A and 0 after x1 = B. Returns the first emitted token of each trial."""
    drafts, probs, _ = dspark_ops.markov_sample(torch.zeros(trials, 2, 2), torch.zeros(trials, dtype=torch.long),
                                                torch.empty(2, 0), torch.empty(0, 2), seed=torch.arange(trials))
    conf = torch.stack([torch.full((trials,), 0.8), torch.where(drafts[:, 0] == 0, 0.9, 0.0)], 1)
    lengths = torch.empty(trials, dtype=torch.int32)
    for t in range(trials):  # each trial is its own single-request step
        row = conf[t:t + 1]
        if rule == "sync":
            lengths[t] = dspark_ops.schedule_verify_lengths(row, APPENDIX_SPS)[0]
        else:  # retrospective: global argmax over the fresh confidences
            cap = dspark_ops.plan_capacity(row, APPENDIX_SPS)
            lengths[t] = dspark_ops.schedule_verify_lengths(row, APPENDIX_SPS, mode="async", capacity=cap)[0]
    target = torch.log(torch.tensor([0.7, 0.3])).expand(trials, 3, 2)
    tokens, _ = dspark_ops.verify(target, drafts, probs, num_draft=lengths, seed=torch.arange(trials) + 10**6)
    return tokens[:, 0].long()


def test_sync_rule_stays_lossless_and_retrospective_argmax_does_not():
    trials = 3000
    counts_sync = torch.bincount(_appendix_simulation(trials, "sync"), minlength=2).double()
    counts_retro = torch.bincount(_appendix_simulation(trials, "retrospective"), minlength=2).double()
    target = torch.tensor([0.7, 0.3], dtype=torch.float64) * trials
    # With the break (Algorithm 1) the first token follows p_t; without it, (0.85, 0.15) as the paper derives.
    assert chisquare(counts_sync.numpy(), target.numpy()).pvalue > CHI2_MIN_PVALUE
    assert chisquare(counts_retro.numpy(), target.numpy()).pvalue < 1e-8
    assert abs(float(counts_retro[0]) / trials - 0.85) < 0.03


def test_bad_inputs():
    sps = torch.tensor([0.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    conf = torch.tensor([[0.5, 0.4]])
    for bad in (torch.tensor([[1.5, 0.2]]), torch.tensor([[-0.1, 0.2]]), torch.tensor([[float("nan"), 0.2]])):
        with pytest.raises(RuntimeError, match="confidence"):
            dspark_ops.schedule_verify_lengths(bad, sps)
        with pytest.raises(RuntimeError, match="confidence"):
            dspark_ops.plan_capacity(bad, sps)
    with pytest.raises(ValueError, match="sps_table"):
        dspark_ops.schedule_verify_lengths(conf, torch.empty(0, dtype=torch.float64))
    with pytest.raises(ValueError, match="sps_table"):
        dspark_ops.plan_capacity(conf, [])
    with pytest.raises(RuntimeError, match="sps_table"):
        dspark_ops.schedule_verify_lengths(conf, torch.tensor([0.0, float("inf")], dtype=torch.float64))
    with pytest.raises(RuntimeError, match="sps_table"):
        dspark_ops.schedule_verify_lengths(conf, torch.tensor([0.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="capacity"):
        dspark_ops.schedule_verify_lengths(torch.rand(3, 2), sps, mode="async", capacity=2)
    with pytest.raises(RuntimeError, match="capacity"):
        dspark_ops.schedule_verify_lengths(torch.rand(3, 2), sps, mode="async", capacity=torch.tensor([2]))
    with pytest.raises(ValueError, match="capacity"):
        dspark_ops.schedule_verify_lengths(conf, sps, mode="async")
    with pytest.raises(ValueError, match="capacity"):
        dspark_ops.schedule_verify_lengths(conf, sps, capacity=3)
    with pytest.raises(ValueError, match="mode"):
        dspark_ops.schedule_verify_lengths(conf, sps, mode="greedy")
    with pytest.raises(ValueError, match="max_len"):
        dspark_ops.schedule_verify_lengths(conf, sps, max_len=3)
    with pytest.raises(RuntimeError, match="max_len"):
        dspark_ops.schedule_verify_lengths(conf, sps, max_len=torch.tensor([-1]))
    with pytest.raises(ValueError, match="confidence"):
        dspark_ops.schedule_verify_lengths(torch.rand(4), sps)


def test_torch_compile_fullgraph():
    gen = torch.Generator().manual_seed(fresh_seed())
    c = torch.rand(16, 7, generator=gen)
    sps = torch.linspace(50, 5, 200, dtype=torch.float64)

    def step(c, stale):
        cap = torch.ops.dspark.plan_capacity(stale, sps, None)
        return torch.ops.dspark.schedule_verify_lengths(c, sps, None, None), \
            torch.ops.dspark.schedule_verify_lengths(c, sps, cap, None)

    stale = torch.rand(16, 7, generator=gen)
    got = torch.compile(step, fullgraph=True)(c, stale)
    want = step(c, stale)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_profile_sps_and_json(tmp_path):
    calls = []

    def step(tokens):
        calls.append(tokens)
        torch.randn(64 * tokens, 64).sum()

    table = dspark_ops.profile_sps(step, 5, warmup=1, iters=3)
    assert table.dtype == torch.float64 and table.shape == (6,)
    assert table[0] == 0 and bool((table[1:] > 0).all()) and bool(torch.isfinite(table).all())
    assert calls == [b for b in range(1, 6) for _ in range(4)]
    path = tmp_path / "sps.json"
    dspark_ops.save_sps_table(path, table, device="cpu", model="toy")
    meta = json.loads(path.read_text())
    assert meta["model"] == "toy" and len(meta["sps"]) == 6
    assert torch.equal(dspark_ops.load_sps_table(path), table)
    path.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="SPS table"):
        dspark_ops.load_sps_table(path)
    with pytest.raises(ValueError, match="max_tokens"):
        dspark_ops.profile_sps(step, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_matches_cpu_and_graph_capture():
    gen = torch.Generator().manual_seed(fresh_seed())
    for jagged in (False, True):
        for _ in range(50):
            c, sps = _random_problem(gen, jagged)
            R, G = c.shape
            ml = torch.randint(0, G + 1, (R,), generator=gen)
            cap = int(torch.randint(R, R * (G + 1) + 3, (), generator=gen))
            for kw in (dict(), dict(mode="async", capacity=cap)):
                want = dspark_ops.schedule_verify_lengths(c, sps, max_len=ml, **kw)
                got = dspark_ops.schedule_verify_lengths(c.cuda(), sps.cuda(), max_len=ml.cuda(), check=True, **kw)
                assert torch.equal(want, got.cpu())
            assert torch.equal(dspark_ops.plan_capacity(c, sps), dspark_ops.plan_capacity(c.cuda(), sps.cuda()).cpu())
    # The production shape (R = 256, G = 7) under graph capture: plan on stale confidences, admit fresh ones.
    c, stale = torch.rand(256, 7, device="cuda"), torch.rand(256, 7, device="cuda")
    sps = torch.linspace(100, 10, 3000, dtype=torch.float64, device="cuda")
    step = lambda: (torch.ops.dspark.schedule_verify_lengths(c, sps, None, None),
                    torch.ops.dspark.schedule_verify_lengths(c, sps, torch.ops.dspark.plan_capacity(stale, sps, None),
                                                             None))
    graph, out = capture(step)
    for _ in range(3):
        c.copy_(torch.rand(256, 7, device="cuda"))
        stale.copy_(torch.rand(256, 7, device="cuda"))
        graph.replay()
        assert torch.equal(out[0].cpu(), dspark_ops.schedule_verify_lengths(c.cpu(), sps.cpu()))
        cap = dspark_ops.plan_capacity(stale.cpu(), sps.cpu())
        assert torch.equal(out[1].cpu(), dspark_ops.schedule_verify_lengths(c.cpu(), sps.cpu(), mode="async",
                                                                           capacity=cap))
    bad = c.clone()
    bad[3, 2] = 1.5
    assert bool((dspark_ops.schedule_verify_lengths(bad, sps) == -1).all())
    with pytest.raises(ValueError, match="invalid input"):
        dspark_ops.schedule_verify_lengths(bad, sps, check=True)
