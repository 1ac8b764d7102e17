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
