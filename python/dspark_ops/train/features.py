"""The frozen target's per-sample training features, computed once and cached in memory and on disk.

For each sample (prompt + response) the target runs alone (no padding, so the
values do not depend on the batch a sample lands in) and yields the drafter's
inputs and teacher:

- ``layers`` [S, m*d]: the chosen layers' outputs, bfloat16;
- ``hidden`` [S, d]: the final-normed last hidden state, bfloat16 (the
  teacher's logits are the frozen LM head applied to it);
- ``lse`` [S]: the log-sum-exp of those logits over every id, float32, taken
  of the rounded ``hidden`` (training over a draft vocabulary needs it to
  normalise the target over the whole vocabulary).

Recomputing is the default (no multi-GB dumps); an in-memory cache keeps
samples for later epochs up to a byte budget. With a folder, every sample is
also stored as one safetensors file there, with its token ids (a file of
another dataset is refused, never used), written to a temporary name and
renamed so processes sharing the folder never read half a file. That lets
the three drafter variants, reruns and resumed runs skip the target entirely:
``dspark train-draft --prepare-only --feature-cache DIR`` fills it up front.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import Sample

PARTS = ("layers", "hidden", "lse")


class TargetFeatures:
    """Per-sample target features of ``target`` at ``layer_ids`` (see the module docstring)."""

    def __init__(self, target, layer_ids: list[int], *, memory_gb: float = 2.0, folder=None, with_lse: bool = True,
                 autocast=contextlib.nullcontext):
        self.target, self.layer_ids, self.autocast = target, list(layer_ids), autocast
        # A folder always stores lse, so any later run (over a draft vocabulary or not) can use it.
        self.with_lse = with_lse or folder is not None
        self.memory: dict[int, tuple[torch.Tensor, ...]] = {}
        self.memory_used, self.memory_bytes = 0, int(memory_gb * 2**30)
        self.folder = None if folder is None else Path(folder)
        if self.folder is not None:
            self._check_folder()

    def _check_folder(self) -> None:
        """The folder belongs to one target and one set of layers: refuse another's (it would train silently wrong)."""
        c = self.target.config
        meta = {"layer_ids": self.layer_ids, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                "vocab_size": c.vocab_size, "dtype": "bfloat16"}
        self.folder.mkdir(parents=True, exist_ok=True)
        file = self.folder / "features.json"
        if file.is_file():
            stored = json.loads(file.read_text())
            if stored != meta:
                raise ValueError(f"feature cache {self.folder} holds features of another target or layers "
                                 f"(stored {stored}, this run {meta}); use another folder")
        else:
            tmp = file.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(meta, indent=2))
            tmp.replace(file)

    def _file(self, sample: Sample) -> Path:
        return self.folder / f"{sample.id}.safetensors"

    @torch.no_grad()
    def compute(self, sample: Sample) -> tuple[torch.Tensor, ...]:
        """(layers, hidden[, lse]) of one sample, straight from the target."""
        ids = torch.tensor([sample.ids], dtype=torch.long, device=self.target.device)
        with self.autocast():
            out = self.target(ids, hidden_layers=self.layer_ids, return_logits=False)
        parts = (out.layer_hidden[0].to(torch.bfloat16), out.hidden[0].to(torch.bfloat16))
        if self.with_lse:
            logits = self.target.compute_logits(parts[1].to(self.target.dtype))
            parts += (torch.logsumexp(logits.float(), dim=-1),)
        return parts

    def _load(self, sample: Sample) -> tuple[torch.Tensor, ...] | None:
        file = self._file(sample)
        if not file.is_file():
            return None
        stored = load_file(file, device=str(self.target.device))
        missing = [k for k in PARTS + ("ids",) if k not in stored]
        if missing:
            raise ValueError(f"feature cache {file} lacks {missing}: not written by this version; delete the folder")
        if stored["ids"].tolist() != list(sample.ids):
            raise ValueError(f"feature cache {file} was computed for other tokens than sample {sample.id}: "
                             f"the folder belongs to another dataset")
        return tuple(stored[p] for p in PARTS)

    def _store(self, sample: Sample, parts) -> None:
        file = self._file(sample)
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        tensors = {p: t.contiguous().cpu() for p, t in zip(PARTS, parts)}
        tensors["ids"] = torch.tensor(sample.ids, dtype=torch.int32)
        save_file(tensors, str(tmp))
        tmp.replace(file)

    def get(self, sample: Sample) -> tuple[torch.Tensor, ...]:
        """(layers, hidden[, lse]) of ``sample``: from memory, the folder, or the target (then kept)."""
        parts = self.memory.get(sample.id)
        if parts is None:
            parts = self._load(sample) if self.folder is not None else None
            if parts is None:
                parts = self.compute(sample)
                if self.folder is not None:
                    self._store(sample, parts)
            size = sum(t.numel() * t.element_size() for t in parts)
            if self.memory_used + size <= self.memory_bytes:
                self.memory[sample.id] = parts
                self.memory_used += size
        return parts

    def batch(self, samples: list[Sample], width: int) -> tuple[torch.Tensor, ...]:
        """Float32 [B, width, ...] (layers, hidden[, lse]) of ``samples``, zero-padded to ``width`` positions."""
        rows = [self.get(s) for s in samples]
        count = 3 if self.with_lse else 2
        out = []
        for part in range(count):
            first = rows[0][part]
            padded = first.new_zeros((len(rows), width) + first.shape[1:], dtype=torch.float32)
            for b, r in enumerate(rows):
                padded[b, :r[part].shape[0]] = r[part]
            out.append(padded)
        return tuple(out)

    def fill(self, samples: list[Sample], *, progress: bool = True) -> int:
        """Store every sample missing from the folder (``--prepare-only``); returns how many were computed."""
        if self.folder is None:
            raise ValueError("filling the feature cache needs a folder")
        from tqdm import tqdm

        missing = [s for s in samples if not self._file(s).is_file()]
        for s in tqdm(missing, desc="target features", dynamic_ncols=True, mininterval=5.0, disable=not progress):
            self._store(s, self.compute(s))
        return len(missing)
