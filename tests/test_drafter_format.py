"""Drafter checkpoints in the layouts DeepSpec, vLLM and llama.cpp use: each loads and drafts exactly like the
same weights written by our save_pretrained; bad checkpoints raise errors naming the key or tensor."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dspark_ops import drafter_format as fmt
from dspark_ops.draft_vocab import DraftVocab
from dspark_ops.engine import SpeculativeEngine
from dspark_ops.models import DSparkConfig, DSparkDrafter, Eagle3Config, Eagle3Drafter, LlamaConfig, LlamaModel, \
    load_drafter
from dspark_ops.models.llama import slots_state_dict
from dspark_ops.models.weights import save_safetensors
from randomness import fresh_seed

VOCAB, LAYERS = 96, 3
REPO = Path(__file__).resolve().parents[1]


def randomize(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise if name.endswith("bias")
                    else 0.3 * noise)


def tiny_target(seed: int) -> LlamaModel:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=256, tie_word_embeddings=False, pad_token_id=VOCAB - 1)
    target = LlamaModel(cfg)
    randomize(target, seed)
    return target.eval()


def qwen3_backbone(target, layers=2) -> LlamaConfig:
    return LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": layers, "model_type": "qwen3",
                          "qk_norm": True})


def dspark_drafter(target, seed, *, rank=6, conf=True, vocab_ids=None, qk_norm=True) -> DSparkDrafter:
    backbone = qwen3_backbone(target) if qk_norm else LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": 2})
    cfg = DSparkConfig(backbone=backbone, target_layer_ids=[0, 2], num_target_layers=LAYERS,
                       block_size=4, mask_token_id=VOCAB - 1, markov_rank=rank, enable_confidence_head=conf,
                       confidence_head_with_markov=conf and rank > 0,
                       markov_w2_draft_vocab_only=vocab_ids is not None)
    drafter = DSparkDrafter(cfg, target)
    randomize(drafter, seed)
    if vocab_ids is not None:   # a drafter trained over the draft vocabulary: no Markov bias outside it
        drafter.draft_vocab = DraftVocab(vocab_ids, VOCAB)
        outside = torch.ones(VOCAB, dtype=torch.bool)
        outside[vocab_ids] = False
        with torch.no_grad():
            drafter.markov_w2[:, outside] = 0
    return drafter.eval()


def eagle3_drafter(target, seed) -> Eagle3Drafter:
    drafter = Eagle3Drafter(Eagle3Config(backbone=qwen3_backbone(target, 1), target_layer_ids=[0, 1, 2],
                                         num_target_layers=LAYERS), target)
    randomize(drafter, seed)
    return drafter.eval()


def ids_and_features(target, layer_ids, seed):
    ids = torch.randint(0, VOCAB - 1, (2, 10), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return ids, target(ids, hidden_layers=layer_ids).layer_hidden


def assert_drafts_identically(loaded, ref, target, seed):
    """Same config, parameters and draft vocabulary; same block logits, Markov and confidence logits."""
    assert type(loaded) is type(ref)
    for name, p in ref.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    assert (loaded.draft_vocab is None) == (ref.draft_vocab is None)
    if ref.draft_vocab is not None:
        assert torch.equal(loaded.draft_vocab.ids, ref.draft_vocab.ids)
    ids, feats = ids_and_features(target, ref.config.target_layer_ids, seed)
    with torch.no_grad():
        if isinstance(ref, Eagle3Drafter):
            torch.testing.assert_close(loaded.compute_logits(loaded(ids, feats)), ref.compute_logits(ref(ids, feats)),
                                       rtol=0, atol=0)
            return
        anchors = torch.tensor([[2, 6], [4, 8]])
        a, b = loaded.forward_train(ids, feats, anchors), ref.forward_train(ids, feats, anchors)
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        prev = torch.randint(0, VOCAB, a.logits.shape[:-1], generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(loaded.markov_logits(a.logits, prev), ref.markov_logits(b.logits, prev),
                                   rtol=0, atol=0)
        if ref.confidence_head is not None:
            torch.testing.assert_close(loaded.confidence_logits(a.hidden, prev), ref.confidence_logits(b.hidden, prev),
                                       rtol=0, atol=0)


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_safetensors(tensors, folder / "model.safetensors")
    return folder


def drafter_keys(drafter: DSparkDrafter) -> dict:
    c = drafter.config
    return dict(markov_rank=c.markov_rank, markov_head_type="vanilla", enable_confidence_head=c.enable_confidence_head,
                confidence_head_with_markov=c.confidence_head_with_markov)


def reduced_vocab_tensors(drafter, target) -> dict[str, torch.Tensor]:
    """The standard reduced vocabulary: W2 in draft-id space, d2t offsets, t2d mask, the LM head's rows."""
    ids = drafter.draft_vocab.ids
    return {"markov_head.markov_w2.weight": drafter.markov_w2.detach().t()[ids], **fmt.d2t_t2d(ids, VOCAB),
            "lm_head.weight": target.lm_head_weight.detach()[ids]}


