"""Test randomness: fresh seeds (printed so a failure can be replayed) and the chi-square rejection level.

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
