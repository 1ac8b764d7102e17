"""Models on the dspark ops: the Llama/Qwen target, the DSpark and EAGLE-3-style drafters, model fetching."""
from .attention import (AttentionBackend, CausalAttention, DenseCacheAttention, DenseKVCache, MaskedAttention,
                        PagedAttention)
from .llama import LlamaConfig, LlamaModel, ModelOutput

__all__ = ["AttentionBackend", "CausalAttention", "DenseCacheAttention", "DenseKVCache", "MaskedAttention",
           "PagedAttention", "LlamaConfig", "LlamaModel", "ModelOutput"]