# --------------------------------------------------------------------------- the layouts

def layout_deepspec_flat(drafter, target, folder):
    """DeepSpec: the target's Qwen3 config plus flat drafter keys, copies of the embedding and LM head."""
    c = drafter.config
    cfg = dict(c.backbone.to_hf(), architectures=["Qwen3DSparkModel"], target_layer_ids=c.target_layer_ids,
               num_target_layers=LAYERS, block_size=c.block_size, mask_token_id=c.mask_token_id,
               **drafter_keys(drafter))
    sd = slots_state_dict(drafter.slots())
    sd.update({"embed_tokens.weight": target.embed_tokens.weight.detach(), "lm_head.weight": target.lm_head_weight})
    return write_folder(folder, cfg, sd)


def layout_nested_dflash_config(drafter, target, folder):
    """vLLM / llama.cpp: drafter keys only in dflash_config, tensors named model.*, no num_target_layers."""
    c = drafter.config
    cfg = dict(c.backbone.to_hf(), architectures=["DSparkDraftModel"], **drafter_keys(drafter),
               dflash_config={"mask_token_id": c.mask_token_id, "target_layer_ids": c.target_layer_ids,
                              "block_size": c.block_size})
    return write_folder(folder, cfg, {"model." + k: v for k, v in slots_state_dict(drafter.slots()).items()})


def layout_speculators(drafter, target, folder):
    """speculators (DSparkSpeculator): the layer config nested, aux_hidden_state_layer_ids = target_layer_ids + 1,
    a reduced draft vocabulary."""
    c = drafter.config
    layer = {k: v for k, v in c.backbone.to_hf().items() if k != "architectures"}
    cfg = dict(architectures=["DSparkSpeculator"], speculators_model_type="dspark", transformer_layer_config=layer,
               aux_hidden_state_layer_ids=[i + 1 for i in c.target_layer_ids], mask_token_id=c.mask_token_id,
               block_size=c.block_size, sample_from_anchor=True, draft_vocab_size=len(drafter.draft_vocab),
               **drafter_keys(drafter))
    sd = slots_state_dict(drafter.slots())
    sd.update(reduced_vocab_tensors(drafter, target))
    return write_folder(folder, cfg, sd)


def layout_dflash(drafter, target, folder):
    """z-lab DFlash (DFlashDraftModel): no Markov or confidence head, keys in dflash_config."""
    c = drafter.config
    cfg = dict(c.backbone.to_hf(), architectures=["DFlashDraftModel"],
               dflash_config={"mask_token_id": c.mask_token_id, "target_layer_ids": c.target_layer_ids},
               block_size=c.block_size)
    return write_folder(folder, cfg, slots_state_dict(drafter.slots()))


