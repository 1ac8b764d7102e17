"""Drafters: DSpark (DFlash backbone + Markov head + confidence head) and an EAGLE-3-style baseline.

Both read the target's hidden states at a few layers (``target_layer_ids``,
-1 = embedding output, i = output of decoder layer i) concatenated into
[..., m*d], and share the target's embedding and LM head (frozen, never saved
with the drafter).

DSpark (../shared/design/DSPARK.md section 1). The context is projected once,
``ctx = RMSNorm(fc(features))``, and every drafter layer turns it into extra
keys/values with its own k/v projection (plus k-norm and RoPE at the context
positions); the layers never transform the context itself. A block is the
anchor (last verified token, position p) followed by ``block_size - 1`` mask
tokens at positions p+1..; the block attends to itself non-causally and to the
context of positions < p. Block row k predicts the token at position p+k+1, so
the anchor row is the first prediction. The Markov head adds
``W1[x_{k-1}] @ W2`` (W1 [V, r], W2 [r, V]; x_0 = the anchor) to row k's base
logits; rank 0 is DFlash. The confidence head is
``sigmoid(w . [h_k ; W1[x_{k-1}]] + b)``. With ``block_context`` (our
extension, off in DeepSpec's drafters) every block row's input also carries
the projected context of the last verified position, ``ctx[p-1]``, through its
own RMSNorm: the prediction starts from the target's latest state in the
residual stream (as EAGLE-3's does) instead of having to find it by attention.

Checkpoints are a config.json plus a model.safetensors with the tensor names
of DeepSpec's published drafters (``fc``, ``hidden_norm``,
``layers.i.self_attn.q_proj`` ..., ``markov_head.markov_w1/markov_w2``,
``confidence_head.proj``). Which layouts load and which one is written
(the standard one, that vLLM and llama.cpp read, for Qwen3-style layers) is
``dspark_ops.drafter_format``'s business; copies of the target embedding and
LM head are checked against the target and dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import drafter_format as fmt
from ..draft_vocab import FILE as DRAFT_VOCAB_FILE, DraftVocab
from .attention import DenseKVCache, MaskedAttention
from .layers import DecoderLayer, Linear, LinearImpl, RMSNorm, RotaryEmbedding, init_normal_
from .llama import (LlamaConfig, LlamaModel, check_positions, check_token_ids, layer_slots, resolve_attention,
                    slots_state_dict)
from .weights import Slot, load_slots, parse_dtype, read_config, save_safetensors, weight_files

DSPARK_ARCHITECTURES = fmt.DSPARK_ARCHITECTURES
EAGLE3_ARCHITECTURES = fmt.EAGLE3_ARCHITECTURES


def _require(d: dict, keys, what: str) -> None:
    missing = [k for k in keys if k not in d]
    if missing:
        raise ValueError(f"{what} config lacks {missing}")


def _validate_common(backbone: LlamaConfig, layer_ids: list[int], num_target_layers: int | None,
                     target: LlamaConfig, what: str) -> None:
    """The checks every drafter needs before it can share a target's embedding, LM head and hidden states."""
    if backbone.hidden_size != target.hidden_size:
        raise ValueError(f"{what} hidden_size {backbone.hidden_size} does not match the target's {target.hidden_size}")
    if backbone.vocab_size != target.vocab_size:
        raise ValueError(f"{what} vocab_size {backbone.vocab_size} does not match the target's {target.vocab_size}")
    if num_target_layers is not None and num_target_layers != target.num_hidden_layers:
        raise ValueError(f"{what} was built for a target with {num_target_layers} layers; "
                         f"this target has {target.num_hidden_layers}")
    if not layer_ids:
        raise ValueError(f"{what} target_layer_ids is empty")
    bad = [i for i in layer_ids if not -1 <= i < target.num_hidden_layers]
    if bad:
        raise ValueError(f"{what} target_layer_ids {bad} outside [-1, {target.num_hidden_layers - 1}]")
    if any(b <= a for a, b in zip(layer_ids, layer_ids[1:])):
        raise ValueError(f"{what} target_layer_ids must be strictly increasing, got {layer_ids}")


def _optional_int(value) -> int | None:
    return None if value is None else int(value)


