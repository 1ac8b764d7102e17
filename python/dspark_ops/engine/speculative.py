"""SpeculativeEngine: continuous batching with speculative decoding on the dspark ops.

One engine step, for every running request (a request joins after its
prefill and leaves when it finishes, between steps):

  1. draft     the drafting strategy (``dspark_ops.proposers``) proposes a block
               per request. DSpark: the drafter runs one parallel pass over
               [anchor, mask, ...], then ``markov_sample`` draws the block left
               to right with its draft distributions and per-token confidences.
               EAGLE-3: one decoder layer drafts the block autoregressively;
  2. schedule  ``schedule_verify_lengths`` picks how many drafts each request
               verifies (confidence scheduler over the SPS table), or all of
               them ("fixed");
  3. verify    the target runs one forward over the blocks [anchor, x_1..x_G]
               of all requests, ``verify`` accepts a prefix of the scheduled
               drafts and samples one more token per request, losslessly;
  4. rollback  ``kv_rollback`` keeps the accepted entries of the target cache
               (chain verification: nothing moves, lengths shrink), and the
               strategy's context gains the tokens that stayed.

With ``drafter=None`` the same loop is plain autoregressive decoding (blocks
of one token), the baseline every speedup is measured against. Whether a step
drafts at all is the draft policy's choice (``draft_max_batch``,
:mod:`.draft_policy`).

Zero-overhead scheduling. The decode step (:meth:`SpeculativeEngine._decode`)
reads and writes only device tensors: the per-slot state (anchor token,
context length, Philox offset, remaining token budget, sampling parameters,
page tables, the strategy's own state) lives in :class:`.slots.SlotState`, and
the step's results feed the next step without the host. Requests reserve the
KV pages of their whole lifetime when they join, so no allocation happens
between steps. The host copies each step's packed results back
asynchronously and reads them one step late on CUDA (immediately on CPU, where
a copy costs nothing), to stream tokens and detect stop tokens
(:mod:`.results`); a request that runs one step past its stop token on the
device has that step discarded. On CUDA the step is captured as a CUDA graph
once per batch bucket (powers of two; padding slots are frozen,
:mod:`.graphs`), so the forward always runs B_bucket x (block_size + 1) query
rows and the scheduled lengths only change what ``verify`` may accept. On CPU
the same function runs eagerly and forwards only the scheduled rows
(compute-bound there).

Random numbers: request i draws from (seed_i, offset = its step counter), so
its tokens do not depend on which other requests share the batch.
"""
from __future__ import annotations

import contextlib
import itertools
import time
from typing import Sequence

import torch

from .. import kv_rollback, plan_capacity, schedule_verify_lengths, verify
from ..kv_cache import OutOfPagesError, position_slots
from ..linear_plan import pack_linear_layers
from ..models.attention import PagedAttention
from ..models.llama import LlamaModel
from ..proposers import PromptBatch, VerifyBlock, make_proposer
from .draft_policy import DraftPolicy, check_draft_max_batch
from .frontend import BatchFrontEnd
from .graphs import StepGraphs
from .pages import KVPages
from .profiles import step_costs, verify_sps
from .requests import EngineStats, Request, SamplingParams, checked_prompt
from .results import ResultQueue, apply_step, record_acceptance
from .slots import SlotState, to_device

SCHEDULERS = ("fixed", "sync", "async")


