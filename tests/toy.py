"""A toy byte-level BPE tokenizer and a tiny GPT-2 for tests that must not depend on the kit's own loaders."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

TEXTS = [
    "this movie was great and the acting was excellent",
    "a terrible film, boring and slow from the start",
    "the plot made no sense but the music was nice",
    "I loved every scene of it, see it twice",
] * 5


def make_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's pre-tokenisation) with ``<|endoftext|>`` as eos = pad = bos."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXTS, trainer)
    eos = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos, bos_token=eos)


def make_model(tokenizer, seed: int = 0, init_std: float = 0.2, n_positions: int = 64) -> GPT2LMHeadModel:
    """A 2-layer, 32-wide GPT-2 without dropout, in eval mode."""
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=n_positions,
        initializer_range=init_std,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config).eval()
