"""Drafter training: loss terms by hand, soft label = acceptance probability, training lowers the loss (three
variants), save -> load, exact resume, calibration through the engine, 2-process gloo DDP, CLI, bad input."""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dspark_ops
from dspark_ops.draft_vocab import DraftVocab
from dspark_ops.models import DenseKVCache, LlamaConfig, LlamaModel, load_drafter, resolve_model
from dspark_ops.train import (LossWeights, Sample, TargetFeatures, TrainConfig, Trainer, build_drafter,
                              drafter_losses, eagle3_ttt_logits, init_from_drafter, position_weights,
                              response_draft_vocab, soft_acceptance)
from dspark_ops.train.calibration import calibrate_drafter, collect_confidence
from randomness import fresh_seed


def tiny_target(seed: int, vocab: int = 96, layers: int = 3, max_pos: int = 512) -> LlamaModel:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
                      max_position_embeddings=max_pos, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    return LlamaModel(cfg, seed=seed, init_std=0.3).eval()


def random_samples(seed: int, n: int = 16, vocab: int = 96) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample(i, "x", [rng.randrange(2, vocab) for _ in range(rng.randint(2, 6))],
                   [rng.randrange(2, vocab) for _ in range(rng.randint(3, 24))]) for i in range(n)]


def tiny_cfg(variant="dspark", **kw) -> TrainConfig:
    base = dict(variant=variant, block_size=4, markov_rank=8, target_layer_ids=[0, 2], batch_size=4,
                anchors_per_seq=6, max_steps=30, lr=3e-3, warmup_steps=2, log_every=1, save_every=1000)
    base.update(kw)
    return TrainConfig(**base)


# ---- losses

