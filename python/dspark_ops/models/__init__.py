"""Models on the dspark ops: the Llama/Qwen target, the DSpark and EAGLE-3-style drafters, model fetching."""
from .attention import (AttentionBackend, CausalAttention, DenseCacheAttention, DenseKVCache, MaskedAttention,
                        PagedAttention)
from .drafter import (DraftBlock, DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter, build_drafter_from_target,
                      load_drafter)
from .fetch import MODELS, dspark_home, fetch_model, resolve_model
from .llama import LlamaConfig, LlamaModel, ModelOutput
from .tokenizer import TextTokenizer

__all__ = ["AttentionBackend", "CausalAttention", "DenseCacheAttention", "DenseKVCache", "MaskedAttention",
           "PagedAttention", "DraftBlock", "DSparkConfig", "DSparkDrafter", "Eagle3Config", "Eagle3Drafter",
           "build_drafter_from_target", "load_drafter", "MODELS", "dspark_home", "fetch_model", "resolve_model",
           "LlamaConfig", "LlamaModel", "ModelOutput", "TextTokenizer"]
