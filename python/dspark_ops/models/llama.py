"""Llama / Qwen2 / Qwen3-family decoder that loads a Hugging Face folder without transformers.

RMSNorm, rotate-half RoPE (with Llama-3 / linear scaling), grouped-query
attention, SwiGLU MLP, optional per-head QK RMSNorm (Qwen3), q/k/v biases
(Qwen2), tied or untied embeddings. q/k/v and gate/up are stored fused (one
matrix product each); loading and saving map them to and from Hugging Face's
separate tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .attention import CausalAttention, DenseKVCache
from .layers import DecoderLayer, Linear, LinearImpl, RMSNorm, RotaryEmbedding, init_normal_
from .weights import Slot, load_slots, parse_dtype, read_config, save_safetensors, weight_files

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None      # None = num_attention_heads (no GQA)
    head_dim: int | None = None                 # None = hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qk_norm: bool = False                       # Qwen3: RMSNorm over each q/k head before RoPE
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"config.num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"config.head_dim must be even for RoPE, got {self.head_dim}")
        # The flags must be expressible in the model_type's Hugging Face config (what save_pretrained writes).
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.model_type must be one of {SUPPORTED_MODEL_TYPES}, got {self.model_type!r}")
        if self.model_type == "qwen2" and (not self.qkv_bias or self.o_bias):
            raise ValueError("a qwen2 config has q/k/v biases and no o_proj bias")
        if self.model_type != "qwen2" and self.qkv_bias != self.o_bias:
            raise ValueError(f"{self.model_type} configs have one attention_bias flag for q/k/v/o")
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError("QK-norm is what distinguishes qwen3 from llama/qwen2: set model_type accordingly")

    # ---- Hugging Face config.json

    @classmethod
    def from_hf(cls, d: dict) -> "LlamaConfig":
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json model_type {model_type!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        act = d.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act {act!r} is not supported (only silu / SwiGLU)")
        if d.get("use_sliding_window"):
            raise NotImplementedError("sliding-window attention (use_sliding_window=true) is not supported")
        theta, scaling = _rope_from_hf(d)
        attention_bias = bool(d.get("attention_bias", False))
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json lacks {missing}")
        return cls(
            vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"], num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads"), head_dim=d.get("head_dim"),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)), rope_theta=theta, rope_scaling=scaling,
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qk_norm=model_type == "qwen3",
            qkv_bias=True if model_type == "qwen2" else attention_bias,
            o_bias=False if model_type == "qwen2" else attention_bias,
            mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=model_type, bos_token_id=d.get("bos_token_id"), eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"))

    def to_hf(self, dtype: torch.dtype | None = None) -> dict:
        d = {
            "architectures": [_ARCHITECTURES[self.model_type]], "model_type": self.model_type,
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads, "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id, "pad_token_id": self.pad_token_id,
        }
        if self.model_type != "qwen2":
            d["attention_bias"] = self.qkv_bias
        if dtype is not None:
            d["torch_dtype"] = str(dtype).removeprefix("torch.")
        return d


def _rope_from_hf(d: dict) -> tuple[float, dict | None]:
    """(theta, scaling) from either the classic keys or transformers 5's ``rope_parameters``."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        return float(params["rope_theta"]), None if kind == "default" else scaling
    scaling = d.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type", scaling.get("type", "default")) == "default":
        scaling = None
    return float(d.get("rope_theta", 10000.0)), scaling


@dataclass
class ModelOutput:
    logits: torch.Tensor | None      # [..., V] (None when return_logits=False)
    hidden: torch.Tensor             # [..., d] last hidden state after the final norm (what the LM head reads)
    layer_hidden: torch.Tensor | None = None  # [..., m*d] outputs of the requested layers, concatenated


def check_token_ids(ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> None:
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty")
    # Range-checked on CPU only: on an accelerator the check would sync with the host.
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"{name} must lie in [0, {vocab_size}), got values in [{lo}, {hi}]")