def layout_eagle3_vllm(drafter, target, folder):
    """vLLM's llama_eagle3: one layer named midlayer.*, eagle_aux_hidden_state_layer_ids, reduced vocabulary."""
    c = drafter.config
    cfg = dict(c.backbone.to_hf(), architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=len(drafter.draft_vocab),
               eagle_aux_hidden_state_layer_ids=[i + 1 for i in c.target_layer_ids])
    sd = {k.replace("layers.0.", "midlayer."): v for k, v in slots_state_dict(drafter.slots()).items()}
    ids = drafter.draft_vocab.ids
    sd.update({**fmt.d2t_t2d(ids, VOCAB), "lm_head.weight": target.lm_head_weight.detach()[ids]})
    return write_folder(folder, cfg, sd)


VOCAB_IDS = torch.arange(0, VOCAB, 3)

LAYOUTS = {
    "deepspec_flat": (layout_deepspec_flat, dict()),
    "nested_dflash_config": (layout_nested_dflash_config, dict()),
    "speculators_reduced_vocab": (layout_speculators, dict(vocab_ids=VOCAB_IDS)),
    "dflash": (layout_dflash, dict(rank=0, conf=False)),
    "eagle3_vllm_reduced_vocab": (layout_eagle3_vllm, None),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_loads_and_drafts_like_our_own(tmp_path, name):
    seed = fresh_seed()
    target = tiny_target(seed)
    write, kw = LAYOUTS[name]
    if kw is None:
        ref = eagle3_drafter(target, seed + 1)
        ref.draft_vocab = DraftVocab(VOCAB_IDS, VOCAB)
    else:
        ref = dspark_drafter(target, seed + 1, **kw)
    theirs = load_drafter(write(ref, target, tmp_path / name), target)
    assert_drafts_identically(theirs, ref, target, seed)
    ref.save_pretrained(tmp_path / "ours")     # the same weights in our own layout
    ours = load_drafter(tmp_path / "ours", target)
    assert_drafts_identically(ours, ref, target, seed)
    assert ours.config.target_layer_ids == theirs.config.target_layer_ids == ref.config.target_layer_ids


def test_standard_layout_drafts_identically_in_the_engine(tmp_path):
    """Sampled generation (T = 1) with the reduced-vocabulary standard layout and with the drafter it was made
    of: the same tokens and the same acceptances, so the same drafts."""
    seed = fresh_seed()
    target = tiny_target(seed)
    ref = dspark_drafter(target, seed + 1, vocab_ids=VOCAB_IDS)
    loaded = load_drafter(layout_speculators(ref, target, tmp_path / "spec"), target)
    prompt = torch.randint(0, VOCAB - 1, (9,), generator=torch.Generator().manual_seed(seed)).tolist()
    runs = []
    for drafter in (ref, loaded):
        engine = SpeculativeEngine(target, drafter, max_batch=1, max_tokens=256)
        runs.append((engine.generate([prompt], max_new_tokens=24, temperature=1.0, seed=seed), engine.stats.accepts))
    assert runs[0] == runs[1]


def test_what_we_write_is_the_standard_layout(tmp_path):
    """Qwen3-style drafters: the standard keys and tensor names, our extras under dspark_ops only."""
    target = tiny_target(fresh_seed())
    ref = dspark_drafter(target, 1, vocab_ids=VOCAB_IDS)
    ref.config.confidence_temperatures = [1.5] * 4
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3DSparkModel"] and cfg["model_type"] == "qwen3"
    assert cfg["dflash_config"] == {"mask_token_id": VOCAB - 1, "target_layer_ids": [0, 2], "block_size": 4}
    assert (cfg["target_layer_ids"], cfg["block_size"], cfg["mask_token_id"]) == ([0, 2], 4, VOCAB - 1)
    assert cfg["markov_rank"] == 6 and cfg["markov_head_type"] == "vanilla" and cfg["sample_from_anchor"] is True
    assert cfg["enable_confidence_head"] and cfg["confidence_head_with_markov"]
    assert cfg["draft_vocab_size"] == len(VOCAB_IDS)
    assert cfg["dspark_ops"] == {"confidence_temperatures": [1.5] * 4, "num_target_layers": LAYERS}
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
        d2t = f.get_tensor("d2t")
    assert shapes["markov_head.markov_w1.weight"] == [VOCAB, 6] and shapes["markov_head.markov_w2.weight"] == [32, 6]
    assert shapes["lm_head.weight"] == [32, 32] and shapes["t2d"] == [VOCAB]
    assert torch.equal(d2t + torch.arange(32), VOCAB_IDS)
    assert "layers.0.self_attn.q_norm.weight" in shapes and "embed_tokens.weight" not in shapes
    assert not (tmp_path / "draft_vocab.safetensors").exists()


def test_our_earlier_llama_style_layout_loads_as_before(tmp_path):
    """Drafters written before the standard format (Llama layers, architecture DSparkDrafter, keys flat, W2 stored
    for the draft ids only, draft_vocab.safetensors, calibration flat in config.json) keep loading and drafting."""
    from safetensors.torch import save_file
    seed = fresh_seed()
    target = tiny_target(seed)
    ref = dspark_drafter(target, seed + 1, vocab_ids=VOCAB_IDS, qk_norm=False)
    c = ref.config
    cfg = dict(c.backbone.to_hf(), architectures=["DSparkDrafter"], target_layer_ids=c.target_layer_ids,
               num_target_layers=LAYERS, block_size=c.block_size, mask_token_id=c.mask_token_id,
               markov_w2_draft_vocab_only=True, confidence_temperatures=[1.25, 0.75, 1.0, 2.0],
               confidence_offsets=[0.1, -0.2, 0.0, 0.3], **drafter_keys(ref))
    sd = slots_state_dict(ref.slots())
    sd["markov_head.markov_w2.weight"] = ref.markov_w2.detach().t()[VOCAB_IDS]
    folder = write_folder(tmp_path / "old", cfg, sd)
    save_file({"ids": VOCAB_IDS}, str(folder / "draft_vocab.safetensors"))
    loaded = load_drafter(folder, target)
    assert not loaded.config.backbone.qk_norm and not loaded.config.standard_layout
    assert loaded.config.confidence_temperatures == cfg["confidence_temperatures"]
    assert loaded.config.confidence_offsets == cfg["confidence_offsets"]
    assert_drafts_identically(loaded, ref, target, seed)


# --------------------------------------------------------------------------- bad checkpoints

def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, drop=(), **replace):
    from safetensors.torch import load_file
    sd = load_file(str(folder / "model.safetensors"))
    for name in drop:
        del sd[name]
    sd.update(replace)
    save_safetensors(sd, folder / "model.safetensors")


