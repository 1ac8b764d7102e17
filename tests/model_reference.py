"""Straightforward float64 references for the model tests: explicit per-head attention, complex-number RoPE,
weights read by their Hugging Face / DeepSpec names (so they are independent of the fused layout)."""
from __future__ import annotations

import math

import torch


def rms(x, w, eps):
    x = x.double()
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w.double()


def inv_freq(head_dim, theta, scaling):
    out = []
    for i in range(head_dim // 2):
        f = theta ** (-2 * i / head_dim)
        kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            f /= scaling["factor"]
        elif kind == "llama3":
            old, lo, hi = (scaling["original_max_position_embeddings"], scaling["low_freq_factor"],
                           scaling["high_freq_factor"])
            wavelen = 2 * math.pi / f
            if wavelen > old / lo:
                f /= scaling["factor"]
            elif wavelen >= old / hi:
                s = (old / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / scaling["factor"] + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def rope(x, positions, freqs):
    """x [T, H, D] rotated by angle pos * f on (x[i], x[i + D/2]) pairs, as complex numbers."""
    half = x.shape[-1] // 2
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    angle = positions.double().view(-1, 1, 1) * freqs.view(1, 1, -1)
    z = z * torch.polar(torch.ones_like(angle), angle)
    return torch.cat((z.real, z.imag), dim=-1)


def attention(q, k, v, visible):
    """q [Tq, Hq, D], k/v [Tk, Hkv, D], visible [Tq, Tk] bool -> [Tq, Hq*D]."""
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[2]
    out = torch.empty(q.shape[0], hq, d, dtype=torch.float64)
    for h in range(hq):
        kh = h // (hq // hkv)
        scores = q[:, h] @ k[:, kh].T / math.sqrt(d)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[:, h] = torch.softmax(scores, dim=-1) @ v[:, kh]
    return out.flatten(1)


def lin(x, sd, name):
    y = x.double() @ sd[name + ".weight"].double().T
    if name + ".bias" in sd:
        y = y + sd[name + ".bias"].double()
    return y


def qkv(x, sd, p, cfg, positions, freqs):
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    q = lin(x, sd, p + "self_attn.q_proj").view(-1, hq, d)
    k = lin(x, sd, p + "self_attn.k_proj").view(-1, hkv, d)
    v = lin(x, sd, p + "self_attn.v_proj").view(-1, hkv, d)
    if p + "self_attn.q_norm.weight" in sd:
        q = rms(q, sd[p + "self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms(k, sd[p + "self_attn.k_norm.weight"], cfg.rms_norm_eps)
    return rope(q, positions, freqs), rope(k, positions, freqs), v


def mlp(x, sd, p):
    g, u = lin(x, sd, p + "mlp.gate_proj"), lin(x, sd, p + "mlp.up_proj")
    return lin(torch.nn.functional.silu(g) * u, sd, p + "mlp.down_proj")


def llama(sd, cfg, ids):
    """One sequence ids [T] -> (logits [T, V], {layer id: output [T, d]})."""
    t = ids.shape[0]
    freqs = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    pos = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    x = sd["model.embed_tokens.weight"][ids].double()
    outs = {-1: x}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = qkv(rms(x, sd[p + "input_layernorm.weight"], cfg.rms_norm_eps), sd, p, cfg, pos, freqs)
        x = x + lin(attention(q, k, v, causal), sd, p + "self_attn.o_proj")
        x = x + mlp(rms(x, sd[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps), sd, p)
        outs[i] = x
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"]).double()
    return rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ head.T, outs


def dspark_block(sd, cfg, embed, head, features, anchor, block_size, mask_token):
    """DSpark block for one request: features [S, m*d] of positions 0..S-1, anchor at position S.
    A drafter with block_context (``block_context_norm.weight`` in sd) adds its normed ctx[S-1] to every row.

    Returns (base logits [G, V], hidden [G, d])."""
    eps = cfg.rms_norm_eps
    s = features.shape[0]
    freqs = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    ctx = rms(features.double() @ sd["fc.weight"].double().T, sd["hidden_norm.weight"], eps)
    ids = torch.tensor([anchor] + [mask_token] * (block_size - 1))
    x = embed[ids].double()
    if "block_context_norm.weight" in sd and s > 0:
        x = x + rms(ctx[s - 1], sd["block_context_norm.weight"], eps)
    bpos, cpos = torch.arange(s, s + block_size), torch.arange(s)
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        q, k, v = qkv(rms(x, sd[p + "input_layernorm.weight"], eps), sd, p, cfg, bpos, freqs)
        _, kc, vc = qkv(ctx, sd, p, cfg, cpos, freqs)
        visible = torch.ones(block_size, s + block_size, dtype=torch.bool)
        x = x + lin(attention(q, torch.cat((kc, k)), torch.cat((vc, v)), visible), sd, p + "self_attn.o_proj")
        x = x + mlp(rms(x, sd[p + "post_attention_layernorm.weight"], eps), sd, p)
    h = rms(x, sd["norm.weight"], eps)
    return h @ head.double().T, h


def eagle3(sd, cfg, embed, features, ids):
    """EAGLE-3 layer stack over one sequence (features [T, m*d] paired with ids [T], positions 0..T-1)."""
    eps = cfg.rms_norm_eps
    t = ids.shape[0]
    freqs = inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    pos = torch.arange(t)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    h = features.double() @ sd["fc.weight"].double().T
    e = embed[ids].double()
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        x = torch.cat((rms(e, sd[p + "input_layernorm.weight"], eps), rms(h, sd[p + "hidden_norm.weight"], eps)), -1)
        q, k, v = qkv(x, sd, p, cfg, pos, freqs)
        h = h + lin(attention(q, k, v, causal), sd, p + "self_attn.o_proj")
        h = h + mlp(rms(h, sd[p + "post_attention_layernorm.weight"], eps), sd, p)
    return h


class ContractOps:
    """The documented semantics of ``append_kv`` / ``draft_block_attention`` (issue 3), written plainly,
    so the paged backend's plumbing is tested before (and independently of) the real kernels."""

    @staticmethod
    def append_kv(k, v, k_cache, v_cache, slot_mapping):
        page_size = k_cache.shape[1]
        for t, slot in enumerate(slot_mapping.tolist()):
            if slot >= 0:
                k_cache[slot // page_size, slot % page_size] = k[t]
                v_cache[slot // page_size, slot % page_size] = v[t]

    @staticmethod
    def draft_block_attention(q, k_cache, v_cache, page_table, seq_lens, cu_q_lens, *, causal=True, scale=None,
                              max_block_rows=16):
        page_size = k_cache.shape[1]
        out = torch.empty_like(q)
        for b in range(page_table.shape[0]):
            lo, hi, length = int(cu_q_lens[b]), int(cu_q_lens[b + 1]), int(seq_lens[b])
            n = hi - lo
            assert n <= max_block_rows
            pos = torch.arange(length)
            pages = page_table[b, pos // page_size].long()
            k, v = k_cache[pages, pos % page_size], v_cache[pages, pos % page_size]
            visible = (pos.view(1, -1) <= (length - n + torch.arange(n)).view(-1, 1)) if causal else \
                torch.ones(n, length, dtype=torch.bool)
            out[lo:hi] = attention(q[lo:hi].double(), k.double(), v.double(), visible).view(n, *q.shape[1:]).to(q.dtype)
        return out