class SpeculativeEngine(BatchFrontEnd):
    """Continuous-batching generation with an optional drafter (see the module docstring).

    Args:
      target: the target :class:`LlamaModel` (eval mode).
      drafter: a drafter bound to ``target``: a :class:`DSparkDrafter` (Markov head of any rank; rank 0
        is DFlash), an :class:`Eagle3Drafter`, any drafter class registered with
        ``dspark_ops.proposers.register_proposer``, or None for plain decoding.
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
        verified token, so drafting resumes where the batch shrinks (as vLLM's
        speculative_disable_by_batch_size). "auto": draft when a drafting step is expected to emit
        more tokens per second than a plain one, from the step costs and what recent drafting steps
        achieved (:mod:`dspark_ops.engine.draft_policy`). None: always draft.
      step_cost_table: [max_batch + 1, 2] seconds of a plain and of a drafting step over B
        requests (row B; under CUDA graphs each bucket's row); profiled at the first decode step when
        None and draft_max_batch="auto", and then, on CPU, scaled by what the engine's steps really
        cost. A table passed here (such as a stored ``engine.step_cost_table``) is used as it is, which
        makes the choices reproducible.
    """

    def __init__(self, target: LlamaModel, drafter=None, *, block_size: int | None = None, scheduler: str = "fixed",
                 max_batch: int = 8, max_tokens: int = 8192, page_size: int = 16,
                 sps_table: torch.Tensor | None = None, packed_linear: bool | None = None,
                 cuda_graphs: bool | None = None, draft_vocab: bool = True, draft_max_batch: int | str | None = None,
                 step_cost_table: torch.Tensor | None = None):
        if not isinstance(target, LlamaModel):
            raise TypeError(f"target must be a LlamaModel, got {type(target).__name__}")
        self.proposer = make_proposer(target, drafter, block_size=block_size, draft_vocab=draft_vocab)
        self._check_settings(target, scheduler, max_batch, max_tokens, draft_max_batch, cuda_graphs)
        self.target, self.drafter, self.scheduler, self.draft_max_batch = target, drafter, scheduler, draft_max_batch
        self.device, self.max_batch, self.block_size = target.device, max_batch, self.proposer.block_size
        self.hidden_layers = self.proposer.hidden_layers
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        # CPU is compute-bound: forward only the scheduled verify rows. CUDA: fixed shapes, graph-capturable.
        self.fixed_shapes = self.device.type != "cpu"
        # Results are read one step late on CUDA so the host never waits for the step it just launched.
        self._lag = 0 if self.device.type == "cpu" else 1
        # Padding slots (graph buckets, and the frozen slots the step costs are profiled on) write into pad pages.
        pads = self.cuda_graphs or draft_max_batch == "auto"
        self.pages = KVPages(target, self.proposer, max_batch=max_batch, max_tokens=max_tokens, page_size=page_size,
                             pads=pads)
        self.target_cache, self.drafter_cache = self.pages.target, self.proposer.cache
        # The kernel each CPU projection runs (packed small-block or torch's), per shape and row count.
        self.linear_plans = _pack_linear(target, self.proposer, packed_linear)
        self.waiting: list[Request] = []
        self.running: list[Request] = []            # in slot order
        self.finished: dict[int, Request] = {}
        self._next_id = 0
        self.stats = EngineStats()
        self.results = ResultQueue()
        self.sps_table = sps_table
        # The confidence schedulers need the SPS table, and so does draft_max_batch="auto" when run eagerly
        # (a drafting step's verify rows vary).
        if sps_table is None and (scheduler != "fixed" or (draft_max_batch == "auto" and not self.fixed_shapes)):
            self.sps_table = self.profile_sps()
        self._sps = None if self.sps_table is None else self.sps_table.to(self.device, torch.float64)
        self.slots = SlotState.allocate(max_batch, self.pages.pages_per_request,
                                        async_conf=self.block_size if scheduler == "async" else 0,
                                        draft=self.proposer.slot_state(max_batch), device=self.device)
        self._pad_pages = self.pages.padding() if pads else {}
        self.policy = DraftPolicy(draft_max_batch, has_drafter=drafter is not None, max_batch=max_batch,
                                  fixed_shapes=self.fixed_shapes, step_cost_table=step_cost_table,
                                  sps=None if self.sps_table is None else self.sps_table.to(torch.float64).tolist())
        self.graphs = StepGraphs(self._decode, self.slots, self.device)
        self.slots.freeze(0, self._pad_pages)

    def _check_settings(self, target, scheduler, max_batch, max_tokens, draft_max_batch, cuda_graphs) -> None:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        if scheduler != "fixed" and not self.proposer.has_confidence:
            raise ValueError(f"scheduler={scheduler!r} needs a drafter with a confidence head")
        if max_batch < 1 or max_tokens < 1:
            raise ValueError("max_batch and max_tokens must be >= 1")
        check_draft_max_batch(draft_max_batch, self.proposer.block_size > 0)
        if cuda_graphs and target.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a model on a CUDA device, the target is on {target.device}")

    @property
    def step_cost_table(self) -> torch.Tensor | None:
        """[max_batch + 1, 2] seconds of a plain and of a drafting step (draft_max_batch="auto")."""
        return self.policy.step_cost_table

    # ---- requests ----------------------------------------------------------------------------------------------

    def add_request(self, prompt: Sequence[int], params: SamplingParams | None = None) -> int:
        """Queue a request (token ids); returns its id. Bad input raises before anything is queued."""
        params = params or SamplingParams()
        prompt = checked_prompt(prompt, params, self.target.config.vocab_size)
        capacity = self.pages.capacity
        if self.pages.lifetime_tokens(len(prompt), params.max_new_tokens) > capacity:
            raise ValueError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({params.max_new_tokens}) does not fit "
                             f"the KV cache ({capacity} tokens): raise max_tokens")
        req = Request(self._next_id, prompt, params)
        self._next_id += 1
        self.waiting.append(req)
        return req.id

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.results)

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
        if self.running and self.policy.needs_profile:
            # on CPU a step's wall time is its cost, and the profile's are scaled by it; on CUDA the host's is not
            self.policy.set_profiled(self.profile_step_costs(), learn_costs=self.device.type == "cpu")
        t0 = time.perf_counter()
        launched = bool(self.running)
        if launched:
            self._launch_decode()
        self._collect(self._lag if launched else 0, new)
        self.stats.decode_s += time.perf_counter() - t0
        return new

    # ---- admission and prefill -------------------------------------------------------------------------------

    def _admit(self) -> list[Request]:
        """Waiting requests that get a batch slot and the KV pages of their lifetime now (in arrival order)."""
        admitted = []
        while self.waiting and len(self.running) + len(admitted) < self.max_batch:
            req = self.waiting[0]
            try:
                req.prefill_slots, req.drafter_slots = self.pages.reserve(req.id, len(req.prompt),
                                                                          req.params.max_new_tokens)
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
        prompts = _prompt_batch(batch, dev)
        target_pages = self.target_cache.page_table(prompts.request_ids, width=width)
        backend = PagedAttention(self.target_cache.layer_caches(),
                                 slot_mapping=torch.cat([r.prefill_slots for r in batch]), page_table=target_pages,
                                 seq_lens=prompts.seq_lens, cu_q_lens=prompts.cu, causal=True,
                                 max_block_rows=prompts.longest)
        out = self.target(prompts.ids, prompts.positions, kv=backend, hidden_layers=self.hidden_layers,
                          return_logits=False)
        logits = self.target.compute_logits(out.hidden[prompts.last]).unsqueeze(1)
        params = _sampling_tensors(batch, dev)
        tokens, _ = verify(logits, torch.empty(len(batch), 0, dtype=torch.int32, device=dev), None,
                           offset=torch.zeros(len(batch), dtype=torch.int64, device=dev), **params)
        first = tokens[:, 0].to(torch.long)
        s = self.slots.span(len(self.running), len(self.running) + len(batch))
        self.proposer.prefill(s, prompts, out, first, [r.drafter_slots for r in batch])
        s.join(first, prompts.seq_lens, to_device([r.params.max_new_tokens - 1 for r in batch], torch.int32, dev),
               params, target_pages)
        for req in batch:
            req.prefill_slots = req.drafter_slots = None
        self.running.extend(batch)
        zeros = torch.zeros_like(tokens[:, :1])
        self.results.push(batch, torch.cat((tokens[:, :1], zeros, zeros), 1), decode=False)
        self.stats.prefill_s += time.perf_counter() - t0

    # ---- one decode step -----------------------------------------------------------------------------------------

    def _launch_decode(self) -> None:
        B = len(self.running)
        rows = self._bucket(B) if self.cuda_graphs else B
        drafting = self.policy.choose(rows)
        t0 = time.perf_counter()
        out = self._run_step(rows, drafting)
        if self.policy.learn_costs:   # on CPU the step has run to completion
            self.policy.observe_cost(rows, drafting, time.perf_counter() - t0)
        self.results.push(list(self.running), out[:B], decode=True, drafted=drafting)

    def _bucket(self, B: int) -> int:
        """The slots a CUDA graph runs for B requests: the next power of two (at most max_batch)."""
        return min(self.max_batch, 1 << (B - 1).bit_length())

    def _run_step(self, B: int, drafting: bool) -> torch.Tensor:
        """Run (eagerly, or by replaying its CUDA graph) the decode step over the first B slots."""
        return self.graphs.run(B, drafting) if self.cuda_graphs else self._decode(B, drafting)

    @torch.no_grad()
    def _decode(self, B: int, drafting: bool) -> torch.Tensor:
        """One decode step of slots 0..B-1, device tensors only; returns [B, G+3] int32 (G = block_size):
        tokens [G+1] (accepted drafts, then the sampled token; -1 after) | accepted | verified drafts.
        Without ``drafting`` the step drafts nothing and verifies the anchor alone (plain decoding)."""
        s = self.slots.rows(B)
        G = self.block_size if drafting else 0
        # Never verify drafts a request could not emit (its remaining budget).
        max_len = (s.remaining - 1).clamp(0, G).to(torch.int32)
        with self._phase("draft_s"):
            drafts, draft_probs, confidence = self._draft(s) if G else \
                (torch.empty(B, 0, dtype=torch.int32, device=self.device), None, None)
        with self._phase("schedule_s"):
            lengths = _verify_lengths(self.scheduler, confidence, max_len, self._sps, s.conf_old) if G else max_len
        with self._phase("verify_s"):
            # rows past a request's scheduled length are forwarded only at fixed shapes, and never accepted
            block = VerifyBlock.build(s.start, lengths, G + 1, fixed_shapes=self.fixed_shapes)
            logits, out = self._forward_block(s, block, drafts)
            tokens, num_accepted = verify(logits, drafts, draft_probs, num_draft=lengths,
                                          draft_index=self.proposer.draft_index(draft_probs),
                                          temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                                          seed=s.seed, offset=s.offset)
            self._rollback(s, block, out, tokens, num_accepted, confidence)
        pad = tokens.new_full((B, self.block_size - G), -1)   # a plain step's row is as wide as a drafting one's
        return torch.cat((tokens, pad, num_accepted.unsqueeze(1), lengths.unsqueeze(1)), 1)

    def _draft(self, s: SlotState):
        """(drafts [B, G] int32, draft distributions [B, G, V] (or over the draft vocabulary: verify reads them
        through the strategy's ``draft_index``), confidences [B, G] or None)."""
        return self.proposer.propose(s)

    def _forward_block(self, s: SlotState, block: VerifyBlock, drafts: torch.Tensor):
        """The target over every slot's verify block [anchor, drafts]: (logits [B, G1, V], the forward)."""
        tokens = torch.cat((s.anchor.unsqueeze(1), drafts.to(torch.long)), 1)
        slots = block.rows(position_slots(s.target_pages, block.positions, self.target_cache.page_size))
        backend = PagedAttention(self.target_cache.layer_caches(), slot_mapping=slots, page_table=s.target_pages,
                                 seq_lens=block.seq_lens, cu_q_lens=block.cu, causal=True)
        out = self.target(block.rows(tokens), block.flat_positions, kv=backend, hidden_layers=self.hidden_layers)
        logits = out.logits.view(*tokens.shape, -1) if block.row_mask is None else out.logits[block.row_of]
        return logits, out

    def _rollback(self, s: SlotState, block: VerifyBlock, out, tokens, num_accepted, confidence) -> None:
        """The anchor and the accepted drafts stay in the target cache (num_accepted < 0: an invalid row,
        nothing stays), the strategy's context follows (its length is the target's, s.start), the slots move on."""
        live = s.remaining > 0
        kept = torch.where(live & (num_accepted >= 0), num_accepted + 1, 0).to(torch.int32)
        kv_rollback(self.target_cache.k, self.target_cache.v, s.target_pages, block.seq_lens, s.start, None, kept)
        last = (kept.to(torch.long) - 1).clamp(min=0).unsqueeze(1)
        self.proposer.extend(s, out, tokens, block, block.row_of.gather(1, last).squeeze(1), kept > 0)
        s.anchor.copy_(torch.where(kept > 0, tokens.gather(1, last).squeeze(1).to(torch.long), s.anchor))
        s.start.copy_(block.seq_lens)
        s.offset.add_(live.to(torch.long))
        s.remaining.sub_(kept)
        s.push_confidence(confidence)

    def _phase(self, name: str):
        """Time a phase of an eager CPU step into ``stats.<name>`` (on CUDA the host only launches work)."""
        return _timed(self.stats, name) if self.device.type == "cpu" else contextlib.nullcontext()

    # ---- results -------------------------------------------------------------------------------------------------

    def _collect(self, keep: int, new: dict[int, list[int]]) -> None:
        """Apply the results of all but the last ``keep`` launched steps, then let finished requests leave."""
        for launched in self.results.ready(keep):
            applied = apply_step(launched, self.stats, new, self._record)
            if launched.drafted and applied.rows and self.policy.auto:
                self.policy.observe(applied.emitted / applied.rows, applied.verified / applied.rows)
        self._retire()

    def _record(self, req: Request, verified: int, accepted: int) -> None:
        record_acceptance(req, self.stats, verified, accepted)

    def _retire(self) -> None:
        """Finished requests leave: the others move to the front slots, their pages go back."""
        keep = [b for b, r in enumerate(self.running) if not r.finished]
        if len(keep) == len(self.running):
            return
        self.slots.keep(keep)
        self.slots.freeze(len(keep), self._pad_pages)
        for req in self.running:
            if req.finished:
                self.pages.free(req.id)
                self.finished[req.id] = req
        self.running = [self.running[b] for b in keep]

    # ---- profiles ----------------------------------------------------------------------------------------------

    def profile_sps(self, *, context: int = 128, warmup: int = 1, iters: int = 3) -> torch.Tensor:
        """Target steps/s for verify batches of B = 0..max_batch*(G+1) tokens (:func:`.profiles.verify_sps`)."""
        return verify_sps(self, context=context, warmup=warmup, iters=iters)

    def profile_step_costs(self, *, warmup: int = 1, iters: int = 5) -> torch.Tensor:
        """Seconds of a plain and of a drafting decode step over B = 1..max_batch slots: [max_batch + 1, 2]
        float64, row B (:func:`.profiles.step_costs`); the slot state and the phase timers stay as they were."""
        return step_costs(self, warmup=warmup, iters=iters)


