"""The drafter training loop (DeepSpec recipe, DSPARK.md section 2), single process or under torchrun/DDP.

One step: a batch of sequences (prompt + target-generated response) goes
through the frozen target once (no grad) for the chosen layers' hidden states
and its last hidden state; ``anchors_per_seq`` random anchors per sequence,
inside the response, become blocks of G positions; the drafter predicts every
block in one pass and the losses of :mod:`.losses` compare it with the ground
truth and with the target's own distribution at the same positions (the frozen
LM head applied to the target's last hidden state).

With ``draft_vocab`` = K > 0 the drafter is trained over the K ids most
frequent in the training responses, the draft vocabulary it is saved with and
proposes from at inference: its logits, Markov bias and losses cover those ids
only (the target's distribution stays normalised over every id, see
:mod:`.losses`), which makes the losses the exact inference-time quantities
and the vocabulary-sized work of a step V/K times smaller. With
``markov_w1_draft_vocab_only`` every id outside the K shares one row of the
Markov head's W1 (``DraftVocab.shared_row_ids``), so the drafter is saved with
K + 1 rows of it instead of V and a wide Markov rank fits a small file.

Variants (same data, same target layers, same anchors):

- ``dspark``: DSpark drafter (Markov head of rank r, confidence head),
  0.1 CE + 0.9 TV + 1.0 confidence BCE;
- ``dflash``: the same backbone with rank 0 and no confidence head, CE only;
- ``eagle3``: one autoregressive layer over the fused target features,
  unrolled G steps with training-time test (step j feeds the drafter's own
  step j-1 output and attends to the target-feature rows before the anchor
  plus its own earlier steps of the same chain, exactly as at inference);
  soft cross-entropy against the target's distribution.

Reproducibility: the data order of epoch e is a permutation seeded by
(seed, e); the anchors of step s come from a generator seeded by (seed, s),
drawn for the whole global batch. A checkpoint stores the drafter, AdamW and
scheduler states, the step (which fixes the data position) and the torch RNG
state, so a resumed run takes exactly the steps the uninterrupted run would
have taken.

Data parallelism (torchrun, DDP): rank r takes sequences r, r + world, ... of
each global batch with the anchors one process gives them, and every loss term
is divided by the weight sums of the whole global batch (all-reduced), so the
averaged gradient, and hence the update, is the one a single process takes on
the same global batch.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..draft_vocab import DraftVocab, frequency_ranked
from ..models.attention import CausalAttention, MaskedAttention
from ..models.drafter import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter
from ..models.llama import LlamaConfig, LlamaModel
from .data import Sample, pack_batch
from .features import TargetFeatures
from .losses import DFLASH_WEIGHTS, DSPARK_KL_WEIGHTS, DSPARK_WEIGHTS, EAGLE3_WEIGHTS, drafter_losses

VARIANTS = ("dspark", "dflash", "eagle3")
# qwen3: per-head q/k RMSNorm, no attention biases (what vLLM's qwen3_dspark and llama.cpp's DFlash / DSpark
# graph run); llama: the same without q/k norm (drafters trained before the standard format).
LAYER_STYLES = ("qwen3", "llama")


def default_target_layers(num_layers: int, count: int = 5) -> list[int]:
    """``count`` layer ids spread evenly from layer 1 to the second-to-last layer.

    Not the last: llama.cpp feeds a drafter the output of target layer k as the recorded input of layer k + 1,
    and its target graphs (Llama, Qwen3, ...) record no input past the last layer (llama-graph.cpp asserts)."""
    last = max(num_layers - 2, 0)
    first = min(1, last)
    count = min(count, last - first + 1)
    return sorted({round(first + i * (last - first) / max(count - 1, 1)) for i in range(count)})


@dataclass
class TrainConfig:
    variant: str = "dspark"
    num_layers: int = 1
    layer_style: str = "qwen3"                     # LAYER_STYLES
    block_size: int = 7
    markov_rank: int = 64
    target_layer_ids: list[int] | None = None     # None: default_target_layers(target depth)
    draft_vocab: int = 0                           # K > 0: train over the draft vocabulary (module docstring)
    markov_w1_draft_vocab_only: bool = False       # dspark over a draft vocabulary: ids outside it share a W1 row
    distill: str = "tv"                            # dspark's distillation term: "tv" (DeepSpec) or "kl" (soft CE)
    block_context: bool = False                    # dspark / dflash: DSparkConfig.block_context
    batch_size: int = 4                            # sequences per optimizer step (all ranks together)
    anchors_per_seq: int = 32
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16: bool = False                             # autocast to bfloat16 (defaults to on for CUDA in the CLI)
    seed: int = 0
    log_every: int = 10
    save_every: int = 100

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.layer_style not in LAYER_STYLES:
            raise ValueError(f"layer_style must be one of {LAYER_STYLES}, got {self.layer_style!r}")
        for name in ("num_layers", "block_size", "batch_size", "anchors_per_seq", "max_steps", "log_every",
                     "save_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.draft_vocab < 0:
            raise ValueError(f"draft_vocab must be >= 0 (0: every id), got {self.draft_vocab}")
        if self.distill not in ("tv", "kl") or (self.distill == "kl" and self.variant != "dspark"):
            raise ValueError(f"distill must be 'tv' or 'kl' (dspark variant only), got {self.distill!r}")
        if self.markov_w1_draft_vocab_only and (self.variant != "dspark" or not self.draft_vocab):
            raise ValueError("markov_w1_draft_vocab_only needs the dspark variant trained over a draft vocabulary")
        if self.block_context and self.variant == "eagle3":
            raise ValueError("block_context is a dspark / dflash option (EAGLE-3 reads the context in its residual)")
        if self.variant == "dspark" and self.markov_rank < 1:
            raise ValueError("the dspark variant needs markov_rank >= 1 (rank 0 is the dflash variant)")
        if not self.lr > 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0, warmup_steps >= 0 and min_lr_ratio in [0, 1]")


def build_drafter(cfg: TrainConfig, target: LlamaModel) -> DSparkDrafter | Eagle3Drafter:
    """A freshly initialised drafter of ``cfg.variant`` for ``target`` (float32, the target's device)."""
    tc = target.config
    layers = cfg.target_layer_ids or default_target_layers(tc.num_hidden_layers)
    backbone = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": cfg.num_layers, "model_type": cfg.layer_style,
                              "qk_norm": cfg.layer_style == "qwen3", "qkv_bias": False, "o_bias": False,
                              "mlp_bias": False})
    kwargs = dict(dtype=torch.float32, seed=cfg.seed, device=target.device)
    if cfg.variant == "eagle3":
        return Eagle3Drafter(Eagle3Config(backbone, layers, tc.num_hidden_layers, ttt_length=cfg.block_size),
                             target, **kwargs)
    mask_id = tc.pad_token_id if tc.pad_token_id is not None else 0
    rank = cfg.markov_rank if cfg.variant == "dspark" else 0
    conf = cfg.variant == "dspark"
    config = DSparkConfig(backbone, layers, tc.num_hidden_layers, block_size=cfg.block_size, mask_token_id=mask_id,
                          markov_rank=rank, enable_confidence_head=conf, confidence_head_with_markov=conf,
                          markov_w1_draft_vocab_only=cfg.markov_w1_draft_vocab_only, block_context=cfg.block_context)
    return DSparkDrafter(config, target, **kwargs)


