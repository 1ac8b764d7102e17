"""SpeculativeEngine: continuous batching with DSpark drafting on the dspark ops.

One engine step, for every running request (a request joins after its
prefill and leaves when it finishes, between steps):

  1. draft     the drafter runs one parallel pass over [anchor, mask, ...]
               (``draft_block_attention(causal=False)`` over its paged cache of
               projected target context), then ``markov_sample`` draws the
               block left to right and returns the draft distributions and the
               per-token confidences;
  2. schedule  ``schedule_verify_lengths`` picks how many drafts each request
               verifies (confidence scheduler over the SPS table), or all of
               them ("fixed");
  3. verify    the target runs one forward over the ragged blocks
               [anchor, x_1..x_l] of all requests, ``verify`` accepts a prefix
               and samples one more token per request, losslessly;
  4. rollback  ``kv_rollback`` keeps the accepted entries of the target cache
               (chain verification: nothing moves, lengths shrink), and the
               drafter's cache gains the context of the tokens that stayed.

With ``drafter=None`` the same loop is plain autoregressive decoding (blocks
of one token), the baseline every speedup is measured against.

Random numbers: request i draws from (seed_i, offset = its step counter), so
its tokens do not depend on which other requests share the batch.

This loop runs eagerly on CPU and GPU. CUDA-graph capture of the step and the
overlap of host scheduling with device work (ZOS) are not implemented yet: on
CUDA each step reads the accepted counts back to the host.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Iterable, Iterator, Sequence

import torch

from . import markov_sample, plan_capacity, profile_sps, schedule_verify_lengths, verify
from .kv_cache import OutOfPagesError, PagedKVCache
from .models.attention import PagedAttention
from .models.drafter import DSparkDrafter
from .models.llama import LlamaModel

SCHEDULERS = ("fixed", "sync", "async")


@dataclasses.dataclass
class SamplingParams:
    """Per-request generation settings (temperature 0 = greedy)."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")


@dataclasses.dataclass
class RequestStats:
    rounds: int = 0                 # decode steps the request took part in (prefill excluded)
    emitted: int = 0                # tokens emitted by those steps
    drafted_verified: int = 0       # drafts sent to verification
    attempts: list[int] = dataclasses.field(default_factory=list)  # per block position j: verified with all < j accepted
    accepts: list[int] = dataclasses.field(default_factory=list)   # ... and accepted

    @property
    def tau(self) -> float:
        """Mean tokens per decode step, bonus/correction token included."""
        return self.emitted / self.rounds if self.rounds else 0.0


@dataclasses.dataclass
class Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    output: list[int] = dataclasses.field(default_factory=list)
    context_len: int = 0            # tokens whose K/V the target cache holds (prompt + output[:-1])
    offset: int = 0                 # Philox step counter
    finish_reason: str | None = None
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    prefill_slots: torch.Tensor | None = None   # KV slots of the prompt between admission and prefill
    drafter_slots: torch.Tensor | None = None

    @property
    def anchor(self) -> int:
        return self.output[-1]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    prefill_s: float = 0.0
    draft_s: float = 0.0
    schedule_s: float = 0.0
    verify_s: float = 0.0
    verify_tokens: int = 0          # target tokens forwarded in decode steps
    emitted: int = 0
    attempts: list[int] = dataclasses.field(default_factory=list)
    accepts: list[int] = dataclasses.field(default_factory=list)

    @property
    def decode_s(self) -> float:
        return self.draft_s + self.schedule_s + self.verify_s

    def summary(self) -> dict:
        rounds = max(self.steps, 1)
        return {
            "decode_tokens_per_s": self.emitted / self.decode_s if self.decode_s else 0.0,
            "verify_tokens_per_step": self.verify_tokens / rounds,
            "acceptance_by_position": [a / t if t else None for a, t in zip(self.accepts, self.attempts)],
            "time_s": {"prefill": self.prefill_s, "draft": self.draft_s, "schedule": self.schedule_s,
                       "verify": self.verify_s},
        }


def _grow(counts: list[int], n: int) -> None:
    counts.extend([0] * (n - len(counts)))