def _prompt_batch(batch: list[Request], device) -> PromptBatch:
    """The prompts of ``batch`` flattened for one prefill forward."""
    lens = [len(r.prompt) for r in batch]
    ends = list(itertools.accumulate(lens))
    return PromptBatch(request_ids=[r.id for r in batch],
                       ids=to_device([t for r in batch for t in r.prompt], torch.long, device),
                       positions=to_device([i for n in lens for i in range(n)], torch.long, device),
                       cu=to_device([0, *ends], torch.int32, device), seq_lens=to_device(lens, torch.int32, device),
                       last=to_device(ends, torch.long, device) - 1, longest=max(lens))


def _sampling_tensors(batch: list[Request], device) -> dict[str, torch.Tensor]:
    """The requests' sampling parameters as ``verify`` takes them (and the slot state keeps them)."""
    p = [r.params for r in batch]
    return {"temperature": to_device([q.temperature for q in p], torch.float32, device),
            "top_k": to_device([q.top_k for q in p], torch.int32, device),
            "top_p": to_device([q.top_p for q in p], torch.float32, device),
            "min_p": to_device([q.min_p for q in p], torch.float32, device),
            "seed": to_device([q.seed for q in p], torch.int64, device)}


@contextlib.contextmanager
def _timed(stats: EngineStats, name: str):
    t0 = time.perf_counter()
    yield
    setattr(stats, name, getattr(stats, name) + time.perf_counter() - t0)


def _pack_linear(target: LlamaModel, proposer, packed_linear: bool | None) -> dict[str, dict]:
    """Route CPU fp32 projections through ``dspark_ops.linear`` (default: on CPU); the plans by model."""
    if packed_linear is None:
        packed_linear = target.device.type == "cpu" and target.dtype == torch.float32
    if not packed_linear:
        return {}
    plans = {"target": pack_linear_layers(target).summary()}
    drafter_plan = proposer.pack_linear()
    return plans if drafter_plan is None else plans | {"drafter": drafter_plan}


def _verify_lengths(scheduler: str, confidence, max_len, sps, conf_old) -> torch.Tensor:
    """How many drafts each request verifies (see the ``scheduler`` argument)."""
    if scheduler == "fixed" or confidence is None:
        return max_len
    if scheduler == "sync":
        return schedule_verify_lengths(confidence, sps, mode="sync", max_len=max_len)
    # async: capacity planned from the confidences two steps old (1 for a request that joined since)
    capacity = plan_capacity(conf_old, sps, max_len=max_len)
    return schedule_verify_lengths(confidence, sps, mode="async", capacity=capacity, max_len=max_len)
