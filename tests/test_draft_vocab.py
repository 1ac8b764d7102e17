"""Draft vocabularies (dspark_ops.draft_vocab): frequency ranking, the id maps, drawing over K ids equals
drawing over all V with the other ids masked, save -> load."""
from __future__ import annotations

import pytest
import torch

import dspark_ops
from dspark_ops.draft_vocab import DraftVocab, frequency_ranked
from dspark_ops.models import load_drafter
from randomness import fresh_seed
from test_engine import random_drafter, tiny_target


def test_frequency_ranked_by_hand():
    # counts: 5 -> 3, 2 -> 2, 7 -> 2, 0 -> 1; ties by lower id (2 before 7), unseen ids after every seen one.
    tokens = [[5, 2, 7], [5, 7, 2, 0], [5]]
    assert frequency_ranked(tokens, 10, 1).tolist() == [5]
    assert frequency_ranked(tokens, 10, 2).tolist() == [2, 5]
    assert frequency_ranked(tokens, 10, 4).tolist() == [0, 2, 5, 7]
    assert frequency_ranked(tokens, 10, 6).tolist() == [0, 1, 2, 3, 5, 7]  # unseen 1 and 3 fill by id
    with pytest.raises(ValueError, match="size"):
        frequency_ranked(tokens, 10, 0)
    with pytest.raises(ValueError, match="outside"):
        frequency_ranked([[10]], 10, 3)


def test_maps_and_bad_ids():
    vocab = DraftVocab(torch.tensor([1, 4, 6]), 8)
    assert vocab.order.tolist() == [1, 4, 6, 0, 2, 3, 5, 7]
    assert torch.equal(vocab.order[vocab.position], torch.arange(8))
    assert vocab.position[torch.tensor([1, 4, 6])].tolist() == [0, 1, 2]  # drawable ids come first
    assert vocab.index.tolist() == [-1, 0, -1, -1, 1, -1, 2, -1] and vocab.index.dtype == torch.int32
    for bad, match in ((torch.tensor([1, 8]), r"\[0, 8\)"), (torch.tensor([3, 3]), "distinct"),
                       (torch.tensor([], dtype=torch.long), "1..8")):
        with pytest.raises(ValueError, match=match):
            DraftVocab(bad, 8)


@pytest.mark.parametrize("rank", [0, 6])
def test_drawing_over_the_draft_vocabulary_equals_masking_the_rest(rank):
    """markov_sample over K ids (W1 rows reordered, W2 columns selected, anchor mapped) draws the same tokens
    with the same probabilities and confidences as over all V ids with the other logits pushed to -1e30
    (the draft ids are ascending, so the cumulative masses meet them in the same order)."""
    gen = torch.Generator().manual_seed(fresh_seed())
    B, G, V, K, H = 7, 4, 90, 33, 5
    vocab = DraftVocab(torch.sort(torch.randperm(V, generator=gen)[:K]).values, V)
    U = torch.randn(B, G, V, generator=gen) * 2
    w1, w2 = torch.randn(V, rank, generator=gen) * 0.5, torch.randn(rank, V, generator=gen) * 0.5
    anchor = torch.randint(0, V, (B,), generator=gen)
    kw = dict(hidden=torch.randn(B, G, H, generator=gen), conf_weight=torch.randn(H + rank, generator=gen),
              temperature=torch.tensor([1.0, 0.0, 0.7, 1.4, 1.0, 0.3, 0.0]),
              seed=torch.randint(0, 2**62, (B,), generator=gen))
    masked = torch.full_like(U, -1e30)
    masked[..., vocab.ids] = U[..., vocab.ids]
    want_tokens, want_q, want_conf = dspark_ops.markov_sample(masked, anchor, w1, w2, **kw)
    tokens, q, conf = dspark_ops.markov_sample(U[..., vocab.ids], vocab.position[anchor], *vocab.markov(w1, w2), **kw)
    assert torch.equal(vocab.ids[tokens.long()], want_tokens.long())
    assert torch.equal(q, want_q[..., vocab.ids])
    assert not want_q[..., vocab.index < 0].any()
    assert torch.equal(conf, want_conf)


def test_saved_with_the_drafter(tmp_path):
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = random_drafter(target, seed, rank=4, confidence=True)
    assert load_drafter_roundtrip(drafter, target, tmp_path / "none").draft_vocab is None
    drafter.draft_vocab = DraftVocab(frequency_ranked([[3, 3, 9, 50]], 96, 20), 96)
    loaded = load_drafter_roundtrip(drafter, target, tmp_path / "with")
    assert torch.equal(loaded.draft_vocab.ids, drafter.draft_vocab.ids)


def test_markov_w2_stored_for_the_draft_vocabulary_only(tmp_path):
    """W2 kept for the draft ids only: a smaller file, the same Markov head over the draft vocabulary, zero bias
    outside it; without a draft vocabulary the option is refused by name."""
    from safetensors import safe_open
    seed = fresh_seed()
    target = tiny_target(seed)
    drafter = random_drafter(target, seed, rank=4, confidence=True)
    drafter.config.markov_w2_draft_vocab_only = True
    with pytest.raises(ValueError, match="markov_w2_draft_vocab_only"):
        drafter.save_pretrained(tmp_path / "none")
    drafter.draft_vocab = DraftVocab(frequency_ranked([[3, 3, 9, 50, 7, 7, 7, 81]], 96, 20), 96)
    loaded = load_drafter_roundtrip(drafter, target, tmp_path / "d")
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert list(f.get_slice("markov_head.markov_w2.weight").get_shape()) == [20, 4]
    assert loaded.config.markov_w2_draft_vocab_only
    (w1, w2), (v1, v2) = drafter.markov_weights(), loaded.markov_weights()
    assert torch.equal(v1, w1)
    assert torch.equal(drafter.draft_vocab.markov(w1, w2)[1], loaded.draft_vocab.markov(v1, v2)[1])
    outside = torch.ones(96, dtype=torch.bool)
    outside[drafter.draft_vocab.ids] = False
    assert v2[:, outside].abs().sum() == 0 and w2[:, outside].abs().sum() > 0
    (tmp_path / "d" / "draft_vocab.safetensors").unlink()
    with pytest.raises(ValueError, match="no draft vocabulary"):
        load_drafter(tmp_path / "d", target)


def load_drafter_roundtrip(drafter, target, folder):
    drafter.save_pretrained(folder)
    return load_drafter(folder, target)


def test_bad_file_names_the_file(tmp_path):
    from safetensors.torch import save_file
    save_file({"ids": torch.tensor([3, 120])}, str(tmp_path / "draft_vocab.safetensors"))
    with pytest.raises(ValueError, match=r"draft_vocab.safetensors: not a draft vocabulary for a 96-id target"):
        DraftVocab.load(tmp_path, 96)
    save_file({"other": torch.tensor([3])}, str(tmp_path / "draft_vocab.safetensors"))
    with pytest.raises(ValueError, match="not a draft vocabulary"):
        DraftVocab.load(tmp_path, 96)