def storage_dtype(w: torch.Tensor) -> torch.dtype:
    """bfloat16 when every value of fp32 ``w`` is a bfloat16 number (a drafter loaded from a bf16 checkpoint),
    else w's dtype: the kernels widen bf16 to fp32 exactly, so the results are bit-identical for half the bytes."""
    if w.dtype == torch.float32 and torch.equal(w.detach().to(torch.bfloat16).float(), w.detach()):
        return torch.bfloat16
    return w.dtype


def pack_linear_layers(model: torch.nn.Module) -> None:
    """Route ``model``'s projections through ``dspark_ops.linear`` on weights packed once (CPU).

    The small-block kernel reads the weights once for a whole block of up to
    linear.MAX_ROWS rows, which is what makes verifying a block cost about one
    decode step; the MLP's gate/up product uses the fused silu(gate) * up epilogue.
    """
    from .linear import MAX_ROWS, linear, linear_silu_mul, pack_linear_weight

    def pack(w, gate_up=False):
        return pack_linear_weight(w.detach(), storage_dtype(w), gate_up=gate_up)

    gate_up = {id(p): pack(p, gate_up=True) for name, p in model.named_parameters()
               if name.endswith("gate_up_proj.weight")}
    packed = {id(p): pack(p) for name, p in model.named_parameters()
              if p.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name and id(p) not in gate_up}
    if hasattr(model, "lm_head_weight"):
        w = model.lm_head_weight
        packed.setdefault(id(w), pack(w))

    def small_block(x):  # tall inputs (long prompts) are what MKL's matmul is good at, on the original weight
        return x.dtype == torch.float32 and x.numel() <= MAX_ROWS * x.shape[-1]

    def fn(x, weight, bias):
        p = packed.get(id(weight))
        if p is None or not small_block(x):
            return torch.nn.functional.linear(x, weight, bias)
        return linear(x, p, bias)

    def silu_mul_fn(x, weight, bias):
        p = gate_up.get(id(weight))
        if p is None or bias is not None or not small_block(x):
            gate, up = torch.nn.functional.linear(x, weight, bias).chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        return linear_silu_mul(x, p)

    model.linear_impl.fn = fn
    model.linear_impl.silu_mul_fn = silu_mul_fn