def test_loss_terms_equal_hand_computed_values():
    # One block of G = 2 positions, V = 3; position 2's label is valid.
    d = [[1.0, 2.0, 0.5], [0.0, -1.0, 1.0]]
    t = [[2.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
    labels, conf = [1, 2], [0.3, -0.7]

    def softmax(z):
        e = [math.exp(x) for x in z]
        return [x / sum(e) for x in e]

    w = [1.0, math.exp(-1 / 2)]
    ce = [-math.log(softmax(d[k])[labels[k]]) for k in range(2)]
    l1 = [sum(abs(a - b) for a, b in zip(softmax(d[k]), softmax(t[k]))) for k in range(2)]
    c_star = [1 - 0.5 * x for x in l1]
    sig = [1 / (1 + math.exp(-c)) for c in conf]
    bce = [-(c_star[k] * math.log(sig[k]) + (1 - c_star[k]) * math.log(1 - sig[k])) for k in range(2)]
    soft_ce = [-sum(p * math.log(q) for p, q in zip(softmax(t[k]), softmax(d[k]))) for k in range(2)]
    mean = lambda v: (w[0] * v[0] + w[1] * v[1]) / (w[0] + w[1])

    out = drafter_losses(torch.tensor([d]), torch.tensor([t]), torch.tensor([labels]), torch.tensor([[True, True]]),
                         LossWeights(0.1, 0.9, 1.0, 0.5), torch.tensor([conf]))
    for key, want in (("ce", mean(ce)), ("tv", mean(l1)), ("conf", mean(bce)), ("soft_ce", mean(soft_ce))):
        assert out[key].item() == pytest.approx(want, rel=1e-5), key
    assert out["loss"].item() == pytest.approx(0.1 * mean(ce) + 0.9 * mean(l1) + mean(bce) + 0.5 * mean(soft_ce),
                                               rel=1e-5)
    assert out["accept"].tolist() == pytest.approx(c_star, rel=1e-5)
    # An invalid position drops out of every term; the rest is position 1 alone.
    out = drafter_losses(torch.tensor([d]), torch.tensor([t]), torch.tensor([labels]), torch.tensor([[True, False]]),
                         LossWeights(0.1, 0.9, 1.0, 0.0), torch.tensor([conf]))
    assert out["ce"].item() == pytest.approx(ce[0], rel=1e-5)
    assert out["conf"].item() == pytest.approx(bce[0], rel=1e-5)
    assert position_weights(7).tolist() == pytest.approx([math.exp(-k / 7) for k in range(7)])


def test_losses_over_a_draft_vocabulary_are_those_of_the_drafter_restricted_to_it():
    """Subset logits + the target's full log-sum-exp give exactly the full-vocabulary TV, confidence label and
    acceptance of a drafter whose distribution is zero outside the draft ids; labels outside drop out of CE."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    N, G, V = 5, 3, 40
    ids = torch.randperm(V, generator=g)[:12].sort().values
    draft = torch.randn(N, G, len(ids), generator=g) * 2
    target = torch.randn(N, G, V, generator=g) * 2
    to_draft = torch.full((V,), -1, dtype=torch.long)
    to_draft[ids] = torch.arange(len(ids))
    labels = ids[torch.randint(len(ids), (N, G), generator=g)]
    valid = torch.rand(N, G, generator=g) > 0.2
    valid[0, 0] = True
    conf = torch.randn(N, G, generator=g)
    weights = LossWeights(0.1, 0.9, 1.0, 0.0)
    full_draft = torch.full((N, G, V), -1e4)      # probability exactly 0 in float32
    full_draft[..., ids] = draft
    want = drafter_losses(full_draft, target, labels, valid, weights, conf)
    got = drafter_losses(draft, target[..., ids], to_draft[labels], valid, weights, conf, torch.logsumexp(target, -1))
    for key in ("ce", "tv", "conf", "loss", "accept"):
        assert torch.allclose(got[key], want[key], rtol=1e-5, atol=1e-6), (seed, key)
    # The acceptance is the exact one of speculative sampling from the draft ids: sum_v min(p_d, p_t).
    p_d = torch.zeros(N, G, V)
    p_d[..., ids] = torch.softmax(draft, -1)
    exact = torch.minimum(p_d, torch.softmax(target, -1)).sum(-1)
    vf = valid.float()
    assert torch.allclose(got["accept"], (exact * vf).sum(0) / vf.sum(0).clamp_min(1), rtol=1e-5), seed
    # A label no draft can propose: out of the CE, still in the TV (its target mass is counted as missed).
    outside = labels.clone()
    outside[0, 0] = int(torch.tensor([v for v in range(V) if v not in set(ids.tolist())])[0])
    drop = valid.clone()
    drop[0, 0] = False
    got_out = drafter_losses(draft, target[..., ids], to_draft[outside], valid, weights, conf,
                             torch.logsumexp(target, -1))
    assert got_out["ce"].item() == pytest.approx(
        drafter_losses(draft, target[..., ids], to_draft[labels], drop, weights, conf,
                       torch.logsumexp(target, -1))["ce"].item(), rel=1e-5)
    assert got_out["tv"].item() == pytest.approx(got["tv"].item(), rel=1e-6)


def test_soft_label_is_the_acceptance_probability_of_speculative_sampling():
    """soft_acceptance is sum(min(p_d, p_t)), and verify accepts drafts at that rate: 20000 rows within 5 standard
    deviations (false alarm 6e-7; a rate off by 0.026 fails with probability 0.99)."""
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    V, n = 6, 20000
    p_d = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    p_t = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    exact = torch.minimum(p_d, p_t).sum()        # P(accept) = sum_x p_d(x) min(1, p_t(x)/p_d(x))
    assert soft_acceptance(p_d, p_t).item() == pytest.approx(exact.item(), abs=1e-6)
    # ... and what the verify op does: draft x ~ p_d, verified against p_t at temperature 1.
    drafts = torch.multinomial(p_d, n, replacement=True, generator=g).view(n, 1).int()
    logits = torch.log(p_t).expand(n, 2, V).contiguous()
    _, accepted = dspark_ops.verify(logits, drafts, p_d.expand(n, 1, V).contiguous(), temperature=1.0,
                                    seed=torch.full((n,), seed, dtype=torch.int64), offset=torch.arange(n))
    rate = accepted.float().mean().item()
    sd = math.sqrt(exact * (1 - exact) / n)
    assert abs(rate - exact.item()) < 5 * sd, (seed, rate, exact.item())


# ---- training

@pytest.mark.parametrize("variant", ["dspark", "dflash", "eagle3", "dspark_block_context"])
def test_a_few_steps_lower_the_loss(tmp_path, variant):
    seed = fresh_seed()
    target = tiny_target(seed)
    samples = random_samples(seed)
    kw = dict(block_context=True) if variant == "dspark_block_context" else {}
    variant = variant.removesuffix("_block_context")
    trainer = Trainer(tiny_cfg(variant, seed=seed % 1000, **kw), target,
                      build_drafter(tiny_cfg(variant, **kw), target), samples, tmp_path, progress=False)
    assert getattr(trainer.drafter.config, "block_context", False) == bool(kw)
    before = [p.detach().clone() for p in trainer.drafter.parameters()]
    trainer.train()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 30
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.9 * first, (seed, first, last)
    assert all(not torch.equal(a, b) for a, b in zip(before, trainer.drafter.parameters()))
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint" / "trainer.pt").is_file()


@pytest.mark.parametrize("variant", ["dspark", "eagle3"])
def test_training_over_a_draft_vocabulary(tmp_path, variant):
    """The drafter learns its K drawable ids only: the loss falls, W2 outside them only decays, and the
    saved drafter carries the vocabulary (with W2 stored for it alone)."""
    seed = fresh_seed()
    target = tiny_target(seed)
    samples = random_samples(seed)
    cfg = tiny_cfg(variant, seed=seed % 1000, draft_vocab=40)
    trainer = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path, progress=False)
    vocab = response_draft_vocab(samples, 96, 40)
    assert torch.equal(trainer.drafter.draft_vocab.ids, vocab.ids)
    d = trainer.drafter
    w2_before = None if variant == "eagle3" else d.markov_w2.detach().clone()
    trainer.train()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.9 * first, (seed, first, last)
    if variant == "dspark":
        outside = torch.ones(96, dtype=torch.bool)
        outside[vocab.ids] = False
        shrink = d.markov_w2.detach()[:, outside] / w2_before[:, outside]     # AdamW's weight decay alone
        assert torch.allclose(shrink, shrink[0, 0], rtol=1e-4) and shrink[0, 0] < 1
        assert not torch.equal(d.markov_w2[:, vocab.ids], w2_before[:, vocab.ids])
        assert d.config.markov_w2_draft_vocab_only
    d.save_pretrained(tmp_path / "drafter")
    loaded = load_drafter(tmp_path / "drafter", target, dtype="float32")
    assert torch.equal(loaded.draft_vocab.ids, vocab.ids)
    # Resuming with another draft vocabulary size is refused.
    other = tiny_cfg(variant, seed=seed % 1000, draft_vocab=30)
    with pytest.raises(ValueError, match="draft_vocab"):
        Trainer(other, target, build_drafter(other, target), samples, tmp_path, progress=False).load_checkpoint()


def test_dspark_with_kl_distillation_trains_on_the_soft_cross_entropy(tmp_path):
    """--distill kl: DSpark's loss is 0.1 CE + 0.9 soft CE + 1.0 confidence BCE, and it falls."""
    seed = fresh_seed()
    target = tiny_target(seed)
    with pytest.raises(ValueError, match="distill"):
        tiny_cfg("dflash", distill="kl")
    with pytest.raises(ValueError, match="distill"):
        tiny_cfg("dspark", distill="l2")
    cfg = tiny_cfg("dspark", seed=seed % 1000, draft_vocab=40, distill="kl")
    Trainer(cfg, target, build_drafter(cfg, target), random_samples(seed), tmp_path, progress=False).train()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        assert r["soft_ce"] > 0 and r["tv"] > 0
        assert r["loss"] == pytest.approx(0.1 * r["ce"] + 0.9 * r["soft_ce"] + r["conf"], rel=1e-5)
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.9 * first, (seed, first, last)


@pytest.mark.parametrize("layer_style", ["qwen3", "llama"])
def test_markov_rows_outside_the_draft_vocabulary_train_tied_and_are_stored_once(tmp_path, layer_style):
    """--markov-w1-draft-vocab-only: ids outside the K drawable ones train one shared W1 row, the file holds
    K + 1 rows (our earlier layout, Llama-style layers) or every row as looked up (the standard layout), and the
    loaded drafter scores every previous token as training did."""
    from safetensors import safe_open
    seed = fresh_seed()
    target = tiny_target(seed)
    samples = random_samples(seed)
    with pytest.raises(ValueError, match="markov_w1_draft_vocab_only"):
        tiny_cfg("dspark", markov_w1_draft_vocab_only=True)              # needs a draft vocabulary
    cfg = tiny_cfg("dspark", seed=seed % 1000, max_steps=10, draft_vocab=40, markov_w1_draft_vocab_only=True,
                   layer_style=layer_style)
    trainer = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path, progress=False)
    d, vocab = trainer.drafter, trainer.draft_vocab
    shared = int(vocab.order[40])
    untrained = torch.ones(96, dtype=torch.bool)
    untrained[vocab.ids] = False
    untrained[shared] = False
    w1_before = d.markov_w1.detach().clone()
    trainer.train()
    shrink = d.markov_w1.detach()[untrained] / w1_before[untrained]      # AdamW's weight decay alone
    assert torch.allclose(shrink, shrink[0, 0], rtol=1e-4) and shrink[0, 0] < 1
    assert not torch.equal(d.markov_w1[shared], w1_before[shared])
    d.save_pretrained(tmp_path / "drafter")
    with safe_open(str(tmp_path / "drafter" / "model.safetensors"), framework="pt") as f:
        assert list(f.get_slice("markov_head.markov_w1.weight").get_shape()) == [41 if layer_style == "llama" else 96, 8]
    loaded = load_drafter(tmp_path / "drafter", target, dtype="float32")
    assert loaded.config.markov_w1_draft_vocab_only
    g = torch.Generator().manual_seed(seed)
    prev = torch.randint(0, 96, (3, 4), generator=g)
    base = torch.randn(3, 4, 40, generator=g)
    hidden = torch.randn(3, 4, 64, generator=g)
    ids = vocab.ids
    with torch.no_grad():
        tied = vocab.shared_row_ids()[prev]
        assert torch.equal(loaded.markov_logits(base, prev, ids), d.markov_logits(base, tied, ids))
        assert torch.equal(loaded.confidence_logits(hidden, prev), d.confidence_logits(hidden, tied))


def test_feature_folder_gives_the_same_training_and_refuses_other_layers(tmp_path):
    """Features read back from the folder (filled up front or while training) train exactly like recomputed ones."""
    seed = fresh_seed()
    target = tiny_target(seed)
    samples = random_samples(seed, n=8)
    cfg = tiny_cfg("dspark", seed=seed % 1000, max_steps=4, draft_vocab=40)
    params = []
    for run, folder in (("recomputed", None), ("stored", tmp_path / "f"), ("read", tmp_path / "f")):
        trainer = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path / run, progress=False,
                          feature_cache_gb=0, feature_dir=folder)
        trainer.train()
        params.append([p.detach().clone() for p in trainer.drafter.parameters()])
    assert len(list((tmp_path / "f").glob("*.safetensors"))) == len(samples)
    for a, b, c in zip(*params):
        assert torch.equal(a, b) and torch.equal(a, c)
    filled = TargetFeatures(target, [0, 2], folder=tmp_path / "g")
    assert filled.fill(samples, progress=False) == len(samples) and filled.fill(samples, progress=False) == 0
    for s in samples[:3]:
        assert all(torch.equal(x, y) for x, y in zip(filled.get(s), TargetFeatures(target, [0, 2]).get(s)))
    with pytest.raises(ValueError, match="another target or layers"):
        TargetFeatures(target, [1, 2], folder=tmp_path / "g")
    s0 = samples[0]     # same id and length, one other token: another dataset's sample
    other = Sample(s0.id, "x", s0.prompt, s0.response[:-1] + [2 + (s0.response[-1] - 1) % 94])
    with pytest.raises(ValueError, match="another dataset"):
        TargetFeatures(target, [0, 2], folder=tmp_path / "g").get(other)


