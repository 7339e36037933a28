"""One forward per new token on a KV cache: the model side of the sampler's loop (:mod:`tdpo_lab.core.generation`).

:func:`cached_steps` returns a callable ``(new ids [B, n], their positions [B, n]) -> next-token logits [B, V]``
that keeps the keys and values of every column it has seen. The first call feeds the (left-padded) prompts,
each later call the token each row drew. Two kinds:

- :class:`ModelSteps`: any causal LM of transformers, through its own forward and cache object, with the
  output layer at the last position only (``logits_to_keep``);
- :class:`GPT2Steps`: a plain GPT-2 (every model of the tiny profile, and ``gpt2`` from the hub), its forward
  written out on a preallocated cache. The same operations on the same weights, without transformers'
  per-call bookkeeping (argument checks, mask building, cache objects, output classes), which costs more than
  the arithmetic at 8 rows x 1 token: on the tiny profile it takes a TI-DPO anchor from 0.147 s to 0.118 s
  of CPU time (benchmarks/README.md, "train step"). It is checked against :class:`ModelSteps` and against a
  loop without a cache in tests/test_generation.py. TI-DPO's attribution reuses its block arithmetic
  (:func:`gpt2_block_from_attention`).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

__all__ = ["GPT2Steps", "ModelSteps", "cached_steps", "gpt2_block_from_attention"]


def cached_steps(model, mask: torch.Tensor):
    """The step function for ``model`` (eval mode, no grad): :class:`GPT2Steps` where it applies, else
    :class:`ModelSteps`. ``mask`` ``[B, columns]``: 1 on every real column the loop will ever feed (the
    prompts' left padding 0), long or bool; call ``k`` sees its first ``seen`` columns."""
    return (GPT2Steps if GPT2Steps.applies(model) else ModelSteps)(model, mask)


class ModelSteps:
    """Steps through the model's own forward (``use_cache=True``), whatever its architecture."""

    def __init__(self, model, mask: torch.Tensor):
        self.model, self.mask, self.seen, self.cache = model, mask, 0, None
        params = inspect.signature(model.forward).parameters
        # transformers renamed the KV-cache argument and output field past_key_values -> cache (5.2x); the kit
        # supports >= 4.40, so use whichever name this version's forward declares.
        self.cache_name = "cache" if "cache" in params else "past_key_values"
        # The output layer at the last position only (the prompt's forward would run it at every position):
        # logits_to_keep (transformers >= 4.50), num_logits_to_keep before; older versions compute them all.
        names = [name for name in ("logits_to_keep", "num_logits_to_keep") if name in params]
        self.keep = {names[0]: 1} if names else {}

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self.seen += ids.shape[1]
        out = self.model(
            input_ids=ids,
            attention_mask=self.mask[:, : self.seen],
            position_ids=positions,
            use_cache=True,
            **{self.cache_name: self.cache},
            **self.keep,
        )
        self.cache = getattr(out, self.cache_name)
        return out.logits[:, -1]


class GPT2Steps:
    """Steps of a plain ``GPT2LMHeadModel``, its blocks written out: ``ln_1``, ``c_attn`` (``addmm``, as its
    Conv1D layers compute), scaled dot-product attention over the cached columns, ``c_proj``, ``ln_2``,
    ``c_fc``, the model's own activation module, ``c_proj``, then ``ln_f`` at the last column and the output
    layer, called as a module (hooks on it apply).

    Applies to a GPT-2 whose block layers are plain Conv1D (not LoRA-wrapped), without hooks on the model or
    inside its transformer (they would be skipped; the
    output-capturing hooks transformers 5 installs for good once ``output_hidden_states`` was asked for do
    nothing unless a forward collects outputs, so they do not count) and with the default attention options (``scale_attn_weights``, no ``scale_attn_by_inverse_layer_idx``, no
    ``reorder_and_upcast_attn``, no cross-attention); anything else takes :class:`ModelSteps`.
    """

    @staticmethod
    def applies(model) -> bool:
        c, body = model.config, getattr(model, "transformer", None)
        return (
            type(model).__name__ == "GPT2LMHeadModel"
            and getattr(c, "scale_attn_weights", False)
            and not getattr(c, "scale_attn_by_inverse_layer_idx", True)
            and not getattr(c, "reorder_and_upcast_attn", True)
            and not getattr(c, "add_cross_attention", True)
            and not any(_foreign_hooks(m) for m in (model, *body.modules()))
            # the written-out blocks read the layers' weights: a LoRA-wrapped layer computes more than them
            and all(
                type(layer).__name__ == "Conv1D"
                for b in body.h
                for layer in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj)
            )
        )

    def __init__(self, model, mask: torch.Tensor):
        self.body, self.head, self.seen = model.transformer, model.get_output_embeddings(), 0
        self.attend = mask.bool()[:, None, None, :]  # [B, 1, 1, columns], True = may be attended to
        heads, width, weight = model.config.n_head, model.config.n_embd, model.transformer.wte.weight
        shape = (2, mask.shape[0], heads, mask.shape[1], width // heads)  # keys and values of every column
        self.kv = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in self.body.h]

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows, n = ids.shape
        start, self.seen = self.seen, self.seen + n
        attend = self.attend[..., : self.seen]
        if n > 1:  # causal among the new columns; each also sees itself, so a padding column attends to one
            column = torch.arange(self.seen, device=ids.device)
            query = torch.arange(start, self.seen, device=ids.device)[:, None]
            attend = (attend & (column <= query)) | (column == query)  # [B, 1, n, seen]
        body = self.body
        x = body.wte(ids) + body.wpe(positions)  # [B, n, d]
        d = x.shape[-1]
        for block, kv in zip(body.h, self.kv, strict=True):
            ln_1 = block.ln_1
            h = F.layer_norm(x, (d,), ln_1.weight, ln_1.bias, ln_1.eps).view(-1, d)
            qkv = torch.addmm(block.attn.c_attn.bias, h, block.attn.c_attn.weight).view(
                rows, n, 3, kv.shape[2], -1
            )
            kv[:, :, :, start : self.seen] = qkv[:, :, 1:].permute(2, 0, 3, 1, 4)  # [2, B, heads, n, d_head]
            q = qkv[:, :, 0].transpose(1, 2)
            x = gpt2_block_from_attention(
                block, x, q, kv[0, :, :, : self.seen], kv[1, :, :, : self.seen], attend
            )
        ln_f = body.ln_f
        return self.head(F.layer_norm(x[:, -1], (d,), ln_f.weight, ln_f.bias, ln_f.eps))