@pytest.fixture
def saved(tmp_path):
    seed = fresh_seed()
    target = tiny_target(seed)
    ref = dspark_drafter(target, seed + 1, vocab_ids=VOCAB_IDS)
    ref.save_pretrained(tmp_path / "d")
    return target, tmp_path / "d"


@pytest.mark.parametrize("key", ["markov_rank", "dflash_config", "architectures"])
def test_missing_config_keys_are_named(saved, key):
    target, folder = saved
    edit_config(folder, **{key: None, **({"mask_token_id": None} if key == "dflash_config" else {})})
    want = {"markov_rank": "markov_rank", "dflash_config": "mask_token_id", "architectures": "architecture"}[key]
    with pytest.raises(ValueError, match=want):
        load_drafter(folder, target)


def test_missing_and_misshapen_tensors_are_named(saved):
    target, folder = saved
    edit_tensors(folder, drop=["layers.1.self_attn.k_norm.weight"])
    with pytest.raises(KeyError, match="layers.1.self_attn.k_norm.weight"):
        load_drafter(folder, target)
    edit_tensors(folder, **{"layers.1.self_attn.k_norm.weight": torch.ones(8)})
    with pytest.raises(ValueError, match=r"'layers.1.self_attn.k_norm.weight'.*\[8\]"):
        load_drafter(folder, target)
    edit_tensors(folder, **{"layers.1.self_attn.k_norm.weight": torch.ones(16), "fc.weight": torch.zeros(32, 96)})
    with pytest.raises(ValueError, match=r"'fc.weight'.*\[32, 96\], the model expects \[32, 64\]"):
        load_drafter(folder, target)
    edit_tensors(folder, **{"fc.weight": torch.zeros(32, 64), "extra.weight": torch.zeros(2)})
    with pytest.raises(KeyError, match="extra.weight"):
        load_drafter(folder, target)