def autocast(cfg: TrainConfig, device: torch.device):
    """bfloat16 autocast when ``cfg.bf16``, else nothing."""
    if not cfg.bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def target_features(cfg: TrainConfig, target: LlamaModel, layer_ids: list[int], *, memory_gb: float = 2.0,
                    folder=None, with_lse: bool = True) -> TargetFeatures:
    """The target's training features as a run with ``cfg`` computes them (the same autocast)."""
    return TargetFeatures(target, layer_ids, memory_gb=memory_gb, folder=folder, with_lse=with_lse,
                          autocast=lambda: autocast(cfg, target.device))


def response_draft_vocab(samples: list[Sample], vocab_size: int, size: int) -> DraftVocab:
    """The draft vocabulary of the ``size`` ids most frequent in the samples' responses."""
    return DraftVocab(frequency_ranked((s.response for s in samples), vocab_size, min(size, vocab_size)), vocab_size)


def init_from_drafter(drafter: DSparkDrafter | Eagle3Drafter, folder) -> list[int]:
    """Start ``drafter`` from a trained drafter of the same kind with as many or fewer layers (warm start).

    Every stored tensor is copied; layers the stored drafter lacks keep their fresh initialisation except
    their output projections (attention o_proj, MLP down_proj), which are zeroed, so each new layer is
    the identity on the residual stream and the warm-started drafter computes exactly what the stored
    one does until training moves it. Returns the indices of the new layers.
    """
    kind = type(drafter)
    init = kind.from_pretrained(folder, drafter.target, dtype=drafter.dtype, device=drafter.fc.weight.device)
    for key in ("target_layer_ids", "mask_token_id", "markov_rank"):   # equal shapes would not catch these
        if getattr(init.config, key, None) != getattr(drafter.config, key, None):
            raise ValueError(f"--init-from {folder}: its {key} is {getattr(init.config, key, None)}, "
                             f"this run's is {getattr(drafter.config, key, None)}")
    old, new = init.state_dict(), drafter.state_dict()
    unexpected = sorted(set(old) - set(new))
    wrong = [n for n in old if n in new and old[n].shape != new[n].shape]
    if unexpected or wrong:
        raise ValueError(f"--init-from {folder}: not a smaller {kind.__name__} of this configuration "
                         f"(unexpected tensors {unexpected[:3]}, shapes differ for {wrong[:3]})")
    added = sorted({int(m.group(1)) for n in set(new) - set(old) if (m := re.match(r"layers\.(\d+)\.", n))})
    missing = [n for n in set(new) - set(old) if not re.match(r"layers\.\d+\.", n)]
    if missing:
        raise ValueError(f"--init-from {folder}: the stored drafter lacks {sorted(missing)[:3]}")
    with torch.no_grad():
        drafter.load_state_dict(old, strict=False)
        for i in added:
            drafter.layers[i].self_attn.o_proj.weight.zero_()
            drafter.layers[i].mlp.down_proj.weight.zero_()
    return added


