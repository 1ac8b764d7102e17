"""The drafter checkpoint format: config.json keys and tensor names in every layout we read, and the one we write.

A drafter folder is a Hugging Face config.json plus model.safetensors (or shards). Layouts read here
(docs/drafter-format.md lists every key and tensor):

- standard DSpark / DFlash, as DeepSpec writes them and vLLM (qwen3_dspark, qwen3_dflash) and
  llama.cpp's converter (DSparkModel, DFlashModel) read them: architectures Qwen3DSparkModel,
  DSparkDraftModel, DSparkSpeculator (the speculators layout: the layer config nested under
  ``transformer_layer_config``, ``aux_hidden_state_layer_ids``) or DFlashDraftModel; drafter keys
  nested in ``dflash_config`` (which wins, then ``eagle_config``) or flat; a reduced draft vocabulary
  as ``draft_vocab_size`` with the ``d2t`` offsets (draft id i is target id i + d2t[i]), the ``t2d``
  mask, the LM head's rows and the Markov W2 in draft-id space;
- EAGLE-3 (Qwen3Eagle3Model from DeepSpec, LlamaForCausalLMEagle3 / Eagle3LlamaForCausalLM from
  vLLM's llama_eagle3): one decoder layer named ``midlayer.`` or ``layers.0.``;
- ours before the standard format (architectures DSparkDrafter / Eagle3Drafter): Llama layers, our
  keys flat, W1 / W2 optionally stored for the draft vocabulary only, draft_vocab.safetensors.

Layer-id conventions: ``target_layer_ids`` i is the output of target decoder layer i (-1: the
embedding output); ``aux_hidden_state_layer_ids`` / ``eagle_aux_hidden_state_layer_ids`` count the
hidden state entering layer i, so they are ``target_layer_ids + 1``.

What we write for a DSpark drafter with Qwen3-style layers (per-head q/k RMSNorm) is the standard
layout under architecture Qwen3DSparkModel (DFlashDraftModel for rank 0 without a confidence head),
both key styles, and our extras under ``dspark_ops``, a key the other readers ignore. Llama-style
drafters (the first shipped one) and EAGLE-3 drafters are still written in our earlier layout: no
other reader takes their layers.

The target's embedding and LM head are shared, never trained with a drafter: copies in a
checkpoint must equal the target's (a drafter with its own LM head is refused, naming the tensor).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

STANDARD_DSPARK_ARCHITECTURES = ("Qwen3DSparkModel", "DSparkDraftModel", "DSparkSpeculator")
DFLASH_ARCHITECTURES = ("DFlashDraftModel",)
LEGACY_DSPARK_ARCHITECTURES = ("DSparkDrafter",)
STANDARD_EAGLE3_ARCHITECTURES = ("Qwen3Eagle3Model", "LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")
LEGACY_EAGLE3_ARCHITECTURES = ("Eagle3Drafter",)
DSPARK_ARCHITECTURES = LEGACY_DSPARK_ARCHITECTURES + STANDARD_DSPARK_ARCHITECTURES + DFLASH_ARCHITECTURES
EAGLE3_ARCHITECTURES = LEGACY_EAGLE3_ARCHITECTURES + STANDARD_EAGLE3_ARCHITECTURES

# Our keys that no other reader knows; written under EXTRAS_KEY (read flat too: our earlier layout).
EXTRAS_KEY = "dspark_ops"
EXTRA_KEYS = ("num_target_layers", "confidence_temperatures", "confidence_offsets", "block_context",
              "markov_w1_draft_vocab_only", "markov_w2_draft_vocab_only", "ttt_length")

# Tensors that are not the drafter's own parameters: the target's (shared) and the draft-vocabulary maps.
EMBED, LM_HEAD, D2T, T2D = "embed_tokens.weight", "lm_head.weight", "d2t", "t2d"
SPECIAL_TENSORS = (EMBED, LM_HEAD, D2T, T2D)

# Tensor-name prefixes of the other layouts -> ours.
_RENAMES = (("midlayer.", "layers.0."), ("encoder.output_norm_enc.", "hidden_norm."), ("encoder.fc.", "fc."))


@dataclass
class DrafterLayout:
    """What a config.json says about its checkpoint, in our terms."""

    kind: str                  # "dspark" (DFlash is rank 0) or "eagle3"
    config: dict               # flat: the backbone's Hugging Face keys and our drafter keys (DSparkConfig.from_dict)
    standard: bool             # standard tensor layout (full W1, W2 in draft-id space, d2t) or our earlier one
    draft_vocab_size: int | None   # < vocab_size: a reduced draft vocabulary given by d2t


def drafter_kind(d: dict) -> tuple[str, bool]:
    """("dspark" | "eagle3", standard layout?) from config.json's ``architectures``."""
    arch = (d.get("architectures") or ["?"])[0]
    if arch in DSPARK_ARCHITECTURES:
        return "dspark", arch not in LEGACY_DSPARK_ARCHITECTURES
    if arch in EAGLE3_ARCHITECTURES:
        return "eagle3", arch not in LEGACY_EAGLE3_ARCHITECTURES
    raise ValueError(f"unknown drafter architecture {arch!r} in config.json 'architectures' (supported: "
                     f"{', '.join(DSPARK_ARCHITECTURES + EAGLE3_ARCHITECTURES)})")