def test_reduced_vocabulary_maps_are_checked(saved):
    target, folder = saved
    edit_tensors(folder, drop=["d2t"])
    with pytest.raises(KeyError, match="'d2t'"):
        load_drafter(folder, target)
    edit_tensors(folder, d2t=torch.full((32,), VOCAB))
    with pytest.raises(ValueError, match="'d2t'.*outside"):
        load_drafter(folder, target)
    edit_tensors(folder, d2t=fmt.d2t_t2d(VOCAB_IDS, VOCAB)["d2t"], t2d=torch.zeros(VOCAB, dtype=torch.bool))
    with pytest.raises(ValueError, match="'t2d'"):
        load_drafter(folder, target)
    edit_tensors(folder, t2d=fmt.d2t_t2d(VOCAB_IDS, VOCAB)["t2d"], **{"lm_head.weight": torch.zeros(32, 32)})
    with pytest.raises(ValueError, match="lm_head.weight.*differs from the target's LM head"):
        load_drafter(folder, target)


def test_a_target_that_does_not_fit_is_refused(saved, tmp_path):
    target, folder = saved
    shallow = LlamaModel(LlamaConfig(**{**target.config.__dict__, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match="3 layers"):
        load_drafter(folder, shallow)
    edit_config(folder, dspark_ops=None)     # without num_target_layers, the layer ids still have to exist
    with pytest.raises(ValueError, match=r"target_layer_ids \[2\] outside"):
        load_drafter(folder, shallow)
    wide = LlamaModel(LlamaConfig(**{**target.config.__dict__, "vocab_size": VOCAB + 4}))
    with pytest.raises(ValueError, match="vocab_size 96 does not match the target's 100"):
        load_drafter(folder, wide)
    other = tiny_target(fresh_seed())   # same shapes, other weights: the LM-head rows give it away
    with pytest.raises(ValueError, match="lm_head.weight.*differs"):
        load_drafter(folder, other)
    edit_tensors(folder, **{"embed_tokens.weight": torch.zeros(VOCAB + 1, 32)})
    with pytest.raises(ValueError, match=r"embed_tokens.weight.*shape \[97, 32\]"):
        load_drafter(folder, target)


def test_unsupported_variants_are_refused(saved):
    target, folder = saved
    edit_config(folder, markov_head_type="gated")
    with pytest.raises(NotImplementedError, match="gated"):
        load_drafter(folder, target)
    edit_config(folder, markov_head_type="vanilla", sample_from_anchor=False)
    with pytest.raises(NotImplementedError, match="sample_from_anchor"):
        load_drafter(folder, target)
    edit_config(folder, sample_from_anchor=None, aux_hidden_state_layer_ids=[1, 3])   # speculators' default
    with pytest.raises(NotImplementedError, match="sample_from_anchor"):
        load_drafter(folder, target)
    edit_config(folder, aux_hidden_state_layer_ids=None, draft_vocab_size=VOCAB + 1)
    with pytest.raises(ValueError, match="draft_vocab_size 97"):
        load_drafter(folder, target)
    edit_config(folder, draft_vocab_size=32, architectures=["Gemma4DSparkModel"])
    with pytest.raises(ValueError, match="unknown drafter architecture 'Gemma4DSparkModel'"):
        load_drafter(folder, target)
