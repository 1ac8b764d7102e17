"""SpeculativeEngine: continuous batching with speculative decoding on the dspark ops.

One engine step, for every running request (a request joins after its
prefill and leaves when it finishes, between steps):

  1. draft     DSpark: the drafter runs one parallel pass over [anchor, mask, ...]
               (``draft_block_attention(causal=False)`` over its paged cache of
               projected target context), then ``markov_sample`` draws the
               block left to right and returns the draft distributions and the
               per-token confidences. EAGLE-3: one decoder layer drafts the
               block autoregressively (block_size - 1 sequential steps after
               the step that extended its context);
  2. schedule  ``schedule_verify_lengths`` picks how many drafts each request
               verifies (confidence scheduler over the SPS table), or all of
               them ("fixed");
  3. verify    the target runs one forward over the blocks [anchor, x_1..x_G]
               of all requests, ``verify`` accepts a prefix of the scheduled
               drafts and samples one more token per request, losslessly;
  4. rollback  ``kv_rollback`` keeps the accepted entries of the target cache
               (chain verification: nothing moves, lengths shrink), and the
               drafter's cache gains the context of the tokens that stayed.

With ``drafter=None`` the same loop is plain autoregressive decoding (blocks
of one token), the baseline every speedup is measured against.

Zero-overhead scheduling. The decode step (:meth:`SpeculativeEngine._decode`)
reads and writes only device tensors: the per-slot state (anchor token,
context length, Philox offset, remaining token budget, sampling parameters,
page tables) lives in :class:`SlotState`, and the step's results feed the next
step without the host. Requests reserve the KV pages of their whole lifetime
when they join, so no allocation happens between steps. The host copies each
step's packed results (tokens, accepted counts, verify lengths) back
asynchronously and reads them one step late on CUDA (immediately on CPU, where
a copy costs nothing), to stream tokens and detect stop tokens; a request that
runs one step past its stop token on the device has that step discarded. On
CUDA the step is captured as a CUDA graph once per batch bucket (powers of
two; padding slots are frozen), so the forward always runs B_bucket x
(block_size + 1) query rows and the scheduled lengths only change what
``verify`` may accept. On CPU the same function runs eagerly and forwards only
the scheduled rows (compute-bound there).

Random numbers: request i draws from (seed_i, offset = its step counter), so
its tokens do not depend on which other requests share the batch.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import math
import time
from typing import Iterable, Iterator, Sequence

import torch

from . import kv_rollback, markov_sample, plan_capacity, profile_sps, schedule_verify_lengths, verify
from .calibrate import fold_offsets
from .kv_cache import OutOfPagesError, PagedKVCache
from .linear_plan import pack_linear_layers, storage_dtype
from .models.attention import PagedAttention
from .models.drafter import DSparkDrafter, Eagle3Drafter
from .models.llama import LlamaModel

SCHEDULERS = ("fixed", "sync", "async")
_EAGLE_DRAWS_PER_STEP = 16   # Philox offsets per engine step for the EAGLE drafter's sequential draws (block <= 15)
_PAD_REQUEST = -(2**40)      # KV pages that padding slots of a CUDA-graph bucket write into
# draft_max_batch="auto" drafts once after a run of plain steps, since acceptance drifts with the text and a plain
# step measures none: after 16 plain steps, or more where a drafting step costs more, so that these drafting steps
# cost at most about 2% of the plain steps' time where drafting does not pay.
_EXPLORE_MIN_PLAIN = 16
_EXPLORE_OVERHEAD = 0.02
# Auto's running means (tau, verified drafts, step-cost scales): a plain mean over the first observations, then an
# exponential window of this many, since acceptance drifts with the text and costs with the context.
_MEAN_WINDOW = 32


def _mean_weight(observations: int) -> float:
    """Weight of the newest of ``observations`` in a running mean (see _MEAN_WINDOW)."""
    return max(1 / observations, 1 / _MEAN_WINDOW)


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
    finish_reason: str | None = None
    stats: RequestStats = dataclasses.field(default_factory=RequestStats)
    prefill_slots: torch.Tensor | None = None   # KV slots of the prompt between admission and prefill
    drafter_slots: torch.Tensor | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass
class EngineStats:
    steps: int = 0
    drafting_steps: int = 0         # decode steps that drafted (the others decoded plainly, see draft_max_batch)
    prefill_s: float = 0.0
    draft_s: float = 0.0            # phase times: measured on CPU only (on CUDA the host merely launches work)
    schedule_s: float = 0.0
    verify_s: float = 0.0
    decode_s: float = 0.0           # wall time of decode steps (launch, results, bookkeeping)
    verify_tokens: int = 0          # verify rows scheduled in decode steps (anchor + scheduled drafts)
    emitted: int = 0
    attempts: list[int] = dataclasses.field(default_factory=list)
    accepts: list[int] = dataclasses.field(default_factory=list)

    def summary(self) -> dict:
        rounds = max(self.steps, 1)
        return {
            "decode_tokens_per_s": self.emitted / self.decode_s if self.decode_s else 0.0,
            "verify_tokens_per_step": self.verify_tokens / rounds,
            "drafting_steps": self.drafting_steps,
            "acceptance_by_position": [a / t if t else None for a, t in zip(self.accepts, self.attempts)],
            "time_s": {"prefill": self.prefill_s, "draft": self.draft_s, "schedule": self.schedule_s,
                       "verify": self.verify_s},
        }


def _grow(counts: list[int], n: int) -> None:
    counts.extend([0] * (n - len(counts)))


@dataclasses.dataclass
class SlotState:
    """Decode state per batch slot, on the device: slot b holds ``engine.running[b]``.

    Every field is a tensor with max_batch rows (None when the engine does not
    need it). The decode step reads and updates these in place, so a CUDA graph
    captured over the first B rows stays valid while requests come and go.
    Rows past the running batch are frozen padding (remaining = 0).
    """

    anchor: torch.Tensor             # int64: the last emitted token, first row of the next block
    start: torch.Tensor              # int64: tokens whose K/V are cached = the anchor's position
    offset: torch.Tensor             # int64: Philox step counter
    remaining: torch.Tensor          # int32: tokens the request may still emit (0: frozen)
    temperature: torch.Tensor        # float32
    top_k: torch.Tensor              # int32
    top_p: torch.Tensor              # float32
    min_p: torch.Tensor              # float32
    seed: torch.Tensor               # int64
    target_pages: torch.Tensor       # int32 [M, W]: the request's target KV pages (-1 past them)
    drafter_pages: torch.Tensor | None = None    # int32 [M, W]
    conf_prev: torch.Tensor | None = None        # float32 [M, G]: confidences of the last step (async scheduler)
    conf_old: torch.Tensor | None = None         # ... of the step before (what async capacity is planned from)
    # [M, d]: what the drafter carries from one step to the next: the EAGLE drafter's output that predicts the
    # first draft, or a block_context DSpark drafter's projected context of the position before the anchor
    draft_hidden: torch.Tensor | None = None

    @classmethod
    def allocate(cls, M: int, width: int, *, drafter: bool, async_conf: int, draft_hidden: int,
                 dtype: torch.dtype, device) -> "SlotState":
        def z(*shape, dt=torch.int64):
            return torch.zeros(shape, dtype=dt, device=device)

        return cls(anchor=z(M), start=z(M), offset=z(M), remaining=z(M, dt=torch.int32),
                   temperature=z(M, dt=torch.float32), top_k=z(M, dt=torch.int32), top_p=z(M, dt=torch.float32) + 1,
                   min_p=z(M, dt=torch.float32), seed=z(M), target_pages=z(M, width, dt=torch.int32) - 1,
                   drafter_pages=z(M, width, dt=torch.int32) - 1 if drafter else None,
                   conf_prev=z(M, async_conf, dt=torch.float32) + 1 if async_conf else None,
                   conf_old=z(M, async_conf, dt=torch.float32) + 1 if async_conf else None,
                   draft_hidden=z(M, draft_hidden, dt=dtype) if draft_hidden else None)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: t for f in dataclasses.fields(self) if (t := getattr(self, f.name)) is not None}

    def rows(self, B: int) -> "SlotState":
        """Views of the first B slots (same storage: in-place updates reach the engine's state)."""
        return SlotState(**{name: t[:B] for name, t in self.tensors().items()})

    def keep(self, slots: list[int]) -> None:
        """Move the rows of ``slots`` (in order) to the front, on the device."""
        index = _to_device(slots, torch.long, self.anchor.device)
        for t in self.tensors().values():
            t[:len(slots)] = t[index]

    def freeze(self, first: int, pad_target: torch.Tensor | None, pad_drafter: torch.Tensor | None) -> None:
        """Make slots first.. padding: no budget, position 0, writing into the pad pages (if any)."""
        self.remaining[first:] = 0
        self.start[first:] = 0
        self.anchor[first:] = 0
        if pad_target is not None:
            self.target_pages[first:] = pad_target
            if self.drafter_pages is not None:
                self.drafter_pages[first:] = pad_drafter

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.tensors().items()}

    def restore(self, saved: dict[str, torch.Tensor]) -> None:
        for name, t in self.tensors().items():
            t.copy_(saved[name])


