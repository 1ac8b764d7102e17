"""``linear`` / ``linear_silu_mul``: linear layers for small blocks of rows on packed weights.

Pack each weight once (``pack_linear_weight``), then call ``linear`` for every
forward. On CPU the packed layout lets a block of up to 8-16 rows cost about
what one row costs (the weights are read from memory once for all rows, and
up to 64 rows run in the kernel); taller blocks go to torch's matmul inside
the op. On CUDA the op is cuBLAS.
"""
from __future__ import annotations

import ctypes
import dataclasses
import sys

import torch

from ._ops import ops

GROUP = 32     # output columns per packed group (csrc/include/dspark/linear_problem.h)
MAX_ROWS = 64  # rows the CPU kernel takes in one call; more go to matmul


@dataclasses.dataclass(frozen=True)
class PackedLinear:
    """A weight packed by :func:`pack_linear_weight` (build it with that function).

    Attributes:
      data: CPU: column groups [G, in_features, 32] (the kernel's layout:
        32 output columns per group, zero-padded; 16 gate then 16 up columns
        per group for a gate/up weight). CUDA: the rows [rows, in_features].
      out_features: columns of the op's output (I for a gate/up weight).
      gate_up: packed for :func:`linear_silu_mul` (gate rows then up rows).
    """

    data: torch.Tensor
    out_features: int
    gate_up: bool = False

    @property
    def in_features(self) -> int:
        return self.data.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    def unpack(self) -> torch.Tensor:
        """The weight as [out, in] ([2 * I, in], gate rows then up rows, for a gate/up weight)."""
        if self.data.dim() == 2:
            return self.data
        if self.gate_up:
            half = GROUP // 2
            return torch.cat([_from_groups(self.data[..., :half], self.out_features),
                              _from_groups(self.data[..., half:], self.out_features)])
        return _from_groups(self.data, self.out_features)

    def to(self, device) -> PackedLinear:
        """The same weight packed for `device` (CPU column groups or CUDA rows)."""
        device = torch.device(device)
        if device == self.device:
            return self
        return pack_linear_weight(self.unpack().to(device), self.dtype, gate_up=self.gate_up)