@dataclass
class DSparkConfig:
    backbone: LlamaConfig          # the drafter's own layers (num_hidden_layers = drafter depth)
    target_layer_ids: list[int]
    num_target_layers: int | None  # the target's depth when known (the standard layout may omit it)
    block_size: int = 7
    mask_token_id: int = 0
    markov_rank: int = 256         # 0 = DFlash (no Markov head)
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    confidence_temperatures: list[float] | None = None   # per block position, from `dspark calibrate`
    confidence_offsets: list[float] | None = None        # per block position, added after the temperature
    # model.safetensors holds W2 only for the draft vocabulary's ids (the rest load as zero): with it the
    # drafter proposes exactly as before from its draft vocabulary, and every id without a Markov bias outside it.
    markov_w2_draft_vocab_only: bool = False
    # W1 was trained with one row shared by every id outside the draft vocabulary (``DraftVocab.shared_row_ids``):
    # model.safetensors holds its K + 1 distinct rows, so a wide rank fits a small file.
    markov_w1_draft_vocab_only: bool = False
    # every block row's input adds block_context_norm(ctx of the last verified position) (module docstring)
    block_context: bool = False

    def __post_init__(self):
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]
        if not 1 <= self.block_size <= 16:
            raise ValueError(f"block_size must be in [1, 16], got {self.block_size}")
        if self.confidence_temperatures is not None:
            temps = [float(t) for t in self.confidence_temperatures]
            if len(temps) != self.block_size or not all(0 < t < float("inf") for t in temps):
                raise ValueError(f"confidence_temperatures must be {self.block_size} finite values > 0, got {temps}")
            self.confidence_temperatures = temps
        if self.confidence_offsets is not None:
            offsets = [float(o) for o in self.confidence_offsets]
            if len(offsets) != self.block_size or not all(abs(o) < float("inf") for o in offsets):
                raise ValueError(f"confidence_offsets must be {self.block_size} finite values, got {offsets}")
            self.confidence_offsets = offsets
        if self.markov_rank < 0:
            raise ValueError(f"markov_rank must be >= 0, got {self.markov_rank}")
        if self.enable_confidence_head and self.confidence_head_with_markov and self.markov_rank == 0:
            raise ValueError("confidence_head_with_markov needs a Markov head (markov_rank > 0)")
        for name in ("markov_w1_draft_vocab_only", "markov_w2_draft_vocab_only"):
            if getattr(self, name) and self.markov_rank == 0:
                raise ValueError(f"{name} needs a Markov head (markov_rank > 0)")

    def validate_against(self, target: LlamaConfig) -> None:
        _validate_common(self.backbone, self.target_layer_ids, self.num_target_layers, target, "drafter")
        if not 0 <= self.mask_token_id < target.vocab_size:
            raise ValueError(f"drafter mask_token_id {self.mask_token_id} outside the vocabulary [0, {target.vocab_size})")

    @property
    def standard_layout(self) -> bool:
        """Saved in the standard layout (drafter_format): Qwen3-style layers, nothing only we read in the weights."""
        return self.backbone.qk_norm and not self.block_context

    def to_dict(self) -> dict:
        if self.standard_layout:
            extras = {name: getattr(self, name) for name in ("confidence_temperatures", "confidence_offsets",
                                                             "markov_w1_draft_vocab_only")}
            draft_vocab_size = None   # known to the drafter (its draft vocabulary), set by save_pretrained
            return fmt.standard_dspark_config(
                self.backbone.to_hf(), target_layer_ids=self.target_layer_ids,
                num_target_layers=self.num_target_layers, block_size=self.block_size,
                mask_token_id=self.mask_token_id, markov_rank=self.markov_rank,
                enable_confidence_head=self.enable_confidence_head,
                confidence_head_with_markov=self.confidence_head_with_markov, draft_vocab_size=draft_vocab_size,
                extras=extras)
        d = self.backbone.to_hf()
        d.update(architectures=["DSparkDrafter"], target_layer_ids=self.target_layer_ids,
                 num_target_layers=self.num_target_layers, block_size=self.block_size,
                 mask_token_id=self.mask_token_id, markov_rank=self.markov_rank, markov_head_type="vanilla",
                 enable_confidence_head=self.enable_confidence_head,
                 confidence_head_with_markov=self.confidence_head_with_markov)
        if self.confidence_temperatures is not None:
            d["confidence_temperatures"] = self.confidence_temperatures
        if self.confidence_offsets is not None:
            d["confidence_offsets"] = self.confidence_offsets
        for name in ("markov_w1_draft_vocab_only", "markov_w2_draft_vocab_only", "block_context"):
            if getattr(self, name):
                d[name] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DSparkConfig":
        """Our config.json or DeepSpec's (a copy of the target's Qwen3 config plus the drafter keys)."""
        _require(d, ("target_layer_ids", "block_size", "mask_token_id", "markov_rank", "enable_confidence_head"),
                 "DSpark drafter")
        rank = int(d["markov_rank"])
        if rank > 0 and d.get("markov_head_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"markov_head_type {d['markov_head_type']!r} is not supported (only vanilla)")
        conf = bool(d["enable_confidence_head"])
        return cls(backbone=LlamaConfig.from_hf(d), target_layer_ids=d["target_layer_ids"],
                   num_target_layers=_optional_int(d.get("num_target_layers")), block_size=int(d["block_size"]),
                   mask_token_id=int(d["mask_token_id"]), markov_rank=rank, enable_confidence_head=conf,
                   confidence_head_with_markov=bool(d.get("confidence_head_with_markov", False)) and conf,
                   confidence_temperatures=d.get("confidence_temperatures"),
                   confidence_offsets=d.get("confidence_offsets"),
                   markov_w1_draft_vocab_only=bool(d.get("markov_w1_draft_vocab_only", False)),
                   markov_w2_draft_vocab_only=bool(d.get("markov_w2_draft_vocab_only", False)),
                   block_context=bool(d.get("block_context", False)))


@dataclass
class Eagle3Config:
    backbone: LlamaConfig          # usually one layer
    target_layer_ids: list[int]    # e.g. low / mid / high layers
    num_target_layers: int | None
    ttt_length: int = 7            # draft steps unrolled in training (and drafted at inference)

    def __post_init__(self):
        self.target_layer_ids = [int(i) for i in self.target_layer_ids]

    def validate_against(self, target: LlamaConfig) -> None:
        _validate_common(self.backbone, self.target_layer_ids, self.num_target_layers, target, "EAGLE-3 drafter")

    def to_dict(self) -> dict:
        d = self.backbone.to_hf()
        d.update(architectures=["Eagle3Drafter"], target_layer_ids=self.target_layer_ids,
                 num_target_layers=self.num_target_layers, ttt_length=self.ttt_length)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3Config":
        _require(d, ("target_layer_ids",), "EAGLE-3 drafter")
        return cls(backbone=LlamaConfig.from_hf(d), target_layer_ids=d["target_layer_ids"],
                   num_target_layers=_optional_int(d.get("num_target_layers")),
                   ttt_length=int(d.get("ttt_length", 7)))


@dataclass
class DraftBlock:
    logits: torch.Tensor | None    # [..., G, V] base logits U (before the Markov bias)
    hidden: torch.Tensor           # [..., G, d] final-normed hidden states h (for the confidence head)


class _Drafter(nn.Module):
    """What both drafters share: the bound target, the linear hook, the context projection, checkpoints."""

    config_class: type
    architectures: tuple[str, ...]

    def _setup(self, config, target: LlamaModel, device, dtype):
        """Validate against the target, bind it, build the shared parts; returns the resolved (device, dtype)."""
        if not isinstance(target, LlamaModel):
            raise TypeError(f"target must be a LlamaModel, got {type(target).__name__}")
        config.validate_against(target.config)
        device = target.device if device is None else device
        dtype = parse_dtype(dtype) or target.dtype
        self.config = config
        # The target is shared, not owned: not a submodule, so it is neither saved nor trained with the drafter.
        self.__dict__["target"] = target
        self.linear_impl = LinearImpl()
        d = config.backbone.hidden_size
        self.fc = Linear(len(config.target_layer_ids) * d, d, bias=False, impl=self.linear_impl,
                         device=device, dtype=dtype)
        self.norm = RMSNorm(d, config.backbone.rms_norm_eps, device=device, dtype=dtype)
        b = config.backbone
        self.rotary = RotaryEmbedding(b.head_dim, b.rope_theta, b.rope_scaling, device=device)
        self.draft_vocab: DraftVocab | None = None  # set by from_pretrained / train-draft; used by the engine
        return device, dtype

    def _score(self, h: torch.Tensor, lm_head: torch.Tensor | None) -> torch.Tensor:
        """Logits of final-normed ``h``: over every id (the target's LM head), or over the rows ``lm_head``
        of it (a draft vocabulary's, through the drafter's own linear hook so the engine can pack them)."""
        if lm_head is None:
            return self.target.compute_logits(h.to(self.target.dtype))
        return self.linear_impl(h.to(lm_head.dtype), lm_head, None)

    def set_linear_impl(self, fn) -> None:
        """Route the drafter's own projections through ``fn(x, weight, bias)`` (the LM head is the target's)."""
        self.linear_impl.fn = fn

    def kv_cache_shape(self) -> tuple[int, int, int]:
        b = self.config.backbone
        return b.num_hidden_layers, b.num_key_value_heads, b.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.fc.weight.dtype

    def _check_features(self, features: torch.Tensor) -> None:
        want = len(self.config.target_layer_ids) * self.config.backbone.hidden_size
        if features.shape[-1] != want:
            raise ValueError(f"target features must have last dimension {want} "
                             f"({len(self.config.target_layer_ids)} layers x hidden size), got {features.shape[-1]}")

    def slots(self, standard: bool = False) -> dict[str, Slot]:
        """Stored tensor name -> parameter, in the standard layout or our earlier one (drafter_format)."""
        raise NotImplementedError

    def save_pretrained(self, path) -> None:
        """config.json + model.safetensors without the shared embedding and LM head: the standard layout for
        Qwen3-style DSpark drafters (with the draft vocabulary's d2t / t2d / LM-head rows when W2 is stored
        in draft-id space), our earlier one otherwise (drafter_format)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        cfg = self.config.to_dict()
        cfg["torch_dtype"] = str(self.dtype).removeprefix("torch.")
        standard = getattr(self.config, "standard_layout", False)
        tensors = slots_state_dict(self.slots(standard))
        vocab = self.draft_vocab
        draft_space = standard and getattr(self.config, "markov_w2_draft_vocab_only", False)
        if standard and getattr(self.config, "markov_w1_draft_vocab_only", False):
            # Trained with one W1 row for every id outside the draft vocabulary: written whole, as looked up.
            w1 = "markov_head.markov_w1.weight"
            tensors[w1] = tensors[w1].index_select(0, vocab.shared_row_ids().to(tensors[w1].device))
        if draft_space:   # the standard reduced vocabulary: draft id i is target id vocab.ids[i]
            cfg["draft_vocab_size"] = len(vocab)
            tensors.update(fmt.d2t_t2d(vocab.ids, self.config.backbone.vocab_size))
            tensors[fmt.LM_HEAD] = vocab.lm_head(self.target.lm_head_weight.detach()).to(self.dtype)
        (folder / "config.json").write_text(json.dumps(cfg, indent=2))
        save_safetensors(tensors, folder / "model.safetensors")
        (folder / DRAFT_VOCAB_FILE).unlink(missing_ok=True)
        if vocab is not None and not draft_space:
            vocab.save(folder)

    @classmethod
    def from_pretrained(cls, path, target: LlamaModel, *, dtype=None, device=None):
        if not isinstance(target, LlamaModel):
            raise TypeError(f"target must be a LlamaModel, got {type(target).__name__}")
        layout = fmt.read_layout(read_config(path), target.config.num_hidden_layers)
        if layout.kind != cls.kind:
            raise ValueError(f"{path}: architecture {read_config(path)['architectures'][0]!r} is not a "
                             f"{cls.__name__} (expected one of {', '.join(cls.architectures)})")
        if (Path(path) / "mask_embedding.pt").exists():
            raise NotImplementedError(f"{path}: mask_embedding.pt (a mask embedding of its own) is not supported")
        config = cls.config_class.from_dict(layout.config)
        config.validate_against(target.config)   # the config's mismatches first: they say more than the tensors'
        files = weight_files(path)
        vocab_size = target.config.vocab_size
        special = fmt.read_special_tensors(files)
        if layout.draft_vocab_size is not None:   # reduced draft vocabulary: d2t, LM-head rows, W2 in draft space
            vocab = DraftVocab(fmt.draft_vocab_ids(special, layout.draft_vocab_size, vocab_size), vocab_size)
            if fmt.LM_HEAD not in special:
                raise KeyError(f"{path}: draft_vocab_size {len(vocab)} < vocab_size {vocab_size} but the checkpoint "
                               f"has no {fmt.LM_HEAD!r} (the LM head's rows of the draft vocabulary)")
            fmt.check_shared_copy(fmt.LM_HEAD, special[fmt.LM_HEAD], target.lm_head_weight, vocab.ids)
            if getattr(config, "markov_rank", 0):
                config.markov_w2_draft_vocab_only = True
        else:
            vocab = DraftVocab.load(path, vocab_size)
            if fmt.LM_HEAD in special:
                fmt.check_shared_copy(fmt.LM_HEAD, special[fmt.LM_HEAD], target.lm_head_weight)
        if fmt.EMBED in special:
            fmt.check_shared_copy(fmt.EMBED, special[fmt.EMBED], target.embed_tokens.weight)
        dtype = parse_dtype(dtype) or fmt.stored_dtype(files, "fc.weight")
        model = cls(config, target, device="meta", dtype=dtype)
        model.to_empty(device=device or target.device)
        model.draft_vocab = vocab   # before the slots: they may index by it
        load_slots(model.slots(layout.standard), files, rename=fmt.tensor_name,
                   ignore=lambda n: n in fmt.SPECIAL_TENSORS or n.endswith("rotary_emb.inv_freq"))
        return model.eval()


class DSparkDrafter(_Drafter):
    """The DSpark drafter (DFlash backbone with ``markov_rank=0``). See the module docstring."""

    config_class = DSparkConfig
    architectures = DSPARK_ARCHITECTURES
    kind = "dspark"

    def __init__(self, config: DSparkConfig, target: LlamaModel, *, device=None, dtype=None,
                 init_std: float = 0.02, seed: int | None = None):
        super().__init__()
        device, dtype = self._setup(config, target, device, dtype)
        b, d, r = config.backbone, config.backbone.hidden_size, config.markov_rank
        self.hidden_norm = RMSNorm(d, b.rms_norm_eps, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(b, self.linear_impl, device=device, dtype=dtype)
                                    for _ in range(b.num_hidden_layers))
        self.markov_w1 = nn.Parameter(torch.empty(b.vocab_size, r, device=device, dtype=dtype)) if r else None
        self.markov_w2 = nn.Parameter(torch.empty(r, b.vocab_size, device=device, dtype=dtype)) if r else None
        self.block_context_norm = (RMSNorm(d, b.rms_norm_eps, device=device, dtype=dtype)
                                   if config.block_context else None)
        conf_in = d + (r if config.confidence_head_with_markov else 0)
        self.confidence_head = (Linear(conf_in, 1, bias=True, impl=self.linear_impl, device=device, dtype=dtype)
                                if config.enable_confidence_head else None)
        init_normal_(self, init_std, torch.Generator().manual_seed(seed) if seed is not None else None)
        if self.block_context_norm is not None and device != "meta":
            # Start the context at the token embeddings' scale, so neither input drowns the other.
            with torch.no_grad():
                emb = target.embed_tokens.weight.float()
                self.block_context_norm.weight.fill_(emb.pow(2).mean().sqrt().item())

    # ---- inference

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """ctx = RMSNorm(fc(features)): target features [..., m*d] -> [..., d]."""
        self._check_features(features)
        return self.hidden_norm(self.fc(features.to(self.dtype)))

    def _context_kv(self, features, positions, backend) -> torch.Tensor:
        ctx = self.project_context(features)
        cos, sin = self.rotary(positions, ctx.dtype)
        for i, layer in enumerate(self.layers):
            _, k, v = layer.self_attn.project(ctx, cos, sin)
            backend.append(i, k, v)
        return ctx

    def extend_context(self, features: torch.Tensor, positions: torch.Tensor | None = None, *, kv) -> torch.Tensor:
        """Store the drafter K/V of newly verified target positions; returns their projected context
        [..., d] (a ``block_context`` drafter's ``draft_block`` takes the last verified position's row).

        features: the target's ``layer_hidden`` [B, T, m*d] for a DenseKVCache
        (positions default to its lengths onward; the lengths advance), or any
        shape with a paged backend (positions required).
        """
        if kv is None:
            raise ValueError("extend_context needs a cache (a DenseKVCache or a paged backend)")
        backend, positions, advance = resolve_attention(kv, features.shape[:-1], positions, causal=False,
                                                        device=features.device)
        ctx = self._context_kv(features, check_positions(positions, features.shape[:-1]), backend)
        if advance:
            kv.advance(advance)
        return ctx

    def block_input_ids(self, anchor_ids: torch.Tensor) -> torch.Tensor:
        """[..., G]: the anchor followed by G-1 mask tokens."""
        ids = torch.full((*anchor_ids.shape, self.config.block_size), self.config.mask_token_id,
                         dtype=torch.long, device=anchor_ids.device)
        ids[..., 0] = anchor_ids
        return ids

    def draft_block(self, anchor_ids: torch.Tensor, anchor_positions: torch.Tensor | None = None, *, kv,
                    return_logits: bool = True, lm_head: torch.Tensor | None = None,
                    context: torch.Tensor | None = None) -> DraftBlock:
        """One parallel drafting pass: base logits U [B, G, V] and hidden h [B, G, d].

        anchor_ids [B]: the last verified token of each request, at position
        anchor_positions [B]; the cache must hold the context of exactly the
        positions before it. With a DenseKVCache the anchor position is the
        cache length (anchor_positions may be omitted) and the block's K/V are
        scratch (lengths do not advance). With a paged backend
        (causal=False), the engine appends the block at positions
        anchor..anchor+G-1 (seq_lens = anchor + G) and rolls its length back
        to the anchor afterwards. lm_head [K, d]: score only these rows of the
        target's LM head (a draft vocabulary's, ``DraftVocab.lm_head``).
        context [B, d]: with ``block_context``, the projected context of the
        position right before each anchor (a row of ``extend_context``'s result).
        """
        if kv is None:
            raise ValueError("draft_block needs a cache holding the target context")
        check_token_ids(anchor_ids, self.config.backbone.vocab_size, "anchor_ids")
        if anchor_ids.dim() != 1:
            raise ValueError(f"anchor_ids must be [B], got shape {list(anchor_ids.shape)}")
        if self.config.block_context:
            want = [anchor_ids.shape[0], self.config.backbone.hidden_size]
            if context is None or list(context.shape) != want:
                raise ValueError(f"this drafter has block_context: context must be {want} (the projected context "
                                 f"of the last verified position), got "
                                 f"{None if context is None else list(context.shape)}")
            context = context.unsqueeze(-2)
        elif context is not None:
            raise ValueError("context is only taken by a drafter with block_context")
        ids = self.block_input_ids(anchor_ids)
        offsets = torch.arange(self.config.block_size, device=ids.device)
        if isinstance(kv, DenseKVCache) and anchor_positions is not None:
            if not torch.equal(anchor_positions.cpu().to(torch.int64), kv.lengths):
                raise ValueError(f"anchor_positions {anchor_positions.tolist()} must equal the DenseKVCache "
                                 f"lengths {kv.lengths.tolist()} (the context must end right before the anchor)")
        positions = None if anchor_positions is None else anchor_positions.to(ids.device).unsqueeze(-1) + offsets
        backend, positions, _ = resolve_attention(kv, ids.shape, positions, causal=False, device=ids.device)
        return self._block_forward(ids, check_positions(positions, ids.shape), backend, return_logits, lm_head,
                                   context)

    def _block_forward(self, ids, positions, backend, return_logits, lm_head=None, context=None) -> DraftBlock:
        x = self.target.embed(ids).to(self.dtype)
        if context is not None:   # [..., 1 or G, d]: the last verified position's context, for every row
            x = x + self.block_context_norm(context.to(self.dtype))
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, backend, i)
        h = self.norm(x)
        return DraftBlock(self._score(h, lm_head) if return_logits else None, h)

    # ---- Markov and confidence heads

    def markov_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(W1 [V, r], W2 [r, V]) as ``markov_sample`` takes them; None for rank 0 (DFlash)."""
        return None if self.markov_w1 is None else (self.markov_w1, self.markov_w2)

    def markov_logits(self, base_logits: torch.Tensor, prev_tokens: torch.Tensor,
                      vocab_ids: torch.Tensor | None = None) -> torch.Tensor:
        """z_k = U_k + W1[x_{k-1}] @ W2 for given previous tokens [..., G] (x_0 = anchor); rank 0: U.

        With ``vocab_ids`` [K] the base logits cover those ids only, and so does the bias."""
        if self.markov_w1 is None:
            return base_logits
        w2 = self.markov_w2 if vocab_ids is None else self.markov_w2[:, vocab_ids]
        bias = self.markov_w1[prev_tokens] @ w2
        return base_logits + bias.to(base_logits.dtype)

    def confidence_logits(self, hidden: torch.Tensor, prev_tokens: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid confidence [..., G] = w . [h_k ; W1[x_{k-1}]] + b."""
        if self.confidence_head is None:
            raise ValueError("this drafter has no confidence head (enable_confidence_head=False)")
        feats = hidden
        if self.config.confidence_head_with_markov:
            feats = torch.cat((hidden, self.markov_w1[prev_tokens].to(hidden.dtype)), dim=-1)
        return self.confidence_head(feats).squeeze(-1)

    def confidence_weights(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(w [d + r], b []) for ``markov_sample`` (which always reads [h ; W1[x]]); None without the head."""
        if self.confidence_head is None:
            return None
        w = self.confidence_head.weight.reshape(-1)
        if self.markov_w1 is not None and not self.config.confidence_head_with_markov:
            w = torch.cat((w, w.new_zeros(self.config.markov_rank)))   # the head ignores W1[x]
        return w, self.confidence_head.bias.reshape(())

    # ---- training

    def forward_train(self, input_ids: torch.Tensor, features: torch.Tensor, anchor_positions: torch.Tensor, *,
                      return_logits: bool = True, lm_head: torch.Tensor | None = None) -> DraftBlock:
        """All anchor blocks of a batch in one differentiable pass (dense attention, no cache).

        input_ids [B, S], features [B, S, m*d] (target layer outputs at every
        position), anchor_positions [B, A] in [0, S). Block a of row b reads
        the context of positions < anchor_positions[b, a] and its own G
        tokens. Returns logits [B, A, G, V] (unless return_logits=False; over
        the rows of ``lm_head`` when given) and hidden [B, A, G, d]; row k of a
        block predicts input_ids[b, anchor + k + 1].
        """
        bsz, seq = input_ids.shape
        if features.shape[:2] != (bsz, seq):
            raise ValueError(f"features must be [{bsz}, {seq}, m*d], got {list(features.shape)}")
        if anchor_positions.dim() != 2 or anchor_positions.shape[0] != bsz:
            raise ValueError(f"anchor_positions must be [{bsz}, A], got {list(anchor_positions.shape)}")
        if (anchor_positions < 0).any() or (anchor_positions >= seq).any():
            raise ValueError(f"anchor_positions must lie in [0, {seq})")
        check_token_ids(input_ids, self.config.backbone.vocab_size)
        g, a = self.config.block_size, anchor_positions.shape[1]
        dev = input_ids.device
        anchor_positions = anchor_positions.to(dev)
        ids = self.block_input_ids(torch.gather(input_ids, 1, anchor_positions)).view(bsz, a * g)
        positions = (anchor_positions.unsqueeze(-1) + torch.arange(g, device=dev)).view(bsz, a * g)
        block_of_query = torch.arange(a * g, device=dev) // g
        ctx_visible = torch.arange(seq, device=dev).view(1, 1, -1) < anchor_positions.repeat_interleave(g, 1).unsqueeze(-1)
        same_block = block_of_query.view(-1, 1) == block_of_query.view(1, -1)
        mask = torch.cat((ctx_visible, same_block.expand(bsz, -1, -1)), dim=-1)
        backend = MaskedAttention(mask)
        ctx = self._context_kv(features, torch.arange(seq, device=dev).expand(bsz, seq), backend)
        context = None
        if self.config.block_context:   # ctx[anchor - 1] for each block; a block at position 0 has none
            last = torch.gather(ctx, 1, (anchor_positions - 1).clamp(min=0).unsqueeze(-1).expand(-1, -1, ctx.shape[-1]))
            last = last * (anchor_positions > 0).unsqueeze(-1).to(last.dtype)
            context = last.repeat_interleave(g, 1)
        out = self._block_forward(ids, positions, backend, return_logits, lm_head, context)
        return DraftBlock(None if out.logits is None else out.logits.view(bsz, a, g, -1),
                          out.hidden.view(bsz, a, g, -1))

    # ---- checkpoints

    def slots(self, standard: bool = False) -> dict[str, Slot]:
        s = {"fc.weight": Slot(self.fc.weight), "hidden_norm.weight": Slot(self.hidden_norm.weight),
             "norm.weight": Slot(self.norm.weight)}
        if self.block_context_norm is not None:
            s["block_context_norm.weight"] = Slot(self.block_context_norm.weight)
        for i, layer in enumerate(self.layers):
            s.update(layer_slots(layer, f"layers.{i}."))
        if self.markov_w1 is not None:
            vocab = self.draft_vocab
            for name in ("markov_w1_draft_vocab_only", "markov_w2_draft_vocab_only"):
                if getattr(self.config, name) and vocab is None:
                    raise ValueError(f"{name} is set but the drafter has no draft vocabulary ({DRAFT_VOCAB_FILE})")
            # The standard layout stores W1 whole: other readers look any previous token up in it.
            w1_rows = vocab.order[:len(vocab) + 1] if self.config.markov_w1_draft_vocab_only and not standard else None
            s["markov_head.markov_w1.weight"] = Slot(self.markov_w1, index=w1_rows, index_shares_last=True)
            # DeepSpec stores W2 as a Linear(r -> V) weight, [V, r].
            w2_cols = vocab.ids if self.config.markov_w2_draft_vocab_only else None
            s["markov_head.markov_w2.weight"] = Slot(self.markov_w2, transpose=True, index=w2_cols)
        if self.confidence_head is not None:
            s["confidence_head.proj.weight"] = Slot(self.confidence_head.weight)
            s["confidence_head.proj.bias"] = Slot(self.confidence_head.bias)
        return s


class Eagle3Layer(DecoderLayer):
    """EAGLE-3 decoder layer: attention over [norm(token embedding) ; norm(hidden)] (2d inputs)."""

    def __init__(self, cfg: LlamaConfig, impl: LinearImpl, *, device=None, dtype=None):
        super().__init__(cfg, impl, attn_input_size=2 * cfg.hidden_size, device=device, dtype=dtype)
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)

    def forward(self, emb, h, cos, sin, backend, layer: int) -> torch.Tensor:
        x = torch.cat((self.input_layernorm(emb), self.hidden_norm(h)), dim=-1)
        normed, h = self.post_attention_layernorm.add_forward(self.self_attn(x, cos, sin, backend, layer), h)
        return h + self.mlp(normed)


class Eagle3Drafter(_Drafter):
    """EAGLE-3-style baseline: one autoregressive decoder layer over fused target features.

    Convention (as in EAGLE-3 and DeepSpec): the hidden state of target
    position t is paired with the token at t+1 and RoPE position t; the output
    at that row predicts the token at t+2. Drafting step j feeds the drafter's
    own previous output (``from_target=False``) with the token just drafted.
    """

    config_class = Eagle3Config
    architectures = EAGLE3_ARCHITECTURES
    kind = "eagle3"

    def __init__(self, config: Eagle3Config, target: LlamaModel, *, device=None, dtype=None,
                 init_std: float = 0.02, seed: int | None = None):
        super().__init__()
        device, dtype = self._setup(config, target, device, dtype)
        self.layers = nn.ModuleList(Eagle3Layer(config.backbone, self.linear_impl, device=device, dtype=dtype)
                                    for _ in range(config.backbone.num_hidden_layers))
        init_normal_(self, init_std, torch.Generator().manual_seed(seed) if seed is not None else None)

    def forward(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None, *,
                kv=None, from_target: bool = True) -> torch.Tensor:
        """Drafter hidden states [..., d] (pre-norm; ``compute_logits`` reads them).

        input_ids [...]: the tokens paired with ``hidden``. hidden: target
        features [..., m*d] (``from_target=True``, projected by fc) or the
        drafter's own earlier outputs [..., d]. kv: None (causal, no cache,
        differentiable), a DenseKVCache, or a causal paged backend.
        """
        check_token_ids(input_ids, self.config.backbone.vocab_size)
        if from_target:
            self._check_features(hidden)
            hidden = self.fc(hidden.to(self.dtype))
        if hidden.shape[:-1] != input_ids.shape:
            raise ValueError(f"hidden {list(hidden.shape)} and input_ids {list(input_ids.shape)} disagree")
        backend, positions, advance = resolve_attention(kv, input_ids.shape, positions, causal=True,
                                                        device=input_ids.device)
        cos, sin = self.rotary(check_positions(positions, input_ids.shape), self.dtype)
        emb = self.target.embed(input_ids).to(self.dtype)
        h = hidden.to(self.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(emb, h, cos, sin, backend, i)
        if advance:
            kv.advance(advance)
        return h

    def compute_logits(self, hidden: torch.Tensor, lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of drafter outputs over every id, or over the rows ``lm_head`` of the target's LM head."""
        return self._score(self.norm(hidden), lm_head)

    def confidence_weights(self) -> None:
        """No confidence head: the engine's confidence schedulers need a DSpark drafter."""
        return None

    def slots(self, standard: bool = False) -> dict[str, Slot]:
        s = {"fc.weight": Slot(self.fc.weight), "norm.weight": Slot(self.norm.weight)}
        for i, layer in enumerate(self.layers):
            s.update(layer_slots(layer, f"layers.{i}."))
            s[f"layers.{i}.hidden_norm.weight"] = Slot(layer.hidden_norm.weight)
        return s


def load_drafter(path, target: LlamaModel, *, dtype=None, device=None) -> DSparkDrafter | Eagle3Drafter:
    """Load a drafter folder (any layout of drafter_format), choosing the class from config.json's architectures."""
    try:
        kind, _ = fmt.drafter_kind(read_config(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    cls = DSparkDrafter if kind == "dspark" else Eagle3Drafter
    return cls.from_pretrained(path, target, dtype=dtype, device=device)


def build_drafter_from_target(target: LlamaModel, *, num_layers: int = 1, block_size: int = 7,
                              mask_token_id: int | None = None, markov_rank: int = 0,
                              confidence_head: bool = False, seed: int | None = None,
                              init_std: float = 0.02) -> DSparkDrafter:
    """A DSpark drafter made of the target itself, for tests before a trained drafter exists.

    Backbone = copies of the target's first ``num_layers`` layers and its final
    norm; the context is the embedding output (target layer -1) with
    ``fc`` = identity and ``hidden_norm`` = the target's first input norm, so
    the drafter's first layer sees exactly the target's layer-0 keys and
    values: the anchor row approximates the target truncated to ``num_layers``
    layers (exact for one layer and block_size 1). The Markov and confidence
    heads, when asked for, are random (``init_std``, ``seed``).
    """
    tc = target.config
    if not 1 <= num_layers <= tc.num_hidden_layers:
        raise ValueError(f"num_layers must be in [1, {tc.num_hidden_layers}], got {num_layers}")
    backbone = LlamaConfig(**{**tc.__dict__, "num_hidden_layers": num_layers})
    if mask_token_id is None:
        mask_token_id = tc.pad_token_id if tc.pad_token_id is not None else 0
    config = DSparkConfig(backbone=backbone, target_layer_ids=[-1], num_target_layers=tc.num_hidden_layers,
                          block_size=block_size, mask_token_id=mask_token_id, markov_rank=markov_rank,
                          enable_confidence_head=confidence_head,
                          confidence_head_with_markov=confidence_head and markov_rank > 0)
    drafter = DSparkDrafter(config, target, seed=seed, init_std=init_std)
    with torch.no_grad():
        for mine, theirs in zip(drafter.layers, target.layers):
            mine.load_state_dict(theirs.state_dict())
        drafter.norm.weight.copy_(target.norm.weight)
        drafter.fc.weight.copy_(torch.eye(tc.hidden_size))
        drafter.hidden_norm.weight.copy_(target.layers[0].input_layernorm.weight)
    return drafter