def gpt2_block_from_attention(
    block, x: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend
):
    """The rest of a GPT-2 block once its ``c_attn`` has run: the block's output ``[B, n, d]`` at ``n`` columns.

    ``x`` ``[B, n, d]``: the block's input at those columns; ``q`` ``[B, heads, n, d_head]`` their queries;
    ``k``, ``v`` ``[B, heads, columns, d_head]`` the keys and values they may attend to, ``attend`` a bool mask
    broadcastable to ``[B, heads, n, columns]``. Scaled dot-product attention, ``c_proj``, residual, ``ln_2``,
    ``c_fc``, the block's own activation module, ``c_proj``, residual: the arithmetic of transformers' GPT-2
    block (its Conv1D layers are ``addmm``), in eval mode. :class:`GPT2Steps` runs it at the new columns;
    TI-DPO's attribution at each row's last position (:func:`tdpo_lab.methods.tidpo_importance.saliency_from_last_block`).
    """
    attn, mlp, ln_2 = block.attn, block.mlp, block.ln_2
    d = x.shape[-1]
    a = F.scaled_dot_product_attention(q, k, v, attend).transpose(1, 2).reshape(-1, d)
    x = x + torch.addmm(attn.c_proj.bias, a, attn.c_proj.weight).view_as(x)
    h = F.layer_norm(x, (d,), ln_2.weight, ln_2.bias, ln_2.eps).view(-1, d)
    h = mlp.act(torch.addmm(mlp.c_fc.bias, h, mlp.c_fc.weight))
    return x + torch.addmm(mlp.c_proj.bias, h, mlp.c_proj.weight).view_as(x)


def _foreign_hooks(module) -> bool:
    if hasattr(module, "_hf_hook"):  # accelerate's offloading/dispatch wraps forward itself
        return True
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    return any(getattr(hook, "__module__", None) != "transformers.utils.output_capturing" for hook in hooks)
