"""A short torch Transformer-XL: the original equations, the transformers-4.x layout.

transformers 5 no longer has Transformer-XL (``TransfoXLLMHeadModel`` was
deprecated in 4.35 and deleted for 5), so an exported ProtTXL needs another
way to run in torch. This module is that way and the reference our Flax
network is tested against: kimiyoung/transformer-xl's ``MemTransformerLM``
(``attn_type`` 0, shared ``r_w_bias``/``r_r_bias``, post-LayerNorm, ReLU
feed-forward, embeddings x sqrt(d_model), tied output, one softmax cluster,
empty memory at the start) with its modules named as in transformers 4.x, so
``load_state_dict`` reads an exported ``model.safetensors`` as it is
(``crit.out_layers.0.weight`` is the word table: tied, not stored).

Written from the equations, not from either code base. ``exact_positions``
computes ``R_{i-j}`` for every (query, key) pair directly (slow, obviously
right: the test's reference); otherwise the original pad-and-reshape shift
(fast: the benchmark's baseline).

Usage::

    from protlm_jax.hf.txl_torch import TransfoXLReference
    model = TransfoXLReference.from_pretrained("path/to/export").eval()
    out = model(input_ids)                    # first segment: empty memory
    out = model(next_ids, mems=out["mems"])   # memory carried

Shapes: B batch, I queries, M memory, J = M + I keys, N heads, K d_head.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

import torch
from torch import nn


class _Attention(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        d, n, k = c["d_model"], c["n_head"], c["d_head"]
        self.n, self.k = n, k
        self.qkv_net = nn.Linear(d, 3 * n * k, bias=False)
        self.o_net = nn.Linear(n * k, d, bias=False)
        self.r_net = nn.Linear(d, n * k, bias=False)
        self.layer_norm = nn.LayerNorm(d, eps=c["layer_norm_epsilon"])
        self.drop = nn.Dropout(c["dropout"])
        self.dropatt = nn.Dropout(c["dropatt"])


class _FeedForward(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        d, f = c["d_model"], c["d_inner"]
        self.CoreNet = nn.Sequential(nn.Linear(d, f), nn.ReLU(inplace=True),
                                     nn.Dropout(c["dropout"]), nn.Linear(f, d),
                                     nn.Dropout(c["dropout"]))
        self.layer_norm = nn.LayerNorm(d, eps=c["layer_norm_epsilon"])

    def forward(self, x):
        return self.layer_norm(x + self.CoreNet(x))


class _Layer(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        self.dec_attn = _Attention(c)
        self.pos_ff = _FeedForward(c)


class _Embedding(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        self.emb_layers = nn.ModuleList([nn.Embedding(c["vocab_size"], c["d_model"])])


class _Body(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        self.word_emb = _Embedding(c)
        self.r_w_bias = nn.Parameter(torch.zeros(c["n_head"], c["d_head"]))
        self.r_r_bias = nn.Parameter(torch.zeros(c["n_head"], c["d_head"]))
        self.layers = nn.ModuleList([_Layer(c) for _ in range(c["n_layer"])])
        self.drop = nn.Dropout(c["dropout"])


class _Crit(nn.Module):
    def __init__(self, c: Dict[str, Any]):
        super().__init__()
        self.out_layers = nn.ModuleList([nn.Linear(c["d_model"], c["vocab_size"])])


def _sinusoid(dist: torch.Tensor, d_model: int) -> torch.Tensor:
    """[..., d_model] ``[sin, cos](dist · inv_freq)``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0.0, d_model, 2.0) / d_model))
    x = dist.float()[..., None] * inv_freq
    return torch.cat([x.sin(), x.cos()], dim=-1)


