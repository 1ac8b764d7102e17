"""Test randomness: fresh seeds (printed so a failure can be replayed), the chi-square rejection level, and a
chi-square for sequentially drawn tokens.

Each statistical test states its false-alarm rate and the smallest bias it detects with probability 0.99 (the
noncentral chi-square of its statistic at that bias; scipy.stats.ncx2).

pytest shows a failing test's captured stdout, so the seed that broke it is in the report;
DSPARK_TEST_SEED=<seed> replays it.
"""
import os
import random


def fresh_seed() -> int:
    fixed = os.environ.get("DSPARK_TEST_SEED")
    s = int(fixed) if fixed else random.SystemRandom().randrange(2**31 - 1)
    print(f"seed={s}")
    return s


# Chi-square tests reject below this p-value. A broken sampler gives p far below it at the sample sizes
# used here (shifting one token's probability by 0.02 over 40k draws gives p ~ 1e-17); a correct one fails a
# run's ~25 such tests with probability ~2.5e-5, instead of ~0.25% at 1e-4 (seen in CI).
CHI2_MIN_PVALUE = 1e-6


def chi2_pvalue(counts, probs) -> float:
    """Pearson chi-square p-value of sample counts against a law; cells of probability 0 must stay empty."""
    from scipy.stats import chisquare

    obs, p = counts.double().reshape(-1), probs.double().reshape(-1)
    keep = p > 0
    assert obs[~keep].sum() == 0, "a zero-probability outcome was sampled"
    if int(keep.sum()) == 1:  # a single possible outcome: nothing to test beyond the line above
        return 1.0
    expected = p[keep] / p[keep].sum() * obs.sum()
    return float(chisquare(obs[keep].numpy(), expected.numpy()).pvalue)


class SequentialChi2:
    """Goodness of fit of tokens drawn one after another, token t from its own law probs[t] (which may depend on
    the tokens before it, as a generated sequence's conditionals do).

    Under the null hypothesis S = sum_t (onehot(y_t) - p_t) is a martingale with covariance
    C = sum_t (diag(p_t) - p_t p_t^T), so X = S^T C^+ S is chi-square with rank(C) degrees of freedom when there
    are many tokens (martingale central limit theorem). A sampler biased so that a fraction delta of all tokens
    comes out as id b instead of id a shifts S by delta * n * (e_b - e_a): ``power`` gives the probability that
    the test rejects the hardest such pair at ``alpha`` (noncentral chi-square), so a test can state, and check,
    the smallest bias it detects.
    """

    def __init__(self, tokens, probs):
        import torch

        p = probs.double()
        self._n = p.shape[0]
        self.expected = p.sum(0)
        s = torch.nn.functional.one_hot(tokens.long(), p.shape[1]).double().sum(0) - self.expected
        cov = torch.diag(self.expected) - p.T @ p
        values, vectors = torch.linalg.eigh(cov)
        kept = values > 1e-9 * float(values.max())
        self._whiten = vectors[:, kept] / values[kept].sqrt()   # C^+ = W W^T on the range of C
        self.dof = int(kept.sum())
        self.statistic = float((s @ self._whiten).pow(2).sum())

    def pvalue(self) -> float:
        from scipy.stats import chi2

        return float(chi2.sf(self.statistic, self.dof))

    def power(self, delta: float, alpha: float = CHI2_MIN_PVALUE) -> float:
        """The smallest, over the pairs of ids (a, b), probability of rejecting a sampler that emits b instead of a
        for a fraction ``delta`` of all tokens (a among the ids that make up at least that fraction)."""
        import torch
        from scipy.stats import chi2, ncx2

        n = self._n
        eye = torch.eye(len(self.expected), dtype=torch.float64)
        sources = [a for a in range(len(self.expected)) if self.expected[a] >= delta * n]
        targets = [b for b in range(len(self.expected)) if self.expected[b] > 0]
        worst = min(float((delta * n * (eye[b] - eye[a]) @ self._whiten).pow(2).sum())
                    for a in sources for b in targets if a != b)
        return float(ncx2.sf(chi2.isf(alpha, self.dof), self.dof, worst))