def test_eagle3_training_time_test_matches_inference_drafting():
    """TTT logits of an anchor equal the logits of drafting step by step through a dense cache (teacher forced)."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = build_drafter(tiny_cfg("eagle3", block_size=5, seed=seed % 1000), target)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 24), generator=g)
    feats = target(ids, hidden_layers=[0, 2]).layer_hidden
    anchors = torch.tensor([[3, 11, 17], [1, 9, 18]])
    with torch.no_grad():
        ttt = eagle3_ttt_logits(drafter, ids, feats, anchors)
        for b in range(2):
            for i, a in enumerate(anchors[b].tolist()):
                cache = DenseKVCache.for_model(drafter, 1, 40)
                h = drafter(ids[b:b + 1, 1:a + 1], feats[b:b + 1, :a], kv=cache)[:, -1:]
                steps = [drafter.compute_logits(h)]
                for j in range(2, 6):
                    h = drafter(ids[b:b + 1, a + j - 1:a + j], h, kv=cache, from_target=False)
                    steps.append(drafter.compute_logits(h))
                torch.testing.assert_close(ttt[b, i], torch.cat(steps, 1)[0], rtol=1e-4, atol=1e-4)


def test_save_load_gives_identical_outputs(tmp_path):
    seed = fresh_seed()
    target = tiny_target(seed)
    cfg = tiny_cfg(max_steps=3, seed=seed % 1000)
    drafter = build_drafter(cfg, target)
    Trainer(cfg, target, drafter, random_samples(seed), tmp_path / "run", progress=False).train()
    drafter.config.confidence_temperatures = [0.5, 1.0, 1.5, 2.0]
    drafter.config.confidence_offsets = [-1.0, 0.0, 0.25, 3.0]
    drafter.save_pretrained(tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", target)
    assert loaded.config.confidence_temperatures == [0.5, 1.0, 1.5, 2.0]
    assert loaded.config.confidence_offsets == [-1.0, 0.0, 0.25, 3.0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 20), generator=g)
    feats = target(ids, hidden_layers=[0, 2]).layer_hidden
    anchors = torch.randint(0, 19, (2, 3), generator=g)
    with torch.no_grad():
        a, b = drafter.eval().forward_train(ids, feats, anchors), loaded.forward_train(ids, feats, anchors)
        prev = torch.randint(0, 96, (2, 3, 4), generator=g)
        assert torch.equal(drafter.markov_logits(a.logits, prev), loaded.markov_logits(b.logits, prev))
        assert torch.equal(drafter.confidence_logits(a.hidden, prev), loaded.confidence_logits(b.hidden, prev))


@pytest.mark.parametrize("variant", ["dspark", "dflash"])
def test_warm_start_adds_identity_layers_then_trains_them(tmp_path, variant):
    """A deeper drafter started from a trained shallower one computes exactly what it does; training moves the new
    layer; a drafter of another kind or with more layers is refused by name."""
    seed = fresh_seed()
    target = tiny_target(seed)
    shallow_cfg = tiny_cfg(variant, max_steps=3, seed=seed % 1000)
    shallow = build_drafter(shallow_cfg, target)
    Trainer(shallow_cfg, target, shallow, random_samples(seed), tmp_path / "run1", progress=False).train()
    shallow.save_pretrained(tmp_path / "d1")
    deep_cfg = tiny_cfg(variant, num_layers=2, max_steps=3, seed=seed % 1000 + 1)
    deep = build_drafter(deep_cfg, target)
    assert init_from_drafter(deep, tmp_path / "d1") == [1]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 96, (2, 20), generator=g)
    feats = target(ids, hidden_layers=[0, 2]).layer_hidden
    anchors = torch.randint(0, 19, (2, 3), generator=g)
    with torch.no_grad():
        a, b = shallow.eval().forward_train(ids, feats, anchors), deep.eval().forward_train(ids, feats, anchors)
    torch.testing.assert_close(b.logits, a.logits, rtol=0, atol=0)
    torch.testing.assert_close(b.hidden, a.hidden, rtol=0, atol=0)
    new_layer = [p.detach().clone() for p in deep.layers[1].parameters()]
    assert deep.layers[1].self_attn.o_proj.weight.abs().sum() == 0 and new_layer[0].abs().sum() > 0
    Trainer(deep_cfg, target, deep.train(), random_samples(seed), tmp_path / "run2", progress=False).train()
    assert all(not torch.equal(x, y) for x, y in zip(new_layer, deep.layers[1].parameters()))
    other = "dflash" if variant == "dspark" else "dspark"
    with pytest.raises(ValueError, match="markov_rank"):
        init_from_drafter(build_drafter(tiny_cfg(other, num_layers=2), target), tmp_path / "d1")
    deep.save_pretrained(tmp_path / "d2")
    with pytest.raises(ValueError, match="unexpected tensors"):
        init_from_drafter(build_drafter(shallow_cfg, target), tmp_path / "d2")
    with pytest.raises(ValueError, match="target_layer_ids"):
        init_from_drafter(build_drafter(tiny_cfg(variant, num_layers=2, target_layer_ids=[1, 2]), target),
                          tmp_path / "d1")


@pytest.mark.parametrize("variant", ["dspark", "eagle3"])
def test_resume_takes_the_same_next_steps(tmp_path, variant):
    seed = fresh_seed()
    target = tiny_target(seed)
    samples = random_samples(seed, n=6)     # 4 steps of 4 cross an epoch boundary
    cfg = tiny_cfg(variant, max_steps=4, seed=seed % 1000, save_every=2, warmup_steps=1)
    straight = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path / "a", progress=False)
    straight.train()
    first = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path / "b", progress=False)
    first.train(stop_at=3)                   # stops early on the schedule of max_steps = 4, saving step 3
    assert first.state.step == 3
    with (tmp_path / "b" / "metrics.jsonl").open("a") as f:   # what a run killed after its checkpoint logged
        f.write(json.dumps({"step": 4, "loss": -1.0}) + "\n")
    torch.manual_seed(fresh_seed())          # the checkpoint restores the RNG, whatever happened in between
    resumed = Trainer(cfg, target, build_drafter(cfg, target), samples, tmp_path / "b", progress=False)
    assert resumed.load_checkpoint() and resumed.state.step == 3
    resumed.train()
    for (name, p), q in zip(straight.drafter.named_parameters(), resumed.drafter.parameters()):
        assert torch.equal(p, q), name
    a = [json.loads(l) for l in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


# ---- calibration

def test_calibrate_drafter_through_the_engine_writes_the_calibration(tmp_path):
    seed = fresh_seed()
    target = tiny_target(seed)
    cfg = tiny_cfg(max_steps=2, seed=seed % 1000)
    drafter = build_drafter(cfg, target)
    drafter.save_pretrained(tmp_path / "d")
    drafter = load_drafter(tmp_path / "d", target)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 96, (5,), generator=g).tolist() for _ in range(6)]
    logits, accepted = collect_confidence(drafter, prompts, max_new_tokens=24, seed=seed)
    assert logits.shape[1] == 4 and accepted.shape == logits.shape and logits.shape[0] >= 6
    assert not bool((accepted[:, 1:] & ~accepted[:, :-1]).any())
    report = calibrate_drafter(tmp_path / "d", drafter, prompts, max_new_tokens=24, seed=seed)
    assert report["mean_ece_after"] <= report["mean_ece_before"] + 1e-12
    assert len(report["ece_out_of_sample"]) == len(report["ece_floor_out_of_sample"]) == 4 and report["num_blocks"] >= 6
    stored = json.loads((tmp_path / "d" / "config.json").read_text())["dspark_ops"]   # the standard layout's extras
    assert len(report["temperatures"]) == 4
    assert stored["confidence_temperatures"] == pytest.approx(report["temperatures"])
    assert stored["confidence_offsets"] == pytest.approx(report["offsets"]) and len(report["offsets"]) == 4
    loaded = load_drafter(tmp_path / "d", target).config
    assert loaded.confidence_temperatures == pytest.approx(stored["confidence_temperatures"])
    assert loaded.confidence_offsets == pytest.approx(stored["confidence_offsets"])
    # Temperatures only (the paper's STS): no offsets stored.
    report = calibrate_drafter(tmp_path / "d", drafter, prompts, offsets=False, max_new_tokens=24, seed=seed)
    assert report["offsets"] is None
    assert "confidence_offsets" not in json.loads((tmp_path / "d" / "config.json").read_text())["dspark_ops"]


def test_engine_applies_the_calibration(tmp_path):
    """The confidences the engine's scheduler sees are sigmoid(raw logit / t_k + o_k) of the stored calibration."""
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = build_drafter(tiny_cfg(seed=seed % 1000), target)
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 96, (5,), generator=g).tolist() for _ in range(3)]

    class Recording(dspark_ops.engine.SpeculativeEngine):
        def _draft(self, *args):
            drafts, probs, confidence = super()._draft(*args)
            seen.append(confidence.detach().double().clone())
            return drafts, probs, confidence

    runs = []
    for temps, offsets in ((None, None), ([0.5, 1.0, 2.0, 1.3], [-1.0, 0.5, 0.0, 2.0])):
        drafter.config.confidence_temperatures, drafter.config.confidence_offsets = temps, offsets
        seen = []
        Recording(target, drafter, max_batch=3, max_tokens=3 * 64).generate(prompts, 12, temperature=1.0, seed=seed)
        runs.append(torch.cat(seen))
    raw, calibrated = runs
    want = dspark_ops.calibrate.apply_temperatures(torch.logit(raw), torch.tensor([0.5, 1.0, 2.0, 1.3]).double(),
                                                   torch.tensor([-1.0, 0.5, 0.0, 2.0]).double())
    torch.testing.assert_close(calibrated, want, atol=1e-5, rtol=1e-4)


