// Counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//
// Every random number in dspark_ops is a pure function of
// (seed, stream, offset, position, purpose), so results do not depend on launch
// shape, thread count or device, and CUDA-graph replay draws fresh numbers by
// updating `offset` in place. `stream` separates rows that share one seed: under
// a batch seed row b draws from stream b (as FlashInfer keys its Philox
// subsequence by row), so duplicated rows still sample independently; a row
// with a seed of its own draws from stream 0, so its result depends on its
// seed and offset only, not on the rest of the batch.
#pragma once
#include "dspark/common.h"

namespace dspark {

// What a random number is for. Distinct purposes never share a counter.
enum class Purpose : uint32_t {
  kVerifyAccept = 1,   // uniform for the accept test of draft j
  kVerifySample = 2,   // 64 random bits choosing the emitted (residual/bonus) token
  kMarkovSample = 3,   // 64 random bits choosing a drafted token in markov_sample
};

struct Philox4 {
  uint32_t v[4];
};

DSPARK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

DSPARK_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t key0, uint32_t key1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(kM0, ctr.v[0], &hi0);
    const uint32_t lo1 = mulhilo32(kM1, ctr.v[2], &hi1);
    ctr = Philox4{{hi1 ^ ctr.v[1] ^ key0, lo1, hi0 ^ ctr.v[3] ^ key1, lo0}};
    key0 += kW0;
    key1 += kW1;
  }
  return ctr;
}

// The four words for (seed, stream, offset, position, purpose); position < 2^24 (a block position).
DSPARK_HD Philox4 random_words(uint64_t seed, uint32_t stream, uint64_t offset, uint32_t position,
                               Purpose purpose) {
  const Philox4 ctr{{stream, (static_cast<uint32_t>(purpose) << 24) | (position & 0xFFFFFFu),
                     static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)}};
  return philox4x32_10(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// A uniform in the OPEN interval (0, 1): (k + 0.5) / 2^23 is exact in float and
// never 0 or 1, so a zero-probability draft can never pass u * q < p.
DSPARK_HD float uniform_open01(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * (1.0f / 8388608.0f);
}

DSPARK_HD uint64_t random_u64(const Philox4& w) {
  return (static_cast<uint64_t>(w.v[1]) << 32) | w.v[0];
}

}  // namespace dspark
