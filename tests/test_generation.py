"""Sampling: shapes, reproducibility, pure sampling (no hidden top-k), left padding, EOS handling, errors.

A tiny byte-level BPE tokenizer and a tiny random GPT-2 are built here, so the tests need no other module
of the kit and nothing from the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from toy import make_model, make_tokenizer

from tdpo_lab.generation import decode_response, encode_prompts, sample, sample_ids


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.set_num_threads(1)
    return make_model(tok, init_std=0.02)


PROMPTS = ["this movie", "a terrible film, boring", "I", "the plot made no sense but"]


def test_shapes_and_types(model, tok):
    texts = sample(model, tok, PROMPTS, num_samples=3, max_new_tokens=6, batch_size=5)
    assert len(texts) == len(PROMPTS)
    assert all(len(per) == 3 and all(isinstance(t, str) for t in per) for per in texts)
    ids = sample_ids(model, tok, PROMPTS, num_samples=3, max_new_tokens=6, batch_size=5)
    assert all(1 <= len(s) <= 6 for per in ids for s in per)
    assert sample(model, tok, [], num_samples=2, max_new_tokens=4) == []


def test_same_seed_same_samples_other_seed_differs_and_caller_rng_untouched(model, tok):
    kw = dict(num_samples=2, max_new_tokens=8, batch_size=3)
    torch.manual_seed(123)
    a = sample_ids(model, tok, PROMPTS, seed=7, **kw)
    after = torch.rand(3)
    torch.manual_seed(123)
    expected_after = torch.rand(3)
    # fork_rng: sampling must not consume or reseed the caller's random stream
    torch.testing.assert_close(after, expected_after)
    assert sample_ids(model, tok, PROMPTS, seed=7, **kw) == a
    assert sample_ids(model, tok, PROMPTS, seed=8, **kw) != a


def test_pure_sampling_has_no_hidden_top_k(model, tok):
    # transformers fills an unset top_k with 50; top_k=0 must switch truncation off. A near-uniform random
    # model over 300 tokens then shows far more than 50 distinct first tokens in 600 draws.
    ids = sample_ids(model, tok, ["this movie"], num_samples=600, max_new_tokens=1, batch_size=600)
    first = {s[0] for s in ids[0]}
    assert len(first) > 150
    limited = sample_ids(
        model, tok, ["this movie"], num_samples=600, max_new_tokens=1, batch_size=600, top_k=5
    )
    assert len({s[0] for s in limited[0]}) <= 5


def test_first_token_frequencies_match_softmax(model, tok):
    # Pure sampling at temperature 1 draws from softmax(logits): compare the empirical frequency of the
    # 10 most likely first tokens with their probabilities (a model with spread-out logits).
    peaked = make_model(tok, seed=3, init_std=0.4)
    n = 3000
    ids = sample_ids(peaked, tok, ["this movie"], num_samples=n, max_new_tokens=1, batch_size=n)
    counts = torch.bincount(torch.tensor([s[0] for s in ids[0]]), minlength=len(tok)).double()
    context = torch.tensor([encode_prompts(tok, ["this movie"])[0]])
    with torch.no_grad():
        probs = torch.softmax(peaked(context).logits[0, -1].double(), -1)
    top = probs.topk(10).indices
    stderr = (probs[top] * (1 - probs[top]) / n).sqrt()
    assert torch.all((counts[top] / n - probs[top]).abs() < 5 * stderr + 1e-3)


def test_left_padding_matches_unpadded_greedy(tok):
    # With a tiny temperature sampling is argmax; a batch of left-padded prompts must then reproduce a naive
    # one-prompt-at-a-time greedy loop with no padding at all.
    spread = make_model(tok, seed=1, init_std=0.5)
    got = sample_ids(spread, tok, PROMPTS, num_samples=1, max_new_tokens=6, temperature=1e-5, batch_size=4)
    eos = tok.eos_token_id
    for prompt_ids, per in zip(encode_prompts(tok, PROMPTS), got, strict=True):
        ctx, naive = list(prompt_ids), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(spread(torch.tensor([ctx])).logits[0, -1].argmax())
                naive.append(nxt)
                ctx.append(nxt)
                if nxt == eos:
                    break
        assert per[0] == naive


def test_eos_cut_and_decoding(tok):
    eos = tok.eos_token_id
    eager = make_model(tok, seed=2)
    bias = torch.zeros(len(tok))
    bias[eos] = 3.0  # make EOS likely so that many samples end early
    handle = eager.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    try:
        ids = sample_ids(eager, tok, PROMPTS, num_samples=8, max_new_tokens=12, batch_size=7)
        texts = sample(eager, tok, PROMPTS, num_samples=8, max_new_tokens=12, batch_size=7)
    finally:
        handle.remove()
    flat = [s for per in ids for s in per]
    ended = [s for s in flat if s[-1] == eos]
    assert ended and len(ended) < len(flat)
    assert all(eos not in s[:-1] for s in flat)  # nothing after the first EOS
    for per_ids, per_texts in zip(ids, texts, strict=True):
        for s, text in zip(per_ids, per_texts, strict=True):
            body = s[:-1] if s[-1] == eos else s
            assert text == tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    word = tok("great", add_special_tokens=False)["input_ids"]
    assert decode_response(tok, word + [eos] + word) == "great"


def test_empty_prompt_gets_eos_as_bos(model, tok):
    assert encode_prompts(tok, ["", "this"]) == [
        [tok.eos_token_id],
        tok("this", add_special_tokens=False)["input_ids"],
    ]
    texts = sample(model, tok, [""], num_samples=2, max_new_tokens=4)
    assert len(texts[0]) == 2


def test_tokenizer_and_model_state_restored(tok):
    m = make_model(tok, init_std=0.02)
    m.train()
    tok.padding_side = "right"
    sample(m, tok, PROMPTS, num_samples=1, max_new_tokens=3)
    assert m.training
    assert tok.padding_side == "right"


def test_bad_input_errors(model, tok):
    with pytest.raises(TypeError, match="one string"):
        sample(model, tok, "this movie", num_samples=1, max_new_tokens=2)
    with pytest.raises(TypeError, match="strings"):
        sample(model, tok, ["ok", None], num_samples=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="top_k"):
        sample(model, tok, ["ok"], num_samples=1, max_new_tokens=2, top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        sample(model, tok, ["ok"], num_samples=1, max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, tok, ["ok"], num_samples=1, max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="num_samples"):
        sample(model, tok, ["ok"], num_samples=0, max_new_tokens=2)
    with pytest.raises(ValueError, match="positions"):
        sample(model, tok, ["ok"], num_samples=1, max_new_tokens=100)