# ---- distributed

DDP_SCRIPT = """
import sys, random, torch
sys.path.insert(0, {tests!r})
from test_train import tiny_target, random_samples, tiny_cfg
from dspark_ops.train import Trainer, build_drafter, init_distributed
rank, world = init_distributed()
assert world == 2
target = tiny_target({seed})
samples = random_samples({seed}, n=6)     # 4 steps of 4 cross an epoch boundary
cfg = tiny_cfg(max_steps=4, seed=5, save_every=2, warmup_steps=1)

def drafter():
    d = build_drafter(cfg, target)
    if rank == 1:   # different starting weights on purpose: DDP must broadcast rank 0's
        with torch.no_grad():
            for p in d.parameters():
                p.add_(1.0)
    return d

straight = drafter()
Trainer(cfg, target, straight, samples, {out!r} + "/straight", progress=False).train()
torch.save(straight.state_dict(), {out!r} + f"/straight_rank{{rank}}.pt")
# Interrupted after step 3 (its checkpoint), then resumed by fresh trainers with another RNG state.
Trainer(cfg, target, drafter(), samples, {out!r} + "/resumed", progress=False).train(stop_at=3)
torch.manual_seed(1000 + rank)
resumed = drafter()
trainer = Trainer(cfg, target, resumed, samples, {out!r} + "/resumed", progress=False)
assert trainer.load_checkpoint() and trainer.state.step == 3
trainer.train()
torch.save(resumed.state_dict(), {out!r} + f"/resumed_rank{{rank}}.pt")
torch.distributed.barrier()   # tear gloo down together: a rank leaving while the other still runs can abort
torch.distributed.destroy_process_group()
"""