class SpeculativeEngine:
    """Continuous-batching generation with an optional DSpark drafter (see the module docstring).

    Args:
      target: the target :class:`LlamaModel` (eval mode).
      drafter: a :class:`DSparkDrafter` bound to ``target`` (Markov head of any
        rank; rank 0 is DFlash), or None for plain decoding.
      block_size: drafted tokens per step (default: the drafter's block size).
      scheduler: "fixed" (verify every draft), "sync" (DSpark Algorithm 1, lossless
        early stop) or "async" (capacity from confidences two steps old, then the
        top fresh survivals). The confidence schedulers need a confidence head.
      max_batch: running requests at most; more wait in a queue.
      max_tokens: KV capacity (tokens) of the target cache, shared by all requests.
      page_size: tokens per KV page.
      sps_table: steps/s of a verify batch of B tokens (index B); profiled at start when None
        and a confidence scheduler is used.
      packed_linear: route CPU fp32 projections through ``dspark_ops.linear`` (default: on CPU).
    """

    def __init__(self, target: LlamaModel, drafter: DSparkDrafter | None = None, *, block_size: int | None = None,
                 scheduler: str = "fixed", max_batch: int = 8, max_tokens: int = 8192, page_size: int = 16,
                 sps_table: torch.Tensor | None = None, packed_linear: bool | None = None):
        if not isinstance(target, LlamaModel):
            raise TypeError(f"target must be a LlamaModel, got {type(target).__name__}")
        if drafter is not None and not isinstance(drafter, DSparkDrafter):
            raise TypeError(f"drafter must be a DSparkDrafter (or None), got {type(drafter).__name__}")
        if drafter is not None:
            drafter.config.validate_against(target.config)
            if drafter.target is not target:
                raise ValueError("the drafter is bound to a different target model")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if scheduler != "fixed" and (drafter is None or drafter.confidence_weights() is None):
            raise ValueError(f"scheduler={scheduler!r} needs a drafter with a confidence head")
        if max_batch < 1 or max_tokens < 1:
            raise ValueError("max_batch and max_tokens must be >= 1")
        self.target, self.drafter, self.scheduler = target, drafter, scheduler
        self.device = target.device
        self.block_size = 0 if drafter is None else (block_size or drafter.config.block_size)
        if drafter is not None and not 1 <= self.block_size <= min(15, drafter.config.block_size):
            raise ValueError(f"block_size must be in [1, {min(15, drafter.config.block_size)}] for this drafter, "
                             f"got {block_size}")
        self.max_batch = max_batch
        num_pages = math.ceil(max_tokens / page_size) + max_batch  # + one page of slack per request
        layers, heads, dim = target.kv_cache_shape()
        self.target_cache = PagedKVCache(layers, num_pages, page_size, heads, dim, target.dtype, self.device)
        self.drafter_cache = None
        if drafter is not None:
            layers, heads, dim = drafter.kv_cache_shape()
            self.drafter_cache = PagedKVCache(layers, num_pages, page_size, heads, dim, drafter.dtype, self.device)
        self.hidden_layers = None if drafter is None else list(drafter.config.target_layer_ids)
        if packed_linear is None:
            packed_linear = self.device.type == "cpu" and target.dtype == torch.float32
        if packed_linear:
            pack_linear_layers(target)
            if drafter is not None:
                pack_linear_layers(drafter)
        if drafter is not None:   # markov_sample reads W2 once per block position: keep it as narrow as is exact
            V = target.config.vocab_size
            markov = drafter.markov_weights()
            markov = markov if markov is not None else (torch.zeros(V, 0), torch.zeros(0, V))
            self._markov_weights = tuple(w.detach().to(self.device, storage_dtype(w)) for w in markov)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.finished: dict[int, Request] = {}
        self._next_id = 0
        self.stats = EngineStats()
        self._stale_confidence: list[torch.Tensor] = []   # async scheduler: confidences of earlier steps
        self.sps_table = sps_table
        if scheduler != "fixed" and sps_table is None:
            self.sps_table = self.profile_sps()

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request (token ids); returns its id. Bad input raises before anything is queued."""
        params = params or SamplingParams()
        params.check()
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty")
        vocab = self.target.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must lie in [0, {vocab}), got {bad[0]}")
        bad = [t for t in params.stop_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"stop_token_ids must lie in [0, {vocab}), got {bad[0]}")
        capacity = self.target_cache.max_pages_per_request * self.target_cache.page_size
        need = len(prompt) + params.max_new_tokens + self.block_size + 1
        if need > capacity:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) does not fit "
                             f"the KV cache ({capacity} tokens): raise max_tokens")
        req = Request(self._next_id, prompt, params)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def step(self) -> dict[int, list[int]]:
        """Admit waiting requests (one batched prefill), run one decode step; returns each request's new tokens."""
        new: dict[int, list[int]] = {}
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
            for req in admitted:
                self._settle(req)
                new[req.id] = list(req.output)
                if req.finished:
                    self._release(req)
                else:
                    self.running.append(req)
        decode = [r for r in self.running if r.id not in new]
        if decode:
            new.update(self._decode_step(decode))
        for req in [r for r in self.running if r.finished]:
            self.running.remove(req)
            self._release(req)
        return new

    # ---- prefill -----------------------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """Waiting requests that get a batch slot and KV pages for their prompt now (in arrival order)."""
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            n = len(req.prompt)
            try:
                req.prefill_slots = self.target_cache.reserve(req.id, n)
                try:
                    req.drafter_slots = None if self.drafter_cache is None else self.drafter_cache.reserve(req.id, n)
                except OutOfPagesError:
                    self.target_cache.free(req.id)
                    raise
            except OutOfPagesError:
                if self.running or admitted:  # pages come back as requests finish
                    break
                raise
            admitted.append(self.waiting.pop(0))
        return admitted

    @torch.no_grad()
    def _prefill(self, batch: list[Request]) -> None:
        """All prompts in one forward (each a causal block over its own, empty, cache), then each first token."""
        t0 = time.perf_counter()
        dev = self.device
        ids = torch.tensor([t for r in batch for t in r.prompt], dtype=torch.long, device=dev)
        positions = torch.cat([torch.arange(len(r.prompt), device=dev) for r in batch])
        ends = list(itertools.accumulate(len(r.prompt) for r in batch))
        request_ids = [r.id for r in batch]
        backend = PagedAttention(self.target_cache.layer_caches(), slot_mapping=torch.cat([r.prefill_slots for r in batch]),
                                 page_table=self.target_cache.page_table(request_ids),
                                 seq_lens=self.target_cache.seq_lens(request_ids),
                                 cu_q_lens=torch.tensor([0, *ends], dtype=torch.int32, device=dev), causal=True,
                                 max_block_rows=max(len(r.prompt) for r in batch))
        out = self.target(ids, positions, kv=backend, hidden_layers=self.hidden_layers, return_logits=False)
        last = torch.tensor(ends, device=dev) - 1
        logits = self.target.compute_logits(out.hidden[last]).unsqueeze(1)
        params = self._params_tensors(batch)
        tokens, _ = verify(logits, torch.empty(len(batch), 0, dtype=torch.int32, device=dev), None, **params)
        if self.drafter is not None:
            drafter_slots = torch.cat([r.drafter_slots for r in batch])
            backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=drafter_slots, causal=False)
            self.drafter.extend_context(out.layer_hidden, positions, kv=backend)
        for req, token in zip(batch, tokens[:, 0].tolist()):
            req.offset += 1
            req.context_len = len(req.prompt)
            req.output.append(token)
            req.prefill_slots = req.drafter_slots = None
        self.stats.prefill_s += time.perf_counter() - t0

    # ---- one decode step -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _decode_step(self, batch: list[Request]) -> dict[int, list[int]]:
        dev, R, G = self.device, len(batch), self.block_size
        ids = [r.id for r in batch]
        anchors = torch.tensor([r.anchor for r in batch], dtype=torch.long, device=dev)
        starts = torch.tensor([r.context_len for r in batch], dtype=torch.long, device=dev)
        params = self._params_tensors(batch)

        # 1. draft
        t0 = time.perf_counter()
        drafts = torch.empty(R, 0, dtype=torch.int32, device=dev)
        draft_probs = confidence = None
        if G:
            drafts, draft_probs, confidence = self._draft(batch, ids, anchors, starts, params)
        # Never verify drafts a request could not emit (its remaining budget).
        remaining = torch.tensor([r.params.max_new_tokens - len(r.output) - 1 for r in batch], device=dev)
        max_len = remaining.clamp(0, G).to(torch.int32)
        t1 = time.perf_counter()

        # 2. schedule
        lengths = self._schedule(confidence, max_len) if G else max_len
        t2 = time.perf_counter()

        # 3. verify: one target forward over [anchor, x_1..x_l] of every request
        lens = lengths.to(torch.long).cpu().tolist()
        rows = [l + 1 for l in lens]
        slots = self.target_cache.reserve_batch(ids, rows)
        cu = torch.tensor([0, *itertools.accumulate(rows)], dtype=torch.int32, device=dev)
        block_ids = torch.cat([torch.cat((anchors[b:b + 1], drafts[b, :lens[b]].long())) for b in range(R)])
        positions = torch.cat([starts[b] + torch.arange(rows[b], device=dev) for b in range(R)])
        backend = PagedAttention(self.target_cache.layer_caches(), slot_mapping=slots,
                                 page_table=self.target_cache.page_table(ids), seq_lens=self.target_cache.seq_lens(ids),
                                 cu_q_lens=cu, causal=True)
        out = self.target(block_ids, positions, kv=backend, hidden_layers=self.hidden_layers)
        # [R, G+1, V] view of the ragged rows (positions past a request's block repeat its last row; verify never reads them)
        j = torch.arange(G + 1, device=dev)
        row_index = cu[:-1].long().unsqueeze(1) + torch.minimum(j.unsqueeze(0), lengths.long().unsqueeze(1))
        logits = out.logits[row_index]
        tokens, num_accepted = verify(logits, drafts, draft_probs, num_draft=lengths, **params)
        accepted = num_accepted.cpu().tolist()
        tokens = tokens.cpu()

        # 4. rollback: keep anchor + accepted drafts; the drafter's context gains them
        kept = [a + 1 for a in accepted]
        self.target_cache.rollback(ids, kept)
        if self.drafter is not None:
            keep_rows = torch.cat([cu[b] + torch.arange(kept[b], device=dev) for b in range(R)]).long()
            drafter_slots = self.drafter_cache.reserve_batch(ids, kept)
            ctx_backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=drafter_slots, causal=False)
            self.drafter.extend_context(out.layer_hidden[keep_rows], positions[keep_rows], kv=ctx_backend)
        t3 = time.perf_counter()

        new = {}
        for b, req in enumerate(batch):
            self._record(req, lens[b], accepted[b])
            req.context_len += kept[b]
            req.offset += 1
            before = len(req.output)
            req.output.extend(tokens[b, :accepted[b] + 1].tolist())
            self._settle(req)  # may cut after a stop token or at the budget
            new[req.id] = req.output[before:]
        s = self.stats
        s.steps += 1
        s.draft_s += t1 - t0
        s.schedule_s += t2 - t1
        s.verify_s += t3 - t2
        s.verify_tokens += sum(rows)
        return new

    def _draft(self, batch, ids, anchors, starts, params):
        R, G, dev = len(batch), self.block_size, self.device
        bs = self.drafter.config.block_size
        slots = self.drafter_cache.reserve_batch(ids, [bs] * R)
        cu = torch.arange(R + 1, dtype=torch.int32, device=dev) * bs
        backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=slots,
                                 page_table=self.drafter_cache.page_table(ids),
                                 seq_lens=self.drafter_cache.seq_lens(ids), cu_q_lens=cu, causal=False)
        block = self.drafter.draft_block(anchors, starts, kv=backend)
        self.drafter_cache.rollback(ids, [0] * R)  # the block was scratch: back to the context
        w1, w2 = self._markov_weights
        conf = self.drafter.confidence_weights()
        kwargs = {}
        if conf is not None:
            sts = getattr(self.drafter.config, "confidence_temperatures", None)  # from `dspark calibrate`
            kwargs = dict(hidden=block.hidden[:, :G], conf_weight=conf[0], conf_bias=conf[1],
                          conf_temperature=None if sts is None else torch.tensor(sts[:G], device=dev))
        drafts, draft_probs, confidence = markov_sample(
            block.logits[:, :G], anchors, w1, w2, temperature=params["temperature"], seed=params["seed"],
            offset=params["offset"], **kwargs)
        return drafts, draft_probs, confidence

    def _schedule(self, confidence, max_len) -> torch.Tensor:
        if self.scheduler == "fixed" or confidence is None:
            return max_len
        if self.scheduler == "sync":
            return schedule_verify_lengths(confidence, self.sps_table, mode="sync", max_len=max_len)
        # async: capacity chosen from confidences two steps old (same batch size), or all drafts before that
        R = confidence.shape[0]
        stale = self._stale_confidence[0] if len(self._stale_confidence) == 2 else None
        if stale is not None and stale.shape[0] == R:
            capacity = plan_capacity(stale, self.sps_table, max_len=max_len)
        else:
            capacity = int(max_len.sum()) + R
        self._stale_confidence = (self._stale_confidence + [confidence])[-2:]
        return schedule_verify_lengths(confidence, self.sps_table, mode="async", capacity=capacity, max_len=max_len)

    # ---- bookkeeping ---------------------------------------------------------------------------------------------

    def _params_tensors(self, batch: list[Request]) -> dict[str, torch.Tensor]:
        dev = self.device
        return {
            "temperature": torch.tensor([r.params.temperature for r in batch], dtype=torch.float32, device=dev),
            "top_k": torch.tensor([r.params.top_k for r in batch], dtype=torch.int32, device=dev),
            "top_p": torch.tensor([r.params.top_p for r in batch], dtype=torch.float32, device=dev),
            "min_p": torch.tensor([r.params.min_p for r in batch], dtype=torch.float32, device=dev),
            "seed": torch.tensor([r.params.seed for r in batch], dtype=torch.int64, device=dev),
            "offset": torch.tensor([r.offset for r in batch], dtype=torch.int64, device=dev),
        }

    def _record(self, req: Request, verified: int, accepted: int) -> None:
        st, es = req.stats, self.stats
        st.rounds += 1
        st.emitted += accepted + 1
        es.emitted += accepted + 1
        st.drafted_verified += verified
        for counts in (st.attempts, st.accepts, es.attempts, es.accepts):
            _grow(counts, verified)
        for j in range(min(accepted + 1, verified)):  # position j was reached
            st.attempts[j] += 1
            es.attempts[j] += 1
            if j < accepted:
                st.accepts[j] += 1
                es.accepts[j] += 1

    def _settle(self, req: Request) -> None:
        """Cut the output at a stop token or the token budget and mark the request finished."""
        p = req.params
        for i, t in enumerate(req.output):
            if t in p.stop_token_ids:
                del req.output[i + 1:]
                req.finish_reason = "stop"
                break
        if len(req.output) >= p.max_new_tokens:
            del req.output[p.max_new_tokens:]
            req.finish_reason = req.finish_reason or "length"

    def _release(self, req: Request) -> None:
        self.target_cache.free(req.id)
        if self.drafter_cache is not None:
            self.drafter_cache.free(req.id)
        self.finished[req.id] = req

    # ---- SPS profile -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def profile_sps(self, *, context: int = 128, warmup: int = 1, iters: int = 3) -> torch.Tensor:
        """Target steps/s for verify batches of B = 0..max_batch*(G+1) tokens (blocks of G+1 over dummy requests)."""
        G1 = self.block_size + 1
        max_tokens = self.max_batch * G1
        dev = self.device
        dummy = [-(i + 1) for i in range(self.max_batch)]
        self.target_cache.reserve_batch(dummy, [context] * self.max_batch)

        def step(B: int):
            counts = [min(G1, B - i * G1) for i in range(math.ceil(B / G1))]
            reqs = dummy[:len(counts)]
            slots = self.target_cache.reserve_batch(reqs, counts)
            cu = torch.tensor([0, *itertools.accumulate(counts)], dtype=torch.int32, device=dev)
            positions = torch.cat([context + torch.arange(c, device=dev) for c in counts])
            backend = PagedAttention(self.target_cache.layer_caches(), slot_mapping=slots,
                                     page_table=self.target_cache.page_table(reqs),
                                     seq_lens=self.target_cache.seq_lens(reqs), cu_q_lens=cu, causal=True)
            self.target(torch.zeros(B, dtype=torch.long, device=dev), positions, kv=backend,
                        hidden_layers=self.hidden_layers)
            self.target_cache.rollback(reqs, [0] * len(reqs))

        try:
            table = profile_sps(step, max_tokens, device=dev, warmup=warmup, iters=iters)
        finally:
            for r in dummy:
                self.target_cache.free(r)
        return table

    # ---- convenience -----------------------------------------------------------------------------------------------

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
                 stop_token_ids: Iterable[int] = ()) -> list[list[int]]:
        """Generate for every prompt (request i uses seed + i); returns the new token ids of each."""
        ids = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids)
        while self.has_work:
            self.step()
        return [self.finished[i].output for i in ids]

    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 128, *, temperature: float = 0.0,
               top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, seed: int = 0,
               stop_token_ids: Iterable[int] = ()) -> Iterator[tuple[int, list[int]]]:
        """Like :meth:`generate`, yielding (prompt index, new tokens) as steps complete."""
        ids = self._submit(prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids)
        index = {rid: i for i, rid in enumerate(ids)}
        while self.has_work:
            for rid, toks in self.step().items():
                if rid in index and toks:
                    yield index[rid], toks

    def _submit(self, prompts, max_new_tokens, temperature, top_k, top_p, min_p, seed, stop_token_ids) -> list[int]:
        stop = tuple(int(t) for t in stop_token_ids)
        params = [SamplingParams(max_new_tokens, temperature, top_k, top_p, min_p, seed + i, stop)
                  for i in range(len(prompts))]
        for p, prompt in zip(params, prompts):  # validate all before queueing any
            p.check()
            if len(prompt) == 0:
                raise ValueError("prompt is empty")
        return [self.add_request(prompt, p) for prompt, p in zip(prompts, params)]

