"""The engine on the real SmolLM2-135M-Instruct: greedy output equals the target's own greedy output
(plain engine decoding and Hugging Face transformers), with drafters, at batch 1 and with a batch
whose requests have different lengths."""
from __future__ import annotations

import os

import pytest
import torch

from dspark_ops.engine import SpeculativeEngine
from dspark_ops.generate import shipped_drafter
from dspark_ops.models import LlamaModel, TextTokenizer, build_drafter_from_target, load_drafter, resolve_model

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three prime numbers and explain why they are prime."]
NEW = 24


@pytest.fixture(scope="module")
def smollm2():
    path = resolve_model("smollm2-135m")
    return path, LlamaModel.from_pretrained(path, dtype=torch.float32), TextTokenizer(path)


@pytest.fixture(scope="module")
def plain_outputs(smollm2):
    path, target, tok = smollm2
    prompts = [tok.encode_chat(p) for p in PROMPTS]
    return prompts, SpeculativeEngine(target, None, max_batch=1).generate(prompts, NEW)


def test_plain_engine_equals_transformers_greedy(smollm2, plain_outputs):
    transformers = pytest.importorskip("transformers")
    path, _, _ = smollm2
    prompts, plain = plain_outputs
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        for prompt, ours in zip(prompts, plain):
            ids = torch.tensor([prompt])
            out = hf.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
            assert out[0, len(prompt):].tolist() == ours


@pytest.mark.parametrize("drafter_kind", ["self_copy", "shipped", "eagle"])
def test_speculative_greedy_equals_plain(smollm2, plain_outputs, drafter_kind):
    _, target, _ = smollm2
    prompts, plain = plain_outputs
    if drafter_kind == "self_copy":
        drafter = build_drafter_from_target(target, num_layers=4, block_size=7)
    elif drafter_kind == "eagle":
        folder = os.environ.get("DSPARK_EAGLE_DRAFTER")
        if not folder:
            pytest.skip("set DSPARK_EAGLE_DRAFTER to an EAGLE-3-style drafter folder for SmolLM2-135M")
        drafter = load_drafter(folder, target, dtype=target.dtype)
    else:
        folder = shipped_drafter("smollm2-135m")
        assert folder is not None, "drafters/smollm2-135m-dspark is committed with the repository"
        drafter = load_drafter(folder, target, dtype=target.dtype)
    scheduler = "sync" if drafter.confidence_weights() is not None else "fixed"
    engine = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=1)
    assert engine.generate(prompts, NEW) == plain
    batched = SpeculativeEngine(target, drafter, scheduler=scheduler, max_batch=3, sps_table=engine.sps_table)
    assert batched.generate(prompts, NEW) == plain


def test_shipped_drafter_fits_the_budget_and_proposes_from_its_draft_vocabulary(smollm2):
    """The committed drafter stays within 30 MB (bf16; the standard format adds the LM head's 4096 draft rows and
    d2t / t2d, 5.1 MB) and its W2 matches its draft vocabulary."""
    folder = shipped_drafter("smollm2-135m")
    assert folder is not None, "drafters/smollm2-135m-dspark is committed with the repository"
    assert (folder / "model.safetensors").stat().st_size <= 30_000_000
    drafter = load_drafter(folder, smollm2[1])
    assert drafter.draft_vocab is not None
    if drafter.config.markov_w2_draft_vocab_only:
        w2 = drafter.markov_weights()[1]
        assert w2.index_select(1, drafter.draft_vocab.ids).abs().sum() > 0
        assert w2.abs().sum(0).count_nonzero() <= len(drafter.draft_vocab)


@pytest.mark.parametrize("scheduler", ["fixed", "sync", "async"])
def test_generate_cli_compare_with_each_scheduler(smollm2, scheduler, capsys):
    """`dspark generate --compare --scheduler S`: the speculative run and its plain baseline agree (greedy)."""
    if shipped_drafter("smollm2-135m") is None:
        pytest.skip("no shipped drafter")
    from dspark_ops.cli import main

    rc = main(["generate", "--model", "smollm2-135m", "--prompt", PROMPTS[0], "--max-new-tokens", "12",
               "--compare", "--scheduler", scheduler])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "speedup:" in err and "(identical output)" in err, err


def test_generate_cli_draft_max_batch(smollm2, capsys):
    """`dspark generate --draft-max-batch 1` with two prompts decodes plainly while both run and gives the plain
    baseline's output, and so does `--draft-max-batch auto`; a limit below 1 or a word other than auto is a
    clear error."""
    from dspark_ops.cli import main

    rc = main(["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "10",
               "--self-drafter", "2", "--draft-max-batch", "1", "--compare"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "(identical output)" in err, err
    with pytest.raises(SystemExit) as stop:   # rejected by the parser, before any model loads
        main(["generate", "--prompt", PROMPTS[0], "--self-drafter", "2", "--draft-max-batch", "0"])
    assert stop.value.code == 2
    assert "--draft-max-batch: must be an integer >= 1 or 'auto'" in capsys.readouterr().err
    rc = main(["generate", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--max-new-tokens", "10",
               "--self-drafter", "2", "--draft-max-batch", "auto", "--compare"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "(identical output)" in err and "drafted in " in err, err
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", PROMPTS[0], "--self-drafter", "2", "--draft-max-batch", "some"])
    assert "expected an integer or 'auto'" in capsys.readouterr().err


def test_generate_cli_device_choice(smollm2, capsys):
    """--device cpu runs; --device cuda without a visible GPU is a clear error, not a crash."""
    from dspark_ops.cli import main

    assert main(["generate", "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--device", "cpu", "--no-spec"]) == 0
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as stop:
            main(["generate", "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--device", "cuda"])
        assert stop.value.code == 2 and "--device cuda: no CUDA GPU" in capsys.readouterr().err