def test_two_process_gloo_run_equals_one_process_and_resumes_exactly(tmp_path):
    """torchrun with 2 gloo ranks, global batch 4 (2 sequences per rank): after 4 steps both ranks hold the
    weights one process trains on the same global batches (rank 1 starts from other weights: DDP broadcasts
    rank 0's; each rank takes its share of the batch with the anchors one process gives those sequences, and the
    averaged gradient is that of the global batch's loss); a run interrupted after step 3 and resumed by fresh
    trainers ends bit-identical to the straight one; rank 0 alone logs, the global batch's loss."""
    seed = fresh_seed() % 10000
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT.format(tests=str(Path(__file__).parent), seed=seed, out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=240, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    a, b = torch.load(tmp_path / "straight_rank0.pt"), torch.load(tmp_path / "straight_rank1.pt")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for rank in (0, 1):
        resumed = torch.load(tmp_path / f"resumed_rank{rank}.pt")
        for k in a:
            assert torch.equal(resumed[k], a[k]), (seed, rank, k)
    target = tiny_target(seed)
    cfg = tiny_cfg(max_steps=4, seed=5, save_every=2, warmup_steps=1)
    alone = build_drafter(cfg, target)
    init = {k: v.clone() for k, v in alone.state_dict().items()}
    Trainer(cfg, target, alone, random_samples(seed, n=6), tmp_path / "alone", progress=False).train()
    # fp32 sums the batch in another order on two ranks, and AdamW's first steps are about lr * sign(gradient):
    # an element whose gradient is zero to within that rounding may step the other way (up to 2 lr a step). So
    # all but a few elements agree to rounding, and none differs by more than AdamW can move it in 4 steps.
    for k, v in alone.state_dict().items():
        diff = (a[k] - v).abs()
        off = diff > 1e-5 + 1e-4 * v.abs()
        assert int(off.sum()) <= max(2, off.numel() // 1000), (seed, k, int(off.sum()), float(diff.max()))
        assert float(diff.max()) <= 2 * cfg.lr * cfg.max_steps, (seed, k, float(diff.max()))
    assert any(not torch.equal(a[k], init[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(line) for line in (tmp_path / "alone" / "metrics.jsonl").read_text().splitlines()]
    assert len(logged) == 4                                    # rank 0 logs alone
    assert [r["loss"] for r in logged] == pytest.approx([r["loss"] for r in single], rel=1e-5)
    assert [r["tokens"] for r in logged] == [r["tokens"] for r in single]


# ---- bad input

def test_bad_input_raises_clear_errors(tmp_path):
    target = tiny_target(0, max_pos=64)
    cfg = tiny_cfg()
    with pytest.raises(ValueError, match="training set is empty"):
        Trainer(cfg, target, build_drafter(cfg, target), [], tmp_path)
    long = [Sample(0, "x", [5] * 50, [6] * 20)]
    with pytest.raises(ValueError, match="context"):
        Trainer(cfg, target, build_drafter(cfg, target), long, tmp_path)
    with pytest.raises(ValueError, match="variant"):
        TrainConfig(variant="medusa")
    with pytest.raises(ValueError, match="markov_rank"):
        TrainConfig(variant="dspark", markov_rank=0)
    with pytest.raises(ValueError, match="block_context"):
        TrainConfig(variant="eagle3", block_context=True)
    # A drafter trained for one target does not load onto another.
    build_drafter(cfg, target).save_pretrained(tmp_path / "d")
    other = tiny_target(0, layers=4)
    with pytest.raises(ValueError, match="layers"):
        load_drafter(tmp_path / "d", other)
    with pytest.raises(ValueError, match="confidence_temperatures"):
        cfg_dict = json.loads((tmp_path / "d" / "config.json").read_text())
        cfg_dict["confidence_temperatures"] = [1.0, -1.0, 1.0, 1.0]
        (tmp_path / "d" / "config.json").write_text(json.dumps(cfg_dict))
        load_drafter(tmp_path / "d", target)
    with pytest.raises(ValueError, match="confidence_offsets"):
        cfg_dict.update(confidence_temperatures=None, confidence_offsets=[0.0, float("nan"), 0.0, 0.0])
        (tmp_path / "d" / "config.json").write_text(json.dumps(cfg_dict))
        load_drafter(tmp_path / "d", target)
    # A checkpoint made with other settings is not silently resumed.
    Trainer(tiny_cfg(max_steps=1), target, build_drafter(cfg, target), random_samples(0), tmp_path / "r",
            progress=False).train()
    changed = tiny_cfg(lr=1e-4)
    with pytest.raises(ValueError, match="other settings"):
        Trainer(changed, target, build_drafter(changed, target), random_samples(0), tmp_path / "r").load_checkpoint()


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    """The smollm2-135m folder ($DSPARK_HOME or ~/.cache/dspark), fetched on first use like the other tests."""
    return resolve_model("smollm2-135m")


def test_cli_end_to_end_on_a_tiny_target(tmp_path, smollm2_folder):
    """dspark train-draft (data from a prompt file, generated by the target) then dspark calibrate, with the
    smollm2-135m tokenizer."""
    folder = tmp_path / "tiny"
    target = tiny_target(1, vocab=49152, layers=2, max_pos=256)
    target.config.eos_token_id = 2
    target.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((smollm2_folder / name).read_bytes())
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question number {i}: what is {i} + {i}?"}) + "\n"
                               for i in range(40)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "dspark_ops.cli", "train-draft", "--target", str(folder), "--out",
           str(tmp_path / "run"), "--data-dir", str(tmp_path / "data"), "--sources", "--prompt-file", str(prompts),
           "--num-train", "6", "--num-heldout", "2", "--max-prompt-tokens", "64", "--max-new-tokens", "12", "--gen-batch", "4", "--max-steps",
           "2", "--batch-size", "2", "--anchors", "4", "--markov-rank", "8", "--draft-vocab", "300", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    drafter_dir = tmp_path / "run" / "drafter"
    meta = json.loads((drafter_dir / "training.json").read_text())
    assert meta["steps"] == 2 and meta["num_train_samples"] == 6
    # The draft vocabulary: 300 ids, every id the training responses use among them (they hold < 300 distinct).
    vocab = DraftVocab.load(drafter_dir, 49152)
    responses = {t for line in (tmp_path / "data" / "train.jsonl").read_text().splitlines()
                 for t in json.loads(line)["response"]}
    assert len(vocab) == 300 and responses <= set(vocab.ids.tolist()) and len(responses) < 300
    assert len((tmp_path / "data" / "train.jsonl").read_text().splitlines()) == 6
    assert json.loads((drafter_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    # Same data dir, other recipe: refused.
    res = subprocess.run(cmd[:-1] + ["--no-progress", "--max-new-tokens", "13"], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 2 and "different recipe" in res.stderr
    res = subprocess.run([sys.executable, "-m", "dspark_ops.cli", "calibrate", "--target", str(folder), "--drafter",
                          str(drafter_dir), "--data-dir", str(tmp_path / "data"), "--max-new-tokens", "16"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ECE of prefix survival, calibrated, out of sample:" in res.stdout
    calibrated = json.loads((drafter_dir / "config.json").read_text())["dspark_ops"]   # the standard layout's extras
    assert len(calibrated["confidence_temperatures"]) == len(calibrated["confidence_offsets"]) == 7
    # A second layer warm-started from that drafter, stored with W2 for the draft vocabulary only.
    deeper = cmd[:cmd.index("--out") + 1] + [str(tmp_path / "run2")] + cmd[cmd.index("--out") + 2:]
    res = subprocess.run(deeper + ["--num-layers", "2", "--init-from", str(drafter_dir), "--markov-w2-draft-vocab-only"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "new identity layers [1]" in res.stderr, res.stderr[-3000:]
    deep_dir = tmp_path / "run2" / "drafter"
    assert json.loads((deep_dir / "training.json").read_text())["init_from"] == str(drafter_dir)
    assert json.loads((deep_dir / "config.json").read_text())["num_hidden_layers"] == 2
    from safetensors import safe_open
    with safe_open(str(deep_dir / "model.safetensors"), "pt") as f:
        assert list(f.get_slice("markov_head.markov_w2.weight").get_shape()) == [300, 8]
    res = subprocess.run(deeper + ["--markov-w2-draft-vocab-only", "--draft-vocab", "0"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 2 and "--markov-w2-draft-vocab-only needs" in res.stderr
    # Trained over the draft vocabulary, on target features stored up front.
    feats = str(tmp_path / "features")
    res = subprocess.run(cmd + ["--prepare-only", "--feature-cache", feats], capture_output=True, text=True,
                         timeout=300, env=env)
    assert res.returncode == 0 and "6 samples computed" in res.stderr, res.stderr[-3000:]
    on_vocab = cmd[:cmd.index("--out") + 1] + [str(tmp_path / "run3")] + cmd[cmd.index("--out") + 2:]
    res = subprocess.run(on_vocab + ["--train-on-draft-vocab", "--markov-w1-draft-vocab-only", "--feature-cache", feats],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "run3" / "drafter" / "training.json").read_text())["train_config"]["draft_vocab"] == 300
    with safe_open(str(tmp_path / "run3" / "drafter" / "model.safetensors"), "pt") as f:
        assert list(f.get_slice("markov_head.markov_w2.weight").get_shape()) == [300, 8]
        # The standard layout (Qwen3-style layers, the default) stores W1 whole, every outside id with the shared row.
        assert list(f.get_slice("markov_head.markov_w1.weight").get_shape()) == [49152, 8]
        assert list(f.get_slice("d2t").get_shape()) == [300]
    res = subprocess.run(on_vocab + ["--markov-w1-draft-vocab-only"], capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode == 2 and "markov_w1_draft_vocab_only needs" in res.stderr
    res = subprocess.run(on_vocab + ["--train-on-draft-vocab", "--draft-vocab", "0"], capture_output=True,
                         text=True, timeout=300, env=env)
    assert res.returncode == 2 and "--train-on-draft-vocab needs" in res.stderr
    # An empty prompt set is refused with a clear message.
    (tmp_path / "empty.jsonl").write_text("")
    res = subprocess.run(cmd[:4] + ["--out", str(tmp_path / "r2"), "--data-dir", str(tmp_path / "d2"), "--sources",
                                    "--prompt-file", str(tmp_path / "empty.jsonl"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2 and "no prompts" in res.stderr
    # Prompts plus responses longer than the target's context are refused before generating anything.
    res = subprocess.run(cmd + ["--max-prompt-tokens", "250"], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 2 and "exceeds the target's context" in res.stderr


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", ["dspark", "eagle3"])
def test_cuda_bf16_training_lowers_the_loss_and_loads_on_cpu(tmp_path, variant):
    seed = fresh_seed()
    target = tiny_target(seed).cuda()
    cfg = tiny_cfg(variant, seed=seed % 1000, bf16=True)
    drafter = build_drafter(cfg, target)
    assert drafter.fc.weight.is_cuda
    Trainer(cfg, target, drafter, random_samples(seed), tmp_path, progress=False).train()
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["loss"] for r in recs[:5]) / 5, sum(r["loss"] for r in recs[-5:]) / 5
    assert last < 0.9 * first, (seed, first, last)
    drafter.save_pretrained(tmp_path / "d")
    cpu_target = tiny_target(seed)
    loaded = load_drafter(tmp_path / "d", cpu_target)
    for (name, p), q in zip(drafter.named_parameters(), loaded.parameters()):
        assert torch.equal(p.cpu(), q), name
