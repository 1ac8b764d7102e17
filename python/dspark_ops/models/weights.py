"""Reading and writing Hugging Face style safetensors folders (single file or sharded), streamed."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype, name: str = "dtype") -> torch.dtype | None:
    """None, a torch dtype or one of the names in DTYPES (also "fp32", "bf16", "fp16")."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        alias = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "float": "float32", "half": "float16"}
        key = alias.get(dtype, dtype.removeprefix("torch."))
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"{name} must be float32, bfloat16 or float16, got {dtype!r}")


def read_config(path) -> dict:
    """config.json of a model folder, with clear errors for a missing folder or file."""
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {str(folder)!r} does not exist (or is not a directory)")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{str(folder)!r} has no config.json")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg} is not valid JSON: {e}") from None


def weight_files(path) -> list[Path]:
    """The safetensors files of a folder: model.safetensors, or the shards named by model.safetensors.index.json."""
    folder = Path(path)
    single = folder / "model.safetensors"
    index = folder / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{index} has no weight_map")
        files = [folder / f for f in dict.fromkeys(weight_map.values())]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards listed in {index} are missing: {missing}")
        return files
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {others}: only safetensors are supported)" if others else ""
    raise FileNotFoundError(f"{str(folder)!r} has neither model.safetensors nor model.safetensors.index.json{hint}")


@dataclass
class Slot:
    """Where a stored tensor goes: rows ``rows`` of ``param`` (None = all), transposed if ``transpose``.

    ``index`` instead stores only those rows of the stored layout (``param.t()`` when transposed); loading
    zeroes the rest (a head kept only for a draft vocabulary's ids), or with ``index_shares_last`` gives
    every row outside ``index`` the last stored row (rows trained tied to it).
    """

    param: torch.Tensor
    rows: slice | None = None
    transpose: bool = False
    index: torch.Tensor | None = None
    index_shares_last: bool = False

    def stored(self) -> torch.Tensor:
        """The tensor as it is written to a file (the inverse of loading)."""
        t = self.param.detach() if self.rows is None else self.param.detach()[self.rows]
        t = t.t() if self.transpose else t
        return t if self.index is None else t.index_select(0, self.index.to(t.device))


def load_slots(slots: dict[str, Slot], files: list[Path], *, ignore: Callable[[str], bool] = lambda n: False,
               check: Callable[[str, list[int]], None] | None = None,
               rename: Callable[[str], str] = lambda n: n) -> None:
    """Stream every tensor of ``files`` into its slot; every slot must be filled exactly once.

    A stored name goes to slot ``rename(name)`` (another layout's names). Names
    not in ``slots`` are errors unless ``ignore(name)``; ``check(name, shape)``
    may validate the shapes of ignored tensors (e.g. a drafter's copy of the
    target embedding) without reading them.
    """
    from safetensors import safe_open

    filled, unexpected = set(), []
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for stored in f.keys():
                name = rename(stored)
                slot = slots.get(name)
                if slot is None:
                    if ignore(name):
                        if check is not None:
                            check(name, list(f.get_slice(stored).get_shape()))
                    else:
                        unexpected.append(stored)
                    continue
                if name in filled:
                    raise ValueError(f"tensor {name!r} is stored twice (as {stored!r} in {file.name} and before)")
                t = f.get_tensor(stored)
                dst = slot.param if slot.rows is None else slot.param[slot.rows]
                if slot.transpose:
                    dst = dst.t()      # a view in the stored layout: writes go through to the parameter
                want = list(dst.shape) if slot.index is None else [slot.index.numel(), *dst.shape[1:]]
                if list(t.shape) != want:
                    raise ValueError(f"tensor {stored!r} in {file.name} has shape {list(t.shape)}, "
                                     f"the model expects {want}")
                with torch.no_grad():
                    if slot.index is None:
                        dst.copy_(t)
                    else:
                        t = t.to(dst.device, dst.dtype)
                        if slot.index_shares_last:
                            dst.copy_(t[-1].expand_as(dst))
                        else:
                            dst.zero_()
                        dst.index_copy_(0, slot.index.to(dst.device), t)
                filled.add(name)
    missing = sorted(set(slots) - filled)
    if missing:
        raise KeyError(f"tensors missing from {[f.name for f in files]}: {missing[:8]}"
                       + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if unexpected:
        raise KeyError(f"unexpected tensors in {[f.name for f in files]}: {sorted(unexpected)[:8]}"
                       + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else ""))


def save_safetensors(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata={"format": "pt", **(metadata or {})})