def _slot_mapping(pages: torch.Tensor, positions: torch.Tensor, page_size: int) -> torch.Tensor:
    """KV slots (page * page_size + offset) of ``positions`` [B, T] in each row's pages [B, W]: int64 [B, T]."""
    page = pages.gather(1, torch.div(positions, page_size, rounding_mode="floor")).to(torch.int64)
    return page * page_size + positions % page_size


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on the device without blocking the host on CUDA (pinned staging copy)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@dataclasses.dataclass
class _InFlight:
    """A launched step's results on their way to the host: packed [B, W + 2] = tokens | accepted | verified."""

    requests: list[Request]
    host: torch.Tensor
    event: torch.cuda.Event | None
    decode: bool
    drafted: bool     # a decode step that drafted (else plain, or a prefill)



class SpeculativeEngine:
    """Continuous-batching generation with an optional drafter (see the module docstring).

    Args:
      target: the target :class:`LlamaModel` (eval mode).
      drafter: a :class:`DSparkDrafter` bound to ``target`` (Markov head of any
        rank; rank 0 is DFlash), an :class:`Eagle3Drafter` bound to ``target``,
        or None for plain decoding.
      block_size: drafted tokens per step (default: the drafter's block size / ttt_length).
      scheduler: "fixed" (verify every draft), "sync" (DSpark Algorithm 1, lossless
        early stop) or "async" (capacity from confidences two steps old, then the
        top fresh survivals). The confidence schedulers need a DSpark confidence head.
      max_batch: running requests at most; more wait in a queue.
      max_tokens: KV capacity (tokens) of the target cache, shared by all requests; a request
        reserves its whole lifetime (prompt + max_new_tokens + one block) when it joins, so the
        decode loop never allocates.
      page_size: tokens per KV page.
      sps_table: steps/s of a verify batch of B tokens (index B); profiled at start when None
        and a confidence scheduler is used.
      packed_linear: route CPU fp32 projections through ``dspark_ops.linear`` (default: on CPU).
      cuda_graphs: capture the decode step as a CUDA graph per batch bucket (default: on CUDA;
        CUDA only).
      draft_vocab: let the drafter propose only its draft vocabulary's ids when it has one
        (``dspark_ops.draft_vocab``; lossless either way). False: every id.
      draft_max_batch: draft only while at most this many requests run (their batch bucket
        under CUDA graphs); a larger batch decodes plainly, and the drafter still reads every
        verified token, so drafting resumes where the batch shrinks. For hardware where verifying
        extra rows at a large batch costs more than the drafts save (as vLLM's
        speculative_disable_by_batch_size). "auto": before each step, draft only if a drafting
        step is expected to emit more tokens per second than a plain one, from the profiled step
        costs (``step_cost_table``) and the tokens per step and verified drafts that recent
        drafting steps achieved (see :meth:`_drafting_pays`; the first step drafts, and so does
        one after a run of plain steps, to keep measuring: 16, or as many as keep these drafting
        steps under 2% of the plain steps' time). None: always draft.
      step_cost_table: [max_batch + 1, 2] seconds of a plain and of a drafting step over B
        requests (row B; rows of other batch sizes are ignored under CUDA graphs, which use their
        bucket's row); profiled at the first decode step when None and draft_max_batch="auto", and
        then, on CPU, scaled by what the engine's steps really cost (a running mean per kind of
        step: the profile attends to no context). A table passed here (such as a stored
        ``engine.step_cost_table``) is used as it is, which makes the choices reproducible.
    """

    def __init__(self, target: LlamaModel, drafter: DSparkDrafter | Eagle3Drafter | None = None, *,
                 block_size: int | None = None, scheduler: str = "fixed", max_batch: int = 8, max_tokens: int = 8192,
                 page_size: int = 16, sps_table: torch.Tensor | None = None, packed_linear: bool | None = None,
                 cuda_graphs: bool | None = None, draft_vocab: bool = True, draft_max_batch: int | str | None = None,
                 step_cost_table: torch.Tensor | None = None):
        if not isinstance(target, LlamaModel):
            raise TypeError(f"target must be a LlamaModel, got {type(target).__name__}")
        if drafter is not None and not isinstance(drafter, (DSparkDrafter, Eagle3Drafter)):
            raise TypeError(f"drafter must be a DSparkDrafter, an Eagle3Drafter or None, got {type(drafter).__name__}")
        if drafter is not None:
            drafter.config.validate_against(target.config)
            if drafter.target is not target:
                raise ValueError("the drafter is bound to a different target model")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.eagle = isinstance(drafter, Eagle3Drafter)
        conf = None if drafter is None else drafter.confidence_weights()
        if scheduler != "fixed" and conf is None:
            raise ValueError(f"scheduler={scheduler!r} needs a drafter with a confidence head")
        if max_batch < 1 or max_tokens < 1:
            raise ValueError("max_batch and max_tokens must be >= 1")
        if draft_max_batch is not None and (drafter is None or (
                draft_max_batch != "auto" and (not isinstance(draft_max_batch, int) or draft_max_batch < 1))):
            raise ValueError(f"draft_max_batch must be an int >= 1 or 'auto' and needs a drafter, "
                             f"got {draft_max_batch!r}")
        self.draft_max_batch = draft_max_batch
        self.target, self.drafter, self.scheduler = target, drafter, scheduler
        self.device = target.device
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda"
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, the target is on {self.device}")
        self.cuda_graphs = cuda_graphs
        # CPU is compute-bound: forward only the scheduled verify rows. CUDA: fixed shapes, graph-capturable.
        self.fixed_shapes = self.device.type != "cpu"
        # Results are read one step late on CUDA so the host never waits for the step it just launched.
        self._lag = 0 if self.device.type == "cpu" else 1
        native = 0 if drafter is None else (drafter.config.ttt_length if self.eagle else drafter.config.block_size)
        self.block_size = 0 if drafter is None else (block_size or native)
        if drafter is not None and not 1 <= self.block_size <= min(15, native):
            raise ValueError(f"block_size must be in [1, {min(15, native)}] for this drafter, got {block_size}")
        self.max_batch = max_batch
        # K/V rows a decode step may write past a request's context: its verify block or its draft block.
        self._step_rows = self.block_size + 1
        if drafter is not None and not self.eagle:
            self._step_rows = max(self._step_rows, drafter.config.block_size)
        pages_per_request = math.ceil((max_tokens + self._step_rows) / page_size)
        # Padding slots (graph buckets, and the frozen slots the step costs are profiled on) write into pad pages.
        pads = cuda_graphs or draft_max_batch == "auto"
        num_pages = pages_per_request + max_batch + (math.ceil(self._step_rows / page_size) if pads else 0)
        layers, heads, dim = target.kv_cache_shape()
        self.target_cache = PagedKVCache(layers, num_pages, page_size, heads, dim, target.dtype, self.device,
                                         max_pages_per_request=pages_per_request)
        self.drafter_cache = None
        if drafter is not None:
            layers, heads, dim = drafter.kv_cache_shape()
            self.drafter_cache = PagedKVCache(layers, num_pages, page_size, heads, dim, drafter.dtype, self.device,
                                              max_pages_per_request=pages_per_request)
        self.hidden_layers = None if drafter is None else list(drafter.config.target_layer_ids)
        if packed_linear is None:
            packed_linear = self.device.type == "cpu" and target.dtype == torch.float32
        # Drafter heads as the ops take them, made once (device tensors: nothing is built inside a captured step).
        V = target.config.vocab_size
        vocab = None if drafter is None or not draft_vocab else drafter.draft_vocab
        self._vocab = None if vocab is None else vocab.to(self.device)
        # The drafter scores its draft vocabulary's rows of the LM head (None: the target's whole head).
        self._draft_head = None if vocab is None else vocab.lm_head(target.lm_head_weight.detach())
        # The kernel each CPU projection runs (packed small-block or torch's), per shape and row count.
        self.linear_plans: dict[str, dict] = {}
        if packed_linear:
            self.linear_plans["target"] = pack_linear_layers(target).summary()
            if drafter is not None:
                self.linear_plans["drafter"] = pack_linear_layers(
                    drafter, extra=() if vocab is None else (self._draft_head,)).summary()
        markov = drafter.markov_weights() if isinstance(drafter, DSparkDrafter) else None
        if markov is None:
            markov = (torch.zeros(V, 0, dtype=target.dtype), torch.zeros(0, V, dtype=target.dtype))
        if vocab is not None:
            markov = vocab.markov(*markov)
        # markov_sample reads W2 once per block position: kept as narrow as is exact (bf16 checkpoints: bf16)
        self._markov = tuple(w.detach().to(self.device, storage_dtype(w)) for w in markov)
        self._conf = None
        if conf is not None:     # calibrated by `dspark calibrate`: temperatures, offsets folded into the bias
            cfg, G, dev = drafter.config, self.block_size, self.device
            temps = None if cfg.confidence_temperatures is None else \
                torch.tensor(cfg.confidence_temperatures[:G], device=dev)
            bias = conf[1].detach()
            if cfg.confidence_offsets is not None:
                temps = torch.ones(G, device=dev) if temps is None else temps
                bias = fold_offsets(bias, temps, torch.tensor(cfg.confidence_offsets[:G], device=dev))
            self._conf = (conf[0].detach(), bias, temps)
        self.waiting: list[Request] = []
        self.running: list[Request] = []            # in slot order
        self.finished: dict[int, Request] = {}
        self._next_id = 0
        self.stats = EngineStats()
        self._inflight: collections.deque[_InFlight] = collections.deque()
        self.sps_table = sps_table
        # The confidence schedulers need the SPS table, and so does draft_max_batch="auto" when run eagerly
        # (a drafting step's verify rows vary).
        if sps_table is None and (scheduler != "fixed" or (draft_max_batch == "auto" and not self.fixed_shapes)):
            self.sps_table = self.profile_sps()
        self._sps = None if self.sps_table is None else self.sps_table.to(self.device, torch.float64)
        self._sps_host = None if self.sps_table is None else self.sps_table.to(torch.float64).tolist()
        carries_hidden = drafter is not None and (self.eagle or drafter.config.block_context)
        self.slots = SlotState.allocate(
            max_batch, pages_per_request, drafter=drafter is not None,
            async_conf=self.block_size if scheduler == "async" else 0,
            draft_hidden=drafter.config.backbone.hidden_size if carries_hidden else 0,
            dtype=target.dtype if drafter is None else drafter.dtype, device=self.device)
        self._pad_pages = self._reserve_pad_pages() if pads else (None, None)
        if step_cost_table is not None and draft_max_batch != "auto":
            raise ValueError("step_cost_table is only used with draft_max_batch='auto'")
        self.step_cost_table = None if step_cost_table is None else self._check_step_costs(step_cost_table)
        # draft_max_batch="auto": what recent drafting steps achieved per request (tokens emitted, drafts
        # verified), and how many plain steps ran since the last drafting one.
        self._tau = self._verified = 0.0
        self._observed = self._plain_run = 0
        # With a profiled table on CPU, what real steps cost against it, per kind (plain, drafting): the profile
        # attends to no context and runs once, while attention over a growing context (more so with a drafting
        # step's extra rows) and other load on the machine change the costs, and not by the same factor.
        self._learn_costs = False
        self._cost_scale = [1.0, 1.0]
        self._cost_seen = [0, 0]
        self._graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        self.slots.freeze(0, *self._pad_pages)

    def _reserve_pad_pages(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """KV pages for the padding slots of a graph bucket (page-table rows of the target and drafter caches)."""
        rows = []
        for cache in (self.target_cache, self.drafter_cache):
            if cache is not None:
                cache.reserve(_PAD_REQUEST, self._step_rows)
            rows.append(None if cache is None else
                        cache.page_table([_PAD_REQUEST], width=self.slots.target_pages.shape[1])[0])
        return tuple(rows)

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
        if self._lifetime_tokens(len(prompt), params) > capacity:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) does not fit "
                             f"the KV cache ({capacity} tokens): raise max_tokens")
        req = Request(self._next_id, prompt, params)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    def _lifetime_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        """KV positions a request reserves when it joins: its context can reach prompt + max_new_tokens - 1,
        and a step writes _step_rows rows from there."""
        return prompt_len + params.max_new_tokens - 1 + self._step_rows

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._inflight)

    def context_length(self, request_id: int) -> int:
        """Tokens whose K/V a running request has cached (the device's view; syncs)."""
        slot = next(b for b, r in enumerate(self.running) if r.id == request_id)
        return int(self.slots.start[slot])

    def step(self) -> dict[int, list[int]]:
        """Admit waiting requests (one batched prefill), launch one decode step, apply the results that are ready.

        Returns the new tokens of each request whose results arrived (on CUDA: those of the previous step).
        """
        new: dict[int, list[int]] = {}
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        self._collect(self._lag, new)
        if self.running and self.draft_max_batch == "auto" and self.step_cost_table is None:
            self.step_cost_table = self.profile_step_costs()
            self._learn_costs = self.device.type == "cpu"   # a CUDA step's host time is not its cost
        t0 = time.perf_counter()
        launched = bool(self.running)
        if launched:
            self._launch_decode()
        self._collect(self._lag if launched else 0, new)
        self.stats.decode_s += time.perf_counter() - t0
        return new

    # ---- prefill -----------------------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """Waiting requests that get a batch slot and the KV pages of their lifetime now (in arrival order)."""
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            n = self._lifetime_tokens(len(req.prompt), req.params)
            try:
                req.prefill_slots = self.target_cache.reserve(req.id, n)[:len(req.prompt)]
                try:
                    if self.drafter_cache is not None:
                        req.drafter_slots = self.drafter_cache.reserve(req.id, n)[:len(req.prompt)]
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
        """All prompts in one forward (each a causal block over its own, empty, cache), then each first token;
        the new requests take the slots after the running ones."""
        t0 = time.perf_counter()
        dev, width = self.device, self.slots.target_pages.shape[1]
        ids = _to_device([t for r in batch for t in r.prompt], torch.long, dev)
        lens = [len(r.prompt) for r in batch]
        positions = _to_device([i for n in lens for i in range(n)], torch.long, dev)
        ends = list(itertools.accumulate(lens))
        cu = _to_device([0, *ends], torch.int32, dev)
        seq_lens = _to_device(lens, torch.int32, dev)
        request_ids = [r.id for r in batch]
        target_pages = self.target_cache.page_table(request_ids, width=width)
        backend = PagedAttention(self.target_cache.layer_caches(),
                                 slot_mapping=torch.cat([r.prefill_slots for r in batch]), page_table=target_pages,
                                 seq_lens=seq_lens, cu_q_lens=cu, causal=True, max_block_rows=max(lens))
        out = self.target(ids, positions, kv=backend, hidden_layers=self.hidden_layers, return_logits=False)
        last = _to_device(ends, torch.long, dev) - 1
        logits = self.target.compute_logits(out.hidden[last]).unsqueeze(1)
        p = [r.params for r in batch]
        params = {
            "temperature": _to_device([q.temperature for q in p], torch.float32, dev),
            "top_k": _to_device([q.top_k for q in p], torch.int32, dev),
            "top_p": _to_device([q.top_p for q in p], torch.float32, dev),
            "min_p": _to_device([q.min_p for q in p], torch.float32, dev),
            "seed": _to_device([q.seed for q in p], torch.int64, dev),
        }
        tokens, _ = verify(logits, torch.empty(len(batch), 0, dtype=torch.int32, device=dev), None,
                           offset=torch.zeros(len(batch), dtype=torch.int64, device=dev), **params)
        first = tokens[:, 0].to(torch.long)
        s = self.slots
        lo, hi = len(self.running), len(self.running) + len(batch)
        if self.drafter is not None:
            drafter_pages = self.drafter_cache.page_table(request_ids, width=width)
            drafter_slots = torch.cat([r.drafter_slots for r in batch])
            if self.eagle:  # row t pairs the target state at t with token t+1 (the first new token after the prompt)
                paired = torch.cat((ids[1:], ids[:1]))
                paired[last] = first
                backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=drafter_slots,
                                         page_table=drafter_pages, seq_lens=seq_lens, cu_q_lens=cu, causal=True,
                                         max_block_rows=max(lens))
                carried = self.drafter(paired, out.layer_hidden, positions, kv=backend)
            else:
                backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=drafter_slots, causal=False)
                carried = self.drafter.extend_context(out.layer_hidden, positions, kv=backend)
            if s.draft_hidden is not None:   # the row of each prompt's last position
                s.draft_hidden[lo:hi] = carried[last]
            s.drafter_pages[lo:hi] = drafter_pages
        s.anchor[lo:hi] = first
        s.start[lo:hi] = seq_lens
        s.offset[lo:hi] = 1
        s.remaining[lo:hi] = _to_device([q.max_new_tokens - 1 for q in p], torch.int32, dev)
        for name, value in params.items():
            getattr(s, name)[lo:hi] = value
        s.target_pages[lo:hi] = target_pages
        if s.conf_prev is not None:
            s.conf_prev[lo:hi] = 1.0
            s.conf_old[lo:hi] = 1.0
        for req in batch:
            req.prefill_slots = req.drafter_slots = None
        self.running.extend(batch)
        zeros = torch.zeros_like(tokens[:, :1])
        self._enqueue(batch, torch.cat((tokens[:, :1], zeros, zeros), 1), decode=False)
        self.stats.prefill_s += time.perf_counter() - t0

    # ---- one decode step -----------------------------------------------------------------------------------------

    def _launch_decode(self) -> None:
        B = len(self.running)
        rows = self._bucket(B) if self.cuda_graphs else B
        drafting = self._drafts(rows)
        self._plain_run = 0 if drafting else self._plain_run + 1
        t0 = time.perf_counter()
        out = self._run_step(rows, drafting)
        if self._learn_costs:   # on CPU the step has run to completion
            self._observe_cost(rows, drafting, time.perf_counter() - t0)
        self._enqueue(list(self.running), out[:B], decode=True, drafted=drafting)

    def _bucket(self, B: int) -> int:
        """The slots a CUDA graph runs for B requests: the next power of two (at most max_batch)."""
        return min(self.max_batch, 1 << (B - 1).bit_length())

    def _drafts(self, B: int) -> bool:
        """Whether the step over B slots drafts (see ``draft_max_batch``)."""
        if self.draft_max_batch is None:
            return self.drafter is not None
        if self.draft_max_batch == "auto":
            return self._observed == 0 or self._plain_run >= self._explore_after(B) or self._drafting_pays(B)
        return B <= self.draft_max_batch

    def _drafting_pays(self, B: int) -> bool:
        """A drafting step is worth its cost when tau * plain_s > drafting_s: the drafts it verifies
        emit tau tokens per request (recent drafting steps' mean) where a plain step emits one.
        Uses past steps only, so the output stays lossless."""
        plain_s, drafting_s = self._step_costs(B)
        return self._tau * plain_s > drafting_s

    def _explore_after(self, B: int) -> int:
        """Plain steps in a row after which the next one drafts to measure (see _EXPLORE_OVERHEAD)."""
        plain_s, drafting_s = self._step_costs(B)
        return max(_EXPLORE_MIN_PLAIN, math.ceil((drafting_s / plain_s - 1) / _EXPLORE_OVERHEAD))

    def _step_costs(self, B: int, *, scaled: bool = True) -> tuple[float, float]:
        """Expected seconds of a plain and of a drafting step over B slots.

        Under fixed shapes the profiled drafting step already verifies every draft row. Eagerly its
        profile verified the anchor alone (frozen slots), so the rows of ``verified`` drafts per request
        are added from the SPS table. ``scaled``: times what real steps cost against these (_observe_cost)."""
        plain_s, drafting_s = self.step_cost_table[B].tolist()
        if not self.fixed_shapes:
            rows = min(round(B * (1 + self._verified)), len(self._sps_host) - 1)
            drafting_s += max(0.0, 1 / self._sps_host[rows] - 1 / self._sps_host[B])
        if not scaled:
            return plain_s, drafting_s
        return plain_s * self._cost_scale[0], drafting_s * self._cost_scale[1]

    def _observe_cost(self, B: int, drafting: bool, seconds: float) -> None:
        """Fold a step's measured time into its kind's cost scale (a running mean, _MEAN_WINDOW)."""
        k = int(drafting)
        expected = self._step_costs(B, scaled=False)[k]
        self._cost_seen[k] += 1
        self._cost_scale[k] += _mean_weight(self._cost_seen[k]) * (seconds / expected - self._cost_scale[k])

    def _observe(self, tau: float, verified: float) -> None:
        """Fold a drafting step's per-request tokens and verified drafts into the running means (_MEAN_WINDOW)."""
        self._observed += 1
        w = _mean_weight(self._observed)
        self._tau += w * (tau - self._tau)
        self._verified += w * (verified - self._verified)

    def _run_step(self, B: int, drafting: bool) -> torch.Tensor:
        """Run (eagerly, or by replaying its CUDA graph) the decode step over the first B slots."""
        if not self.cuda_graphs:
            return self._decode(B, drafting)
        if (B, drafting) not in self._graphs:
            self._graphs[B, drafting] = self._capture(B, drafting)
        graph, packed = self._graphs[B, drafting]
        graph.replay()
        return packed

    def _capture(self, B: int, drafting: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """A CUDA graph of the decode step over the first B slots."""
        self._warm_up(B, drafting)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            packed = self._decode(B, drafting)
        return graph, packed

    def _warm_up(self, B: int, drafting: bool) -> None:
        """Run the step once before capturing it (lazy initialisation; on a side stream on CUDA, as capture
        wants), then undo it: the slot state is restored, and its K/V writes lie past every context."""
        saved = self.slots.snapshot()
        side = torch.cuda.Stream() if self.device.type == "cuda" else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            self._decode(B, drafting)
        if side is not None:
            torch.cuda.current_stream().wait_stream(side)
        self.slots.restore(saved)

    @torch.no_grad()
    def _decode(self, B: int, drafting: bool) -> torch.Tensor:
        """One decode step of slots 0..B-1, device tensors only; returns [B, G+3] int32 (G = block_size):
        tokens [G+1] (accepted drafts, then the sampled token; -1 after) | accepted | verified drafts.
        Without ``drafting`` the step drafts nothing and verifies the anchor alone (plain decoding)."""
        s, dev = self.slots.rows(B), self.device
        G = self.block_size if drafting else 0
        live = s.remaining > 0
        # Never verify drafts a request could not emit (its remaining budget).
        max_len = (s.remaining - 1).clamp(0, G).to(torch.int32)

        with self._phase("draft_s"):
            drafts = torch.empty(B, 0, dtype=torch.int32, device=dev)
            draft_probs = confidence = None
            if G:
                drafts, draft_probs, confidence = self._draft(s)

        with self._phase("schedule_s"):
            lengths = self._schedule(s, confidence, max_len) if G else max_len

        with self._phase("verify_s"):
            # The verify block of every request: [anchor, x_1..x_G] at positions start.. (rows past its
            # scheduled length are forwarded only at fixed shapes, and never accepted).
            G1 = G + 1
            block = torch.cat((s.anchor.unsqueeze(1), drafts.to(torch.long)), 1)
            positions = s.start.unsqueeze(1) + torch.arange(G1, device=dev)
            counts = torch.full_like(lengths, G1) if self.fixed_shapes else lengths + 1
            row_mask = None if self.fixed_shapes else torch.arange(G1, device=dev) < counts.unsqueeze(1)

            def rows(x):  # [B, G1, ...] -> the forwarded rows
                return x.reshape(B * G1, *x.shape[2:]) if row_mask is None else x[row_mask]

            cu = torch.cat((counts.new_zeros(1), counts.cumsum(0))).to(torch.int32)
            seq_lens = (s.start + counts).to(torch.int32)
            flat_pos = rows(positions)
            slots = rows(_slot_mapping(s.target_pages, positions, self.target_cache.page_size))
            backend = PagedAttention(self.target_cache.layer_caches(), slot_mapping=slots, page_table=s.target_pages,
                                     seq_lens=seq_lens, cu_q_lens=cu, causal=True)
            out = self.target(rows(block), flat_pos, kv=backend, hidden_layers=self.hidden_layers)
            # [B, G1] -> forwarded row (rows past a request's block repeat its last row; verify never reads them)
            row_of = cu[:-1].to(torch.long).unsqueeze(1) + torch.minimum(
                torch.arange(G1, device=dev), (counts - 1).to(torch.long).unsqueeze(1))
            logits = out.logits.view(B, G1, -1) if row_mask is None else out.logits[row_of]
            tokens, num_accepted = verify(logits, drafts, draft_probs, draft_index=self._draft_index(draft_probs),
                                          num_draft=lengths, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                                          min_p=s.min_p, seed=s.seed, offset=s.offset)

            # rollback: the anchor and the accepted drafts stay (num_accepted < 0: an invalid row, nothing stays)
            kept = torch.where(live & (num_accepted >= 0), num_accepted + 1, 0).to(torch.int32)
            kv_rollback(self.target_cache.k, self.target_cache.v, s.target_pages, seq_lens, s.start, None, kept)
            last = (kept.to(torch.long) - 1).clamp(min=0).unsqueeze(1)
            if self.drafter is not None:  # its context length is the target's (s.start)
                self._extend_drafter(s, out, tokens, rows, flat_pos, cu, row_of.gather(1, last).squeeze(1), kept > 0)
            s.anchor.copy_(torch.where(kept > 0, tokens.gather(1, last).squeeze(1).to(torch.long), s.anchor))
            s.start.copy_(seq_lens)
            s.offset.add_(live.to(torch.long))
            s.remaining.sub_(kept)
            if s.conf_prev is not None:
                s.conf_old.copy_(s.conf_prev)
                if confidence is None:   # a plain step: nothing known, as for a request that just joined
                    s.conf_prev.fill_(1.0)
                else:
                    s.conf_prev.copy_(confidence)
        pad = tokens.new_full((B, self.block_size - G), -1)   # a plain step's row is as wide as a drafting one's
        return torch.cat((tokens, pad, num_accepted.unsqueeze(1), lengths.unsqueeze(1)), 1)

    def _draft(self, s: SlotState):
        """(drafts [B, G] int32, draft distributions [B, G, V] (or [B, G, K] over the draft vocabulary: verify
        reads them through its ``draft_index``), confidences [B, G] or None)."""
        return self._draft_eagle(s) if self.eagle else self._draft_dspark(s)

    def _draft_dspark(self, s: SlotState):
        """One parallel drafter pass over [anchor, mask..] at start.. (scratch K/V past the context), then
        markov_sample draws the block and its confidences."""
        B, G, dev = s.anchor.shape[0], self.block_size, self.device
        bs = self.drafter.config.block_size
        positions = s.start.unsqueeze(1) + torch.arange(bs, device=dev)
        slots = _slot_mapping(s.drafter_pages, positions, self.drafter_cache.page_size).view(-1)
        backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=slots,
                                 page_table=s.drafter_pages, seq_lens=(s.start + bs).to(torch.int32),
                                 cu_q_lens=torch.arange(B + 1, dtype=torch.int32, device=dev) * bs, causal=False)
        block = self.drafter.draft_block(s.anchor, s.start, kv=backend, lm_head=self._draft_head,
                                         context=s.draft_hidden)
        kwargs = {}
        if self._conf is not None:
            w, b, temps = self._conf
            kwargs = dict(hidden=block.hidden[:, :G], conf_weight=w, conf_bias=b, conf_temperature=temps)
        tokens, q, confidence = markov_sample(block.logits[:, :G], self._draft_ids(s.anchor), *self._markov,
                                              temperature=s.temperature, seed=s.seed, offset=s.offset, **kwargs)
        return self._target_tokens(tokens), q, confidence

    def _draft_eagle(self, s: SlotState):
        """EAGLE-3: the output that predicts x_1 came with the last step; each further draft feeds the previous
        output with the token just drawn (at the next position, scratch K/V past the context). Every draw is
        ``markov_sample`` without a Markov head on its own Philox offset, so q is what the token was drawn from."""
        B, G, dev = s.anchor.shape[0], self.block_size, self.device
        cu = torch.arange(B + 1, dtype=torch.int32, device=dev)
        h, prev = s.draft_hidden, s.anchor
        tokens, probs = [], []
        for j in range(G):
            if j:
                pos = s.start + (j - 1)
                slots = _slot_mapping(s.drafter_pages, pos.unsqueeze(1), self.drafter_cache.page_size).view(-1)
                backend = PagedAttention(self.drafter_cache.layer_caches(), slot_mapping=slots,
                                         page_table=s.drafter_pages, seq_lens=(pos + 1).to(torch.int32), cu_q_lens=cu,
                                         causal=True)
                h = self.drafter(prev, h, pos, kv=backend, from_target=False)
            logits = self.drafter.compute_logits(h, self._draft_head).unsqueeze(1)
            tok, q, _ = markov_sample(logits, self._draft_ids(prev), *self._markov, temperature=s.temperature,
                                      seed=s.seed, offset=s.offset * _EAGLE_DRAWS_PER_STEP + j)
            tok = self._target_tokens(tok)
            prev = tok[:, 0].to(torch.long)
            tokens.append(tok)
            probs.append(q)
        return torch.cat(tokens, 1), torch.cat(probs, 1), None

    def _draft_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Target ids as ``markov_sample`` takes previous tokens (rows of its W1)."""
        return ids if self._vocab is None else self._vocab.position[ids.long()]

    def _target_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """markov_sample's draws (draft-vocabulary indices) as target ids; -1 (an invalid row) stays."""
        if self._vocab is None:
            return tokens
        ids = self._vocab.ids[tokens.long().clamp(min=0)].to(torch.int32)
        return torch.where(tokens >= 0, ids, tokens)

    def _draft_index(self, draft_probs: torch.Tensor | None) -> torch.Tensor | None:
        """verify's map from target ids to the columns of draft distributions over the draft vocabulary."""
        return None if draft_probs is None or self._vocab is None else self._vocab.index

    def _extend_drafter(self, s, out, tokens, rows, flat_pos, cu, last_row, advanced) -> None:
        """The drafter's context gains the verified rows (all forwarded rows are written; those past the
        accepted ones lie past the new context and are overwritten before they are read)."""
        dc = self.drafter_cache
        block_pos = s.start.unsqueeze(1) + torch.arange(tokens.shape[1], device=self.device)   # the verify block
        slots = rows(_slot_mapping(s.drafter_pages, block_pos, dc.page_size))
        if self.eagle:  # row j pairs the target state at start + j with the token emitted after it
            backend = PagedAttention(dc.layer_caches(), slot_mapping=slots, page_table=s.drafter_pages,
                                     seq_lens=(s.start + cu.diff()).to(torch.int32), cu_q_lens=cu, causal=True)
            carried = self.drafter(rows(tokens.clamp(min=0).to(torch.long)), out.layer_hidden, flat_pos, kv=backend)
        else:
            backend = PagedAttention(dc.layer_caches(), slot_mapping=slots, causal=False)
            carried = self.drafter.extend_context(out.layer_hidden, flat_pos, kv=backend)
        if s.draft_hidden is not None:   # the row of the position before the new anchor
            s.draft_hidden.copy_(torch.where(advanced.unsqueeze(1), carried[last_row], s.draft_hidden))

    def _schedule(self, s: SlotState, confidence, max_len) -> torch.Tensor:
        if self.scheduler == "fixed" or confidence is None:
            return max_len
        if self.scheduler == "sync":
            return schedule_verify_lengths(confidence, self._sps, mode="sync", max_len=max_len)
        # async: capacity planned from the confidences two steps old (1 for a request that joined since)
        capacity = plan_capacity(s.conf_old, self._sps, max_len=max_len)
        return schedule_verify_lengths(confidence, self._sps, mode="async", capacity=capacity, max_len=max_len)

    @contextlib.contextmanager
    def _phase(self, name: str):
        """Time a phase of an eager CPU step (on CUDA the host only launches work: nothing to time)."""
        if self.device.type != "cpu":
            yield
            return
        t0 = time.perf_counter()
        yield
        setattr(self.stats, name, getattr(self.stats, name) + time.perf_counter() - t0)

    # ---- results -------------------------------------------------------------------------------------------------

    def _enqueue(self, requests: list[Request], packed: torch.Tensor, *, decode: bool, drafted: bool = False) -> None:
        """Start copying a step's packed results to the host (asynchronously on CUDA)."""
        event = None
        if packed.device.type == "cuda":
            host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
            host.copy_(packed, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host = packed.to("cpu", copy=True)   # a graph's output buffer is overwritten by its next replay
        self._inflight.append(_InFlight(requests, host, event, decode, drafted))

    def _collect(self, keep: int, new: dict[int, list[int]]) -> None:
        """Apply the results of all but the last ``keep`` launched steps, then let finished requests leave."""
        while len(self._inflight) > keep:
            p = self._inflight.popleft()
            if p.event is not None:
                p.event.synchronize()
            if p.decode:
                self.stats.steps += 1
                self.stats.drafting_steps += p.drafted
            rows = emitted = verified_drafts = 0
            for req, row in zip(p.requests, p.host.tolist()):
                if req.finished:  # ran one step past its end on the device: discarded
                    continue
                *tokens, accepted, verified = row
                if accepted < 0:
                    req.finish_reason = "error"   # the device flagged the row invalid (e.g. NaN logits)
                    continue
                if p.decode:
                    self._record(req, verified, accepted)
                    self.stats.verify_tokens += verified + 1
                    rows, emitted, verified_drafts = rows + 1, emitted + accepted + 1, verified_drafts + verified
                before = len(req.output)
                req.output.extend(tokens[:accepted + 1])
                self._settle(req)  # may cut after a stop token or at the budget
                new.setdefault(req.id, []).extend(req.output[before:])
            if p.drafted and rows and self.draft_max_batch == "auto":
                self._observe(emitted / rows, verified_drafts / rows)
        self._retire()

    def _retire(self) -> None:
        """Finished requests leave: the others move to the front slots, their pages go back."""
        keep = [b for b, r in enumerate(self.running) if not r.finished]
        if len(keep) == len(self.running):
            return
        self.slots.keep(keep)
        self.slots.freeze(len(keep), *self._pad_pages)
        for req in self.running:
            if req.finished:
                self._release(req)
        self.running = [self.running[b] for b in keep]

    # ---- bookkeeping ---------------------------------------------------------------------------------------------

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

    @torch.no_grad()
    def profile_step_costs(self, *, warmup: int = 1, iters: int = 5) -> torch.Tensor:
        """Seconds of a plain and of a drafting decode step over B = 1..max_batch slots: [max_batch + 1, 2]
        float64, row B (under CUDA graphs each bucket is timed and its rows share its figures).

        The steps run on frozen slots (every slot made padding, restored afterwards), so they cost what a
        real step does except that they verify the anchor alone when run eagerly (``_step_costs`` adds the
        verify rows from the SPS table) and attend to no context (on CPU the engine scales them by what its
        steps measure, ``_observe_cost``). The slot state and the phase timers are left as they were."""
        if self.drafter is None:
            raise ValueError("profile_step_costs needs a drafter")
        if self._pad_pages[0] is None:
            raise RuntimeError("the engine reserved no padding pages (draft_max_batch='auto' or cuda_graphs)")
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        table = torch.zeros(self.max_batch + 1, 2, dtype=torch.float64)
        saved = self.slots.snapshot()
        timers = {k: getattr(self.stats, k) for k in ("draft_s", "schedule_s", "verify_s")}
        self.slots.freeze(0, *self._pad_pages)
        try:
            for B in sorted({self._bucket(B) if self.cuda_graphs else B for B in range(1, self.max_batch + 1)}):
                for col, drafting in enumerate((False, True)):
                    times = []
                    for i in range(warmup + iters):
                        sync()
                        t0 = time.perf_counter()
                        self._run_step(B, drafting)
                        sync()
                        times.append(time.perf_counter() - t0)
                    table[B, col] = sorted(times[warmup:])[iters // 2]
        finally:
            self.slots.restore(saved)
            for k, v in timers.items():
                setattr(self.stats, k, v)
        if self.cuda_graphs:
            for B in range(1, self.max_batch + 1):
                table[B] = table[self._bucket(B)]
        return self._check_step_costs(table)

    def _check_step_costs(self, table: torch.Tensor) -> torch.Tensor:
        table = torch.as_tensor(table, dtype=torch.float64).cpu()
        if table.shape != (self.max_batch + 1, 2):
            raise ValueError(f"step_cost_table must be [max_batch + 1, 2] = [{self.max_batch + 1}, 2], "
                             f"got {list(table.shape)}")
        if not bool((table[1:] > 0).all()) or not bool(table.isfinite().all()):
            raise ValueError("step_cost_table must hold finite seconds > 0 in rows 1..max_batch")
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