class TransfoXLReference(nn.Module):
    """``MemTransformerLM`` under transformers-4.x ``TransfoXLLMHeadModel`` names.

    Args:
      config: a ``transfo-xl`` ``config.json`` dict (``vocab_size``,
        ``d_model``, ``n_layer``, ``n_head``, ``d_head``, ``d_inner``,
        ``mem_len``, ``clamp_len``, ``same_length``, ``dropout``, ``dropatt``,
        ``layer_norm_epsilon``).
      exact_positions: relative positions per pair (see the module docstring).
    """

    def __init__(self, config: Dict[str, Any], exact_positions: bool = False):
        super().__init__()
        c = {"dropout": 0.0, "dropatt": 0.0, "layer_norm_epsilon": 1e-5, "clamp_len": -1,
             "same_length": False, "mem_len": 0, **config}
        self.c = c
        self.exact_positions = exact_positions
        self.transformer = _Body(c)
        self.crit = _Crit(c)
        self.crit.out_layers[0].weight = self.transformer.word_emb.emb_layers[0].weight

    @classmethod
    def from_pretrained(cls, directory: str, exact_positions: bool = False
                        ) -> "TransfoXLReference":
        """Reads ``config.json`` and ``model.safetensors`` (safetensors only: no pickle)."""
        from safetensors.torch import load_file

        with open(os.path.join(directory, "config.json")) as f:
            model = cls(json.load(f), exact_positions)
        state = load_file(os.path.join(directory, "model.safetensors"))
        state.setdefault("crit.out_layers.0.weight",
                         state["transformer.word_emb.emb_layers.0.weight"])
        model.load_state_dict(state, strict=True)
        return model

    def _mask(self, qlen: int, mlen: int) -> torch.Tensor:
        """[I, J] True = cannot attend: causal, and with ``same_length`` keys
        ``mem_len`` or more back."""
        i = torch.arange(qlen)[:, None]
        j = torch.arange(mlen + qlen)[None, :]
        dist = mlen + i - j
        masked = dist < 0
        if self.c["same_length"]:
            masked = masked | (dist >= max(self.c["mem_len"], 1))
        return masked

    def _attend(self, layer: _Layer, h, mem, mask):
        a = layer.dec_attn
        b, qlen, _ = h.shape
        cat = h if mem is None else torch.cat([mem.detach(), h], dim=1)
        klen = cat.shape[1]
        mlen = klen - qlen
        q, k, v = a.qkv_net(cat).chunk(3, dim=-1)
        q = q[:, -qlen:].reshape(b, qlen, a.n, a.k)
        k = k.reshape(b, klen, a.n, a.k)
        v = v.reshape(b, klen, a.n, a.k)
        ac = torch.einsum("bind,bjnd->bnij", q + self.transformer.r_w_bias, k)
        clamp = self.c["clamp_len"]
        if self.exact_positions:
            dist = (mlen + torch.arange(qlen)[:, None] - torch.arange(klen)[None, :])
            dist = dist.clamp(min=0)
            if clamp > 0:
                dist = dist.clamp(max=clamp)
            r = a.drop(_sinusoid(dist, self.c["d_model"]))  # [I, J, D]
            kr = a.r_net(r).reshape(qlen, klen, a.n, a.k)
            bd = torch.einsum("bind,ijnd->bnij", q + self.transformer.r_r_bias, kr)
        else:
            pos = torch.arange(klen - 1, -1, -1.0)
            if clamp > 0:
                pos = pos.clamp(max=clamp)
            kr = a.r_net(self.transformer.drop(_sinusoid(pos, self.c["d_model"])))
            bd = torch.einsum("bind,jnd->bnij", q + self.transformer.r_r_bias,
                              kr.reshape(klen, a.n, a.k))
            bd = nn.functional.pad(bd, (1, 0)).reshape(b, a.n, klen + 1, qlen)[:, :, 1:]
            bd = bd.reshape(b, a.n, qlen, klen)
        score = (ac + bd) / math.sqrt(a.k)
        score = score.masked_fill(mask[None, None], -1e30)
        prob = a.dropatt(torch.softmax(score, dim=-1))
        vec = torch.einsum("bnij,bjnd->bind", prob, v).reshape(b, qlen, a.n * a.k)
        return a.layer_norm(h + a.drop(a.o_net(vec)))

    def forward(self, input_ids: torch.Tensor, mems: Optional[List[torch.Tensor]] = None,
                mem_len: Optional[int] = None) -> Dict[str, Any]:
        """One segment; ``mems`` one [B, M, D] per layer (None: empty).

        Returns:
          ``logits`` [B, I, V], ``hidden_states`` (embedding output and every
          layer's), ``mems`` (the last ``mem_len`` layer inputs, detached).
        """
        t = self.transformer
        d = self.c["d_model"]
        mem_len = self.c["mem_len"] if mem_len is None else mem_len
        qlen = input_ids.shape[1]
        mlen = 0 if mems is None else mems[0].shape[1]
        h = t.drop(t.word_emb.emb_layers[0](input_ids) * math.sqrt(d))
        mask = self._mask(qlen, mlen)
        states, new_mems = [h], []
        for i, layer in enumerate(t.layers):
            mem = None if mems is None else mems[i]
            cat = h if mem is None else torch.cat([mem, h], dim=1)
            new_mems.append(cat[:, max(0, cat.shape[1] - mem_len):].detach())
            h = layer.pos_ff(self._attend(layer, h, mem, mask))
            states.append(h)
        logits = self.crit.out_layers[0](t.drop(h))
        return {"logits": logits, "hidden_states": states, "mems": new_mems}