def resolve_attention(kv, leading_shape: torch.Size, positions: torch.Tensor | None, *, causal: bool, device):
    """(backend, positions, tokens to add to a DenseKVCache's lengths afterwards) for one forward pass."""
    if kv is None:
        if not causal:
            raise ValueError("a non-causal (drafter block) forward needs a cache holding its context")
        if positions is None:
            positions = torch.arange(leading_shape[-1], device=device).expand(leading_shape)
        return CausalAttention(), positions, 0
    if isinstance(kv, DenseKVCache):
        if len(leading_shape) != 2 or leading_shape[0] != kv.batch_size:
            raise ValueError(f"a DenseKVCache of batch {kv.batch_size} needs input of shape [B, T], "
                             f"got {list(leading_shape)}")
        if positions is None:
            positions = kv.positions(leading_shape[1])
        return kv.attention(causal=causal), positions, leading_shape[1]
    if positions is None:
        raise ValueError("positions are required with a custom attention backend (e.g. PagedAttention)")
    return kv, positions, 0


def check_positions(positions: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
    if not isinstance(positions, torch.Tensor) or positions.is_floating_point():
        raise TypeError("positions must be an integer tensor")
    if positions.shape != leading_shape:
        raise ValueError(f"positions must have shape {list(leading_shape)}, got {list(positions.shape)}")
    return positions


def layer_slots(layer: DecoderLayer, prefix: str) -> dict[str, Slot]:
    """Hugging Face tensor names of one decoder layer -> rows of our fused parameters."""
    attn, mlp = layer.self_attn, layer.mlp
    q, kv, inter = attn.q_size, attn.kv_size, mlp.intermediate_size
    parts = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    s = {f"{prefix}input_layernorm.weight": Slot(layer.input_layernorm.weight),
         f"{prefix}post_attention_layernorm.weight": Slot(layer.post_attention_layernorm.weight),
         f"{prefix}self_attn.o_proj.weight": Slot(attn.o_proj.weight),
         f"{prefix}mlp.gate_proj.weight": Slot(mlp.gate_up_proj.weight, slice(0, inter)),
         f"{prefix}mlp.up_proj.weight": Slot(mlp.gate_up_proj.weight, slice(inter, 2 * inter)),
         f"{prefix}mlp.down_proj.weight": Slot(mlp.down_proj.weight)}
    for name, rows in parts.items():
        s[f"{prefix}self_attn.{name}.weight"] = Slot(attn.qkv_proj.weight, rows)
        if attn.qkv_proj.bias is not None:
            s[f"{prefix}self_attn.{name}.bias"] = Slot(attn.qkv_proj.bias, rows)
    if attn.o_proj.bias is not None:
        s[f"{prefix}self_attn.o_proj.bias"] = Slot(attn.o_proj.bias)
    if attn.q_norm is not None:
        s[f"{prefix}self_attn.q_norm.weight"] = Slot(attn.q_norm.weight)
        s[f"{prefix}self_attn.k_norm.weight"] = Slot(attn.k_norm.weight)
    if mlp.down_proj.bias is not None:
        s[f"{prefix}mlp.gate_proj.bias"] = Slot(mlp.gate_up_proj.bias, slice(0, inter))
        s[f"{prefix}mlp.up_proj.bias"] = Slot(mlp.gate_up_proj.bias, slice(inter, 2 * inter))
        s[f"{prefix}mlp.down_proj.bias"] = Slot(mlp.down_proj.bias)
    return s


def slots_state_dict(slots: dict[str, Slot]) -> dict[str, torch.Tensor]:
    """The tensors to save for a slot table (the inverse of loading it)."""
    return {name: slot.stored() for name, slot in slots.items()}


def stored_dtype(files: list[Path], name: str) -> torch.dtype:
    from safetensors import safe_open

    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                return codes.get(f.get_slice(name).get_dtype(), torch.float32)
    return torch.float32


class LlamaModel(nn.Module):
    """A decoder-only target model. See :meth:`forward` for the calling conventions."""

    def __init__(self, config: LlamaConfig, *, device=None, dtype: torch.dtype = torch.float32,
                 init_std: float = 0.02, seed: int | None = None):
        super().__init__()
        dtype = parse_dtype(dtype)
        self.config = config
        self.linear_impl = LinearImpl()
        d = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, d, device=device, dtype=dtype)
        self.layers = nn.ModuleList(DecoderLayer(config, self.linear_impl, device=device, dtype=dtype)
                                    for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(d, config.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = None if config.tie_word_embeddings else Linear(d, config.vocab_size, bias=False,
                                                                      impl=self.linear_impl, device=device,
                                                                      dtype=dtype)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling, device=device)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        init_normal_(self, init_std, gen)

    # ---- pieces the engine and the drafters use

    def set_linear_impl(self, fn) -> None:
        """Route every projection (q/k/v, o, gate/up, down, LM head) through ``fn(x, weight, bias)``."""
        self.linear_impl.fn = fn

    def _linear(self, x, weight, bias=None):
        return self.linear_impl(x, weight, bias)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [..., V] of final-normed hidden states (e.g. ``ModelOutput.hidden`` rows)."""
        return self._linear(hidden, self.lm_head_weight, None)

    def kv_cache_shape(self) -> tuple[int, int, int]:
        """(layers, kv heads, head dim) of the K/V this model stores."""
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    # ---- forward

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None, *, kv=None,
                hidden_layers: Sequence[int] | None = None, return_logits: bool = True) -> ModelOutput:
        """Run the decoder over new tokens.

        Args:
          input_ids: integer token ids. [B, T] with ``kv=None`` or a DenseKVCache;
            any shape (usually flattened [N]) with a custom backend.
          positions: RoPE positions, same shape as input_ids. Defaults: 0..T-1
            without a cache; each request's current length onward with a
            DenseKVCache; required with a custom backend.
          kv: None (no cache, causal over the given tokens, differentiable), a
            :class:`DenseKVCache` (appends and advances its lengths), or an
            attention backend such as :class:`PagedAttention` (causal=True).
          hidden_layers: layer ids whose outputs are returned concatenated in
            ``layer_hidden`` (-1 = the embedding output, i = output of decoder
            layer i, before the final norm): the drafters' target context.
          return_logits: False skips the LM head (``compute_logits`` applies it
            later to chosen rows of ``hidden``).
        """
        check_token_ids(input_ids, self.config.vocab_size)
        wanted = self._check_layer_ids(hidden_layers)
        backend, positions, advance = resolve_attention(kv, input_ids.shape, positions, causal=True,
                                                        device=input_ids.device)
        positions = check_positions(positions, input_ids.shape)
        x = self.embed(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        collected = {-1: x} if -1 in wanted else {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, backend, i)
            if i in wanted:
                collected[i] = x
        if advance:
            kv.advance(advance)
        hidden = self.norm(x)
        layer_hidden = torch.cat([collected[i] for i in wanted], dim=-1) if wanted else None
        return ModelOutput(self.compute_logits(hidden) if return_logits else None, hidden, layer_hidden)

    def _check_layer_ids(self, ids) -> list[int]:
        if ids is None:
            return []
        ids = [int(i) for i in ids]
        n = self.config.num_hidden_layers
        bad = [i for i in ids if not -1 <= i < n]
        if bad:
            raise ValueError(f"hidden_layers must lie in [-1, {n - 1}] (-1 = embeddings), got {bad}")
        return ids

    # ---- Hugging Face folders

    def hf_slots(self) -> dict[str, Slot]:
        s = {"model.embed_tokens.weight": Slot(self.embed_tokens.weight), "model.norm.weight": Slot(self.norm.weight)}
        if self.lm_head is not None:
            s["lm_head.weight"] = Slot(self.lm_head.weight)
        for i, layer in enumerate(self.layers):
            s.update(layer_slots(layer, f"model.layers.{i}."))
        return s

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, device="cpu") -> "LlamaModel":
        """Load config.json + safetensors (single or sharded) from a Hugging Face folder.

        dtype: float32 / bfloat16 / float16 (names or torch dtypes); None = the
        dtype the weights are stored in.
        """
        config = LlamaConfig.from_hf(read_config(path))
        files = weight_files(path)
        dtype = parse_dtype(dtype) or stored_dtype(files, "model.embed_tokens.weight")
        model = cls(config, device="meta", dtype=dtype)
        model.to_empty(device=device)
        tied_extra = (lambda n: n == "lm_head.weight") if config.tie_word_embeddings else (lambda n: False)
        load_slots(model.hf_slots(), files,
                   ignore=lambda n: n.endswith("rotary_emb.inv_freq") or tied_extra(n))
        return model.eval()

    def save_pretrained(self, path) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config.to_hf(self.dtype), indent=2))
        save_safetensors(slots_state_dict(self.hf_slots()), folder / "model.safetensors")