# torch.load(weights_only=True) (torch's default) accepts only allow-listed classes.
torch.serialization.add_safe_globals([PackedLinear])


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _empty_for_streaming(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty on CPU, asking Linux for transparent huge pages before the first touch.

    The kernel streams a packed weight at full memory bandwidth; on 4 KiB pages
    that costs a page walk every 4 KiB (measured here: 5-15% on weights of
    100-400 MB). Advisory: where huge pages are unavailable nothing changes.
    """
    t = torch.empty(shape, dtype=dtype)
    nbytes = t.numel() * t.element_size()
    if _libc is not None and nbytes >= 2 * _HUGE_PAGE:
        start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
        end = (t.data_ptr() + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), ctypes.c_int(_MADV_HUGEPAGE))
    return t


def _to_groups(w: torch.Tensor, cols: int) -> torch.Tensor:
    """[ceil(rows / cols), in, cols]: `cols` consecutive rows of w per group, zero-padded (a view)."""
    rows, k = w.shape
    groups = -(-rows // cols)
    padded = torch.zeros(groups * cols, k, dtype=w.dtype, device=w.device)
    padded[:rows] = w
    return padded.view(groups, cols, k).transpose(1, 2)


def _from_groups(data: torch.Tensor, out_features: int) -> torch.Tensor:
    groups, k, cols = data.shape
    return data.transpose(1, 2).reshape(groups * cols, k)[:out_features]


def pack_linear_weight(w: torch.Tensor, dtype: torch.dtype | None = None, *, gate_up: bool = False) -> PackedLinear:
    """Packs a linear weight w [out, in] for :func:`linear` (once, at load time).

    Args:
      w: [out, in] (the nn.Linear layout), any float dtype.
      dtype: storage of the packed weight: torch.float32 or torch.bfloat16
        (half the bytes; the kernel widens to fp32 exactly and accumulates in
        fp32). Default: bfloat16 if w is bfloat16, else float32.
      gate_up: w is [2 * I, in], the gate rows then the up rows of a gated MLP,
        packed for :func:`linear_silu_mul`.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"w must be [out, in], got shape {list(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if dtype is None:
        dtype = torch.bfloat16 if w.dtype == torch.bfloat16 else torch.float32
    if dtype not in (torch.float32, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    rows, _ = w.shape
    if rows == 0 or (gate_up and rows % 2):
        raise ValueError(f"w must have {'an even number of' if gate_up else 'at least one'} rows "
                         f"{'(gate rows then up rows) ' if gate_up else ''}, got shape {list(w.shape)}")
    w = w.detach().to(dtype)
    out_features = rows // 2 if gate_up else rows
    if w.device.type != "cpu":
        return PackedLinear(w.contiguous(), out_features, gate_up)
    k = w.shape[1]
    if gate_up:
        half = GROUP // 2
        data = _empty_for_streaming((-(-out_features // half), k, GROUP), dtype)
        data[..., :half] = _to_groups(w[:out_features], half)
        data[..., half:] = _to_groups(w[out_features:], half)
    else:
        data = _empty_for_streaming((-(-out_features // GROUP), k, GROUP), dtype)
        data.copy_(_to_groups(w, GROUP))
    return PackedLinear(data, out_features, gate_up)


def _check_packed(w_packed, name: str, gate_up: bool, fn: str) -> None:
    if not isinstance(w_packed, PackedLinear):
        raise TypeError(f"{name} must be a PackedLinear from dspark_ops.pack_linear_weight, got "
                        f"{type(w_packed).__name__}" + (" (pack the weight first)" if isinstance(w_packed, torch.Tensor)
                                                        else ""))
    if w_packed.gate_up != gate_up:
        raise ValueError(f"{name} was packed with gate_up={w_packed.gate_up}; {fn} needs gate_up={gate_up}")


def _check_x(x, w_packed: PackedLinear) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"x must be float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != w_packed.in_features:
        raise ValueError(f"x must be [..., {w_packed.in_features}] (the weight's in_features), got {list(x.shape)}")
    if x.device != w_packed.device:
        raise ValueError(f"x is on {x.device} but the weight is packed for {w_packed.device}")


def linear(x: torch.Tensor, w_packed: PackedLinear, bias: torch.Tensor | None = None, *,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T (+ bias) (+ residual), like torch.nn.functional.linear.

    Args:
      x: [..., in] float32 (the rows of all leading dims form the block).
      w_packed: from pack_linear_weight(W) (W [out, in]).
      bias: [out] float32 or None.
      residual: [..., out] float32 added to the output (saves a pass), or None.

    Returns:
      [..., out] float32. On CPU, blocks of up to MAX_ROWS (64) rows run the
      kernel, taller ones torch's matmul. Accuracy: fp32 accumulation (bf16
      weights widened exactly), so |y - exact| <= gamma_{in+2} (|x| |W|^T +
      |bias| + |residual|) + 2^-24 |y| with gamma_n = n 2^-24 / (1 - n 2^-24)
      (reference.linear_error_bound), in any summation order.
    """
    _check_packed(w_packed, "w_packed", False, "linear")
    _check_x(x, w_packed)
    out = w_packed.out_features
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (out,) or bias.dtype != torch.float32:
            raise ValueError(f"bias must be a float32 tensor of shape [{out}], got "
                             f"{(bias.dtype, list(bias.shape)) if isinstance(bias, torch.Tensor) else bias}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
        bias = bias.contiguous()
    if residual is not None:
        shape = (*x.shape[:-1], out)
        if not isinstance(residual, torch.Tensor) or residual.shape != shape or residual.dtype != torch.float32:
            raise ValueError(f"residual must be a float32 tensor of shape {list(shape)}, got "
                             f"{(residual.dtype, list(residual.shape)) if isinstance(residual, torch.Tensor) else residual}")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    return ops.linear(x, w_packed.data, out, bias, residual)


def linear_silu_mul(x: torch.Tensor, w_gate_up_packed: PackedLinear) -> torch.Tensor:
    """silu(x Wg^T) * (x Wu^T): the gated MLP's first half in one pass over both weights.

    Args:
      x: [..., in] float32.
      w_gate_up_packed: pack_linear_weight(torch.cat([Wg, Wu]), gate_up=True)
        (Wg, Wu [I, in]).

    Returns:
      [..., I] float32.
    """
    _check_packed(w_gate_up_packed, "w_gate_up_packed", True, "linear_silu_mul")
    _check_x(x, w_gate_up_packed)
    return ops.linear_silu_mul(x, w_gate_up_packed.data, w_gate_up_packed.out_features)