def sample_anchors(lengths: torch.Tensor, prompt_lens: torch.Tensor, count: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[B, count] anchor positions in [prompt_len - 1, length - 2] (so each block has at least one label).

    Without replacement when the response is long enough, else with replacement.
    """
    S = int(lengths.max())
    pos = torch.arange(S)
    allowed = (pos.unsqueeze(0) >= (prompt_lens - 1).clamp_min(1).unsqueeze(1)) & \
              (pos.unsqueeze(0) <= (lengths - 2).unsqueeze(1))
    out = torch.empty(len(lengths), count, dtype=torch.long)
    for b in range(len(lengths)):
        n = int(allowed[b].sum())
        if n == 0:
            raise ValueError(f"sequence {b} has no response token to predict (length {int(lengths[b])}, "
                             f"prompt {int(prompt_lens[b])})")
        out[b] = torch.multinomial(allowed[b].float(), count, replacement=n < count, generator=generator)
    return out


class _StepModule(nn.Module):
    """The drafter's differentiable part of one step, as one module call (what DDP wraps).

    With a draft vocabulary ``vocab`` every logit covers its ids only (see the module docstring)."""

    def __init__(self, drafter, variant: str, vocab: DraftVocab | None, distill: str = "tv", total_weights=None):
        super().__init__()
        self.drafter, self.variant, self.total_weights = drafter, variant, total_weights
        self.weights = {"eagle3": EAGLE3_WEIGHTS, "dflash": DFLASH_WEIGHTS,
                        "dspark": DSPARK_KL_WEIGHTS if distill == "kl" else DSPARK_WEIGHTS}[variant]
        self.vocab_ids = self.to_draft = self.lm_head = self.w1_row = None
        if vocab is not None:
            dev = drafter.fc.weight.device
            self.vocab_ids = vocab.ids.to(dev)
            # A target id's draft index is its row in the vocabulary's order (the K ids come first), else -1.
            self.to_draft = torch.where(vocab.position < len(vocab), vocab.position, -1).to(dev)
            self.lm_head = vocab.lm_head(drafter.target.lm_head_weight.detach()).float()   # frozen: built once
            if getattr(drafter.config, "markov_w1_draft_vocab_only", False):
                self.w1_row = vocab.shared_row_ids().to(dev)

    def forward(self, ids, features, last_hidden, lengths, anchors, target_lse=None):
        d, G = self.drafter, self.drafter.config.block_size if self.variant != "eagle3" else self.drafter.config.ttt_length
        B, A = anchors.shape
        S = ids.shape[1]
        k = torch.arange(G, device=ids.device)
        label_pos = anchors.unsqueeze(-1) + k + 1                       # [B, A, G]
        valid = label_pos < lengths.view(-1, 1, 1).to(ids.device)
        rows = torch.arange(B, device=ids.device).view(-1, 1, 1)
        labels = ids[rows, label_pos.clamp_max(S - 1)]
        prev_pos = (label_pos - 1).clamp_max(S - 1)
        prev = ids[rows, prev_pos]                                       # x_{k-1}: anchor, then ground truth
        lse, lm_head = None, self.lm_head
        with torch.no_grad():
            if lm_head is None:
                target_logits = d.target.compute_logits(last_hidden[rows, prev_pos])
            else:
                target_logits = torch.nn.functional.linear(last_hidden[rows, prev_pos], lm_head)
                lse = target_lse[rows, prev_pos]
                labels = self.to_draft[labels]
        conf = None
        if self.variant == "eagle3":
            logits = eagle3_ttt_logits(d, ids, features, anchors, lm_head=lm_head)
        else:
            block = d.forward_train(ids, features, anchors, lm_head=lm_head)
            if self.w1_row is not None:   # the W1 row each previous token reads
                prev = self.w1_row[prev]
            logits = d.markov_logits(block.logits, prev, self.vocab_ids)
            if self.variant == "dspark":
                conf = d.confidence_logits(block.hidden, prev)
        V = logits.shape[-1]
        return drafter_losses(logits.reshape(B * A, G, V), target_logits.reshape(B * A, G, V),
                              labels.reshape(B * A, G), valid.reshape(B * A, G), self.weights,
                              None if conf is None else conf.reshape(B * A, G),
                              None if lse is None else lse.reshape(B * A, G), self.total_weights)


class _RecordingAttention:
    """Wraps a backend and keeps the K/V each layer attends with (for the next TTT step's context)."""

    def __init__(self, inner):
        self.inner, self.kv = inner, {}

    def append(self, layer, k, v):
        self.inner.append(layer, k, v)

    def attend(self, layer, q, k, v):
        self.kv[layer] = (k, v)
        return self.inner.attend(layer, q, k, v)


def eagle3_ttt_logits(drafter: Eagle3Drafter, ids: torch.Tensor, features: torch.Tensor,
                      anchors: torch.Tensor, lm_head: torch.Tensor | None = None) -> torch.Tensor:
    """Training-time test: logits [B, A, G, V] of G unrolled draft steps per anchor (over the rows of
    ``lm_head`` when given).

    Step 1 runs causally over all rows (row t pairs target feature t with
    token t+1 at RoPE position t). The chain of anchor a starts at row
    t = a - 1 (its last target row), so step j predicts the token at a + j,
    the same labels as the DSpark block of that anchor. Step j >= 2 feeds the
    chain's step j-1 output with the ground-truth token a + j - 1 at position
    a + j - 2 and attends to the step-1 rows <= t plus the chain's own steps
    2..j (the rows an inference-time drafter would have in its cache).
    """
    B, S = ids.shape
    A, G = anchors.shape[1], drafter.config.ttt_length
    dev = ids.device
    rows = torch.arange(B, device=dev).view(-1, 1)
    step_ids = torch.cat((ids[:, 1:], ids[:, -1:]), dim=1)               # token t+1 at row t
    rec = _RecordingAttention(CausalAttention())
    h = drafter(step_ids, features, torch.arange(S, device=dev).expand(B, S), kv=rec)
    start = (anchors - 1).clamp_min(0)                                   # chain start rows [B, A]
    ctx_k = {i: [kv[0]] for i, kv in rec.kv.items()}
    ctx_v = {i: [kv[1]] for i, kv in rec.kv.items()}
    h_chain = h[rows, start]                                             # [B, A, d]
    outs = [h_chain]
    first_visible = torch.arange(S, device=dev).view(1, 1, -1) <= start.unsqueeze(-1)   # [B, A, S]
    own = torch.eye(A, dtype=torch.bool, device=dev).expand(B, A, A)
    for j in range(2, G + 1):
        tok = ids[rows, (start + j).clamp_max(S - 1)]
        pos = start + j - 1
        mask = torch.cat([first_visible] + [own] * (j - 1), dim=-1)      # earlier steps + this step's own key
        backend = MaskedAttention(mask)
        for layer in ctx_k:
            backend.append(layer, torch.cat(ctx_k[layer], 1), torch.cat(ctx_v[layer], 1))
        rec = _RecordingAttention(backend)
        h_chain = drafter(tok, h_chain, pos, kv=rec, from_target=False)
        for layer, (k, v) in rec.kv.items():
            ctx_k[layer].append(k)
            ctx_v[layer].append(v)
        outs.append(h_chain)
    return drafter.compute_logits(torch.stack(outs, dim=2), lm_head)


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        t = (step - cfg.warmup_steps) / max(cfg.max_steps - cfg.warmup_steps, 1)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
    return f


def _global_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the data-parallel ranks."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA); (rank, world) = (0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _dist_info()


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0


class Trainer:
    """Trains ``drafter`` on ``samples`` (see the module docstring); ``out_dir`` receives checkpoints and logs."""

    def __init__(self, cfg: TrainConfig, target: LlamaModel, drafter, samples: list[Sample], out_dir, *,
                 progress: bool = True, log=print, feature_cache_gb: float = 2.0, feature_dir=None):
        if not samples:
            raise ValueError("the training set is empty: generate data first (dspark train-draft --num-train N)")
        usable = [s for s in samples if len(s.response) >= 1]
        if not usable:
            raise ValueError("no training sample has a response token")
        max_ctx = target.config.max_position_embeddings
        too_long = [s.id for s in usable if len(s.ids) + cfg.block_size > max_ctx]
        if too_long:
            raise ValueError(f"{len(too_long)} samples (e.g. id {too_long[0]}) do not fit the target's context "
                             f"({max_ctx} tokens incl. a block of {cfg.block_size})")
        self.cfg, self.target, self.drafter, self.samples = cfg, target, drafter, usable
        self.out_dir = Path(out_dir)
        self.rank, self.world = _dist_info()
        if cfg.batch_size % self.world:
            raise ValueError(f"batch_size {cfg.batch_size} must be a multiple of the number of processes {self.world}")
        self.progress, self.log = progress and self.rank == 0, log if self.rank == 0 else (lambda *a, **k: None)
        self.target_layers = list(drafter.config.target_layer_ids)
        self.pad_id = target.config.pad_token_id if target.config.pad_token_id is not None else 0
        target.requires_grad_(False)
        self.draft_vocab = None
        if cfg.draft_vocab:
            self.draft_vocab = response_draft_vocab(usable, target.config.vocab_size, cfg.draft_vocab)
            drafter.draft_vocab = self.draft_vocab
            if getattr(drafter.config, "markov_rank", 0):   # W2 is trained for the draft ids only
                drafter.config.markov_w2_draft_vocab_only = True
        module = _StepModule(drafter, cfg.variant, self.draft_vocab, cfg.distill,
                             _global_sum if self.world > 1 else None)
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel
            module = DistributedDataParallel(module)
        self.module = module
        decay = [p for n, p in drafter.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in drafter.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(0.9, 0.95))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg))
        self.state = TrainState()
        self.features = target_features(cfg, target, self.target_layers, memory_gb=feature_cache_gb,
                                        folder=feature_dir, with_lse=self.draft_vocab is not None)

    # ---- data

    def _batch_indices(self, step: int) -> list[int]:
        """The sample indices of ``step``'s global batch: epoch permutations seeded by (seed, epoch)."""
        n, B = len(self.samples), self.cfg.batch_size
        perms, out = {}, []
        for i in range(step * B, (step + 1) * B):
            epoch, pos = divmod(i, n)
            if epoch not in perms:
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch))
            out.append(int(perms[epoch][pos]))
        return out

    # ---- one step

    def _autocast(self):
        return autocast(self.cfg, self.target.device)

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.state.step
        everyone = [self.samples[i] for i in self._batch_indices(step)]
        _, all_lengths, all_prompt_lens = pack_batch(everyone, self.pad_id)
        g = torch.Generator().manual_seed((cfg.seed * 1_000_003 + step) * 4099)
        shard = slice(self.rank, None, self.world)   # this rank's sequences, with the anchors of the global batch
        anchors = sample_anchors(all_lengths, all_prompt_lens, cfg.anchors_per_seq, g)[shard]
        batch = everyone[shard]
        ids, lengths, prompt_lens = pack_batch(batch, self.pad_id)
        dev = self.target.device
        anchors, ids = anchors.to(dev), ids.to(dev)
        features, last_hidden, *lse = self.features.batch(batch, ids.shape[1])
        self.module.train()
        with self._autocast():
            terms = self.module(ids, features, last_hidden, lengths, anchors, lse[0] if self.draft_vocab else None)
        self.optimizer.zero_grad(set_to_none=True)
        # The terms are this rank's share of the global batch's; DDP averages the ranks' gradients.
        (terms["loss"] * self.world).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.state.step += 1
        rec = {k: float(v.detach()) for k, v in terms.items() if v.dim() == 0}
        rec["accept"] = [round(float(a), 4) for a in terms["accept"]]
        rec["grad_norm"] = float(grad_norm)
        rec["tokens"] = int(lengths.sum())
        if self.world > 1:   # the global batch's terms: the sum of the ranks' shares
            keys = [k for k in ("loss", "ce", "tv", "conf", "soft_ce", "tokens") if k in rec]
            t = torch.tensor([rec[k] for k in keys], dtype=torch.float64)
            dist.all_reduce(t)
            rec.update({k: float(v) for k, v in zip(keys, t.tolist())}, tokens=int(t[-1]))
        return rec

    # ---- loop

    def train(self, stop_at: int | None = None) -> TrainState:
        """Run steps until ``cfg.max_steps`` (or ``stop_at``, earlier, keeping the schedule of max_steps)."""
        cfg = self.cfg
        end = cfg.max_steps if stop_at is None else min(stop_at, cfg.max_steps)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        metrics = self.out_dir / "metrics.jsonl"
        bar = None
        if self.progress:
            from tqdm import tqdm
            bar = tqdm(total=end, initial=min(self.state.step, end), desc=f"train {cfg.variant}",
                       dynamic_ncols=True, mininterval=5.0)
        window_tokens, window_t = 0, time.perf_counter()
        while self.state.step < end:
            t0 = time.perf_counter()
            rec = self.train_step()
            dt = time.perf_counter() - t0
            self.state.tokens += rec["tokens"]
            self.state.elapsed_s += dt
            window_tokens += rec["tokens"]
            step = self.state.step
            if self.rank == 0:
                rec.update(step=step, lr=self.scheduler.get_last_lr()[0], step_s=round(dt, 3),
                           tokens_total=self.state.tokens, elapsed_s=round(self.state.elapsed_s, 1))
                if step % cfg.log_every == 0 or step == end:
                    now = time.perf_counter()
                    rec["tokens_per_s"] = round(window_tokens / (now - window_t), 1)
                    window_tokens, window_t = 0, now
                    with metrics.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc1=f"{rec['accept'][0]:.2f}",
                                        tok_s=rec["tokens_per_s"])
            if bar is not None:
                bar.update(1)
            if step % cfg.save_every == 0 or step == end:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if self.rank == 0:
            plot_losses(metrics, self.out_dir / "loss.png")
        return self.state

    # ---- checkpoints

    def save_checkpoint(self) -> None:
        """out_dir/checkpoint/ (written to a temporary folder, then renamed: a crash never leaves half a checkpoint)."""
        if self.rank != 0:
            if self.world > 1:
                dist.barrier()
            return
        tmp, final = self.out_dir / "checkpoint.tmp", self.out_dir / "checkpoint"
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save({"drafter": self.drafter.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "state": asdict(self.state),
                    "train_config": asdict(self.cfg), "torch_rng": torch.get_rng_state()}, tmp / "trainer.pt")
        (tmp / "train_config.json").write_text(json.dumps(asdict(self.cfg), indent=2))
        if final.exists():
            old = self.out_dir / "checkpoint.old"
            final.rename(old)
            tmp.rename(final)
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
        else:
            tmp.rename(final)
        if self.world > 1:
            dist.barrier()

    def load_checkpoint(self, folder=None) -> bool:
        """Resume from out_dir/checkpoint (or ``folder``); False when there is none."""
        file = Path(folder or self.out_dir / "checkpoint") / "trainer.pt"
        if not file.is_file():
            return False
        ckpt = torch.load(file, map_location=self.target.device, weights_only=False)
        stored = {"layer_style": "llama", **ckpt["train_config"]}   # checkpoints from before layer_style
        changed = {k: (stored.get(k), v) for k, v in asdict(self.cfg).items()
                   if k not in ("max_steps", "log_every", "save_every") and stored.get(k) != v}
        if changed:
            raise ValueError(f"the checkpoint in {file.parent} was trained with other settings "
                             f"(stored, asked): {changed}")
        self.drafter.load_state_dict(ckpt["drafter"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.state = TrainState(**ckpt["state"])
        torch.set_rng_state(ckpt["torch_rng"])
        metrics = self.out_dir / "metrics.jsonl"
        if self.rank == 0 and metrics.is_file():   # drop what an interrupted run logged after its checkpoint
            kept = [l for l in metrics.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= self.state.step]
            metrics.write_text("".join(l + "\n" for l in kept))
        return True


def plot_losses(metrics_file, png) -> None:
    """Loss curves (total and each term) of a metrics.jsonl as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(l) for l in Path(metrics_file).read_text().splitlines() if l.strip()]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key in ("loss", "ce", "tv", "conf", "soft_ce"):
        vals = [r.get(key, 0.0) for r in recs]
        if any(vals):
            ax1.plot(steps, vals, label=key)
    ax1.set_xlabel("step")
    ax1.set_yscale("log")
    ax1.set_title("training losses")
    ax1.legend()
    G = len(recs[-1]["accept"])
    for k in range(G):
        ax2.plot(steps, [r["accept"][k] for r in recs], label=f"k={k + 1}")
    ax2.set_xlabel("step")
    ax2.set_title("soft acceptance 1 - TV per block position")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