def _drafter_value(d: dict, name: str):
    """A drafter key as vLLM resolves it: ``dflash_config``, then ``eagle_config``, then the top level."""
    for section in ("dflash_config", "eagle_config"):
        nested = d.get(section)
        if isinstance(nested, dict) and nested.get(name) is not None:
            return nested[name]
    return d.get(name)


def _target_layer_ids(d: dict, target_layers: int | None, kind: str) -> list[int]:
    """``target_layer_ids`` in our convention from whichever key the layout uses."""
    for key in ("target_layer_ids", "dspark_target_layer_ids"):
        ids = _drafter_value(d, key)
        if ids is not None:
            return _int_list(ids, key)
    for key in ("aux_hidden_state_layer_ids", "eagle_aux_hidden_state_layer_ids"):
        ids = _drafter_value(d, key)
        if ids is not None:
            return [i - 1 for i in _int_list(ids, key)]
    if kind == "eagle3" and target_layers is not None:
        # EAGLE-3 checkpoints without layer ids use the default captures (2, L/2, L-3) of the hidden
        # state entering those layers, as vLLM's Llama / Qwen3 targets do.
        return [2 - 1, target_layers // 2 - 1, target_layers - 3 - 1]
    raise ValueError("drafter config.json lacks 'target_layer_ids' (or dflash_config.target_layer_ids, "
                     "aux_hidden_state_layer_ids, eagle_aux_hidden_state_layer_ids)")


def _int_list(value, key: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in value):
        raise ValueError(f"drafter config.json {key!r} must be a list of integers, got {value!r}")
    return list(value)


def read_layout(d: dict, target_layers: int | None = None) -> DrafterLayout:
    """Normalize any supported config.json to flat keys; ``target_layers``: the target's depth (EAGLE-3's
    default layer ids need it)."""
    kind, standard = drafter_kind(d)
    if not standard:   # our earlier layout: keys flat as our config classes read them
        return DrafterLayout(kind, dict(d), False, None)
    bonus_anchor_layout = "transformer_layer_config" in d or "aux_hidden_state_layer_ids" in d
    flat = dict(d)
    if isinstance(d.get("transformer_layer_config"), dict):   # speculators: the layer's own config nested
        flat.update(d["transformer_layer_config"])
    flat.update(d.get(EXTRAS_KEY) or {})
    flat["target_layer_ids"] = _target_layer_ids(d, target_layers, kind)
    if kind == "eagle3":
        return DrafterLayout(kind, flat, True, _draft_vocab_size(flat))
    # llama.cpp's default: the EAGLE-3-style exports (speculators) draft a 1+N bonus-anchor block.
    if not flat.get("sample_from_anchor", not bonus_anchor_layout):
        raise NotImplementedError("drafter config.json sample_from_anchor is false (a bonus-anchor block of 1 + N "
                                  "rows): only drafters whose anchor row predicts the first token are supported")
    for key in ("mask_token_id", "block_size"):
        flat[key] = _drafter_value(d, key)
        if flat[key] is None:
            raise ValueError(f"drafter config.json lacks {key!r} (flat or in dflash_config)")
    dflash = (d.get("architectures") or [""])[0] in DFLASH_ARCHITECTURES
    if dflash:
        flat.setdefault("markov_rank", 0)
        flat.setdefault("enable_confidence_head", False)
    elif "markov_rank" not in flat:
        raise ValueError("DSpark drafter config.json lacks 'markov_rank'")
    flat.setdefault("enable_confidence_head", False)   # vLLM's default: no head unless the config says so
    flat.setdefault("confidence_head_with_markov", False)
    return DrafterLayout(kind, flat, True, _draft_vocab_size(flat))


def _draft_vocab_size(flat: dict) -> int | None:
    size = flat.get("draft_vocab_size")
    vocab = flat.get("vocab_size")
    if size is None or size == vocab:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size < (vocab or 0):
        raise ValueError(f"drafter config.json draft_vocab_size {size!r} must be an integer in [1, vocab_size "
                         f"{vocab}]")
    return size


def tensor_name(name: str) -> str:
    """A stored tensor's name in our layout: without ``model.``, ``midlayer.`` as ``layers.0.``."""
    name = name.removeprefix("model.")
    for old, new in _RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def read_special_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """The checkpoint's d2t, t2d and copies of the target's embedding / LM head (by our names)."""
    from safetensors import safe_open

    found = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                ours = tensor_name(name)
                if ours in SPECIAL_TENSORS:
                    found[ours] = f.get_tensor(name)
    return found


def stored_dtype(files: list[Path], name: str) -> torch.dtype:
    """dtype of the tensor stored as ``name`` (under any of the layouts' names); float32 if absent."""
    from safetensors import safe_open

    codes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():
                if tensor_name(stored) == name:
                    return codes.get(f.get_slice(stored).get_dtype(), torch.float32)
    return torch.float32


def draft_vocab_ids(special: dict[str, torch.Tensor], draft_vocab_size: int, vocab_size: int) -> torch.Tensor:
    """The target ids of a reduced draft vocabulary: ``arange(K) + d2t``, checked against ``t2d``."""
    if D2T not in special:
        raise KeyError(f"draft_vocab_size {draft_vocab_size} < vocab_size {vocab_size} but the checkpoint has no "
                       f"{D2T!r} tensor (draft id -> target id offsets)")
    d2t = special[D2T].reshape(-1).to(torch.int64)
    if d2t.numel() != draft_vocab_size:
        raise ValueError(f"tensor {D2T!r} has {d2t.numel()} entries, draft_vocab_size is {draft_vocab_size}")
    ids = torch.arange(draft_vocab_size) + d2t
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size or torch.unique(ids).numel() != ids.numel():
        raise ValueError(f"tensor {D2T!r} maps draft ids to target ids outside [0, {vocab_size}) or to one id twice")
    if T2D in special:
        t2d = special[T2D].reshape(-1)
        mask = torch.zeros(vocab_size, dtype=torch.bool)
        mask[ids] = True
        if t2d.numel() != vocab_size or not torch.equal(t2d.to(torch.bool), mask):
            raise ValueError(f"tensor {T2D!r} does not mark exactly the target ids that {D2T!r} maps to")
    return ids


def check_shared_copy(name: str, stored: torch.Tensor, target_weight: torch.Tensor,
                      rows: torch.Tensor | None = None) -> None:
    """A checkpoint's copy of the target's embedding or LM head (rows ``rows``) must be the target's."""
    want = target_weight.detach() if rows is None else target_weight.detach()[rows.to(target_weight.device)]
    if list(stored.shape) != list(want.shape):
        raise ValueError(f"{name} in the drafter checkpoint has shape {list(stored.shape)}, the target's is "
                         f"{list(want.shape)}")
    if not torch.equal(stored.to(want.device, stored.dtype), want.to(stored.dtype)):
        what = "embedding" if name == EMBED else "LM head"
        raise ValueError(f"{name} in the drafter checkpoint differs from the target's {what}: drafters share the "
                         f"target's (a drafter trained with its own {what} is not supported)")


def d2t_t2d(ids: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """The standard draft-vocabulary maps of target ids ``ids`` (draft id i = ids[i])."""
    ids = ids.to(torch.int64).cpu()
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {D2T: ids - torch.arange(ids.numel()), T2D: t2d}


def standard_dspark_config(backbone_hf: dict, *, target_layer_ids: list[int], num_target_layers: int | None,
                           block_size: int, mask_token_id: int, markov_rank: int, enable_confidence_head: bool,
                           confidence_head_with_markov: bool, draft_vocab_size: int | None,
                           extras: dict) -> dict:
    """config.json of a Qwen3-style DSpark / DFlash drafter in the standard layout (module docstring)."""
    dflash = markov_rank == 0 and not enable_confidence_head
    d = dict(backbone_hf)
    d["architectures"] = list(DFLASH_ARCHITECTURES if dflash else STANDARD_DSPARK_ARCHITECTURES[:1])
    d["dflash_config"] = {"mask_token_id": mask_token_id, "target_layer_ids": list(target_layer_ids),
                          "block_size": block_size}
    d.update(target_layer_ids=list(target_layer_ids), mask_token_id=mask_token_id, block_size=block_size,
             sample_from_anchor=True)
    if not dflash:
        d.update(markov_rank=markov_rank, markov_head_type="vanilla", enable_confidence_head=enable_confidence_head,
                 confidence_head_with_markov=confidence_head_with_markov)
    if draft_vocab_size is not None:
        d["draft_vocab_size"] = draft_vocab_size
    ours = {k: v for k, v in extras.items() if v is not None and v is not False}
    if num_target_layers is not None:
        ours["num_target_layers"] = num_target_layers
    if ours:
        d[EXTRAS_KEY] = ours
    return d
