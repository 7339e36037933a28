"""Sampling: shapes, reproducibility, pure sampling (no hidden top-k), left padding, EOS handling, errors.

The KV-cache sampler (``sample_fast`` / ``sample_ids_fast``) is checked against a naive loop without a cache,
against greedy decoding, and its filter (``filter_logits``) against hand-counted token sets and against
transformers' own logits warpers, so that it draws from the law ``generate`` draws from.

A tiny byte-level BPE tokenizer and a tiny random GPT-2 are built here, so the tests need no other module
of the kit and nothing from the hub.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from toy import make_model, make_tokenizer
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from tdpo_lab.core.generation import (
    _batch_seed,
    _left_pad,
    decode_response,
    draw_tokens,
    encode_prompts,
    filter_logits,
    sample,
    sample_fast,
    sample_ids,
    sample_ids_fast,
)
from tdpo_lab.core.kv_steps import GPT2Steps, ModelSteps, cached_steps


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


# --- the KV-cache sampler ------------------------------------------------------------------------------


def naive_sample_ids(model, tok, prompts, *, num_samples, max_new_tokens, batch_size, seed, **law):
    """Reference for sample_ids_fast without a cache: a full forward over every whole sequence at each step.

    Same rows, batches, per-batch seeds and left padding as the kit; the draw is ``draw_tokens`` on the
    last position's logits (the same filter and the same ``torch.multinomial`` calls), so the random numbers
    line up token for token. Rows that drew EOS go on sampling here; their extra tokens are cut afterwards.
    """
    eos = tok.eos_token_id
    rows = [(i, ids) for i, ids in enumerate(encode_prompts(tok, prompts)) for _ in range(num_samples)]
    out = [[] for _ in prompts]
    with torch.random.fork_rng():
        for index, start in enumerate(range(0, len(rows), batch_size)):
            batch = rows[start : start + batch_size]
            seqs = [list(ids) for _, ids in batch]
            new = [[] for _ in batch]
            torch.manual_seed(_batch_seed(seed, index))
            for _ in range(max_new_tokens):
                width = max(len(s) for s in seqs)
                ids = torch.tensor([[eos] * (width - len(s)) + s for s in seqs])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
                positions = (mask.cumsum(-1) - 1).clamp_min(0)
                with torch.no_grad():
                    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
                for s, n, token in zip(seqs, new, draw_tokens(logits[:, -1], **law).tolist(), strict=True):
                    s.append(token)
                    n.append(token)
                if all(eos in n for n in new):
                    break
            for (prompt_index, _), n in zip(batch, new, strict=True):
                out[prompt_index].append(n[: n.index(eos) + 1] if eos in n else n)
    return out


def eos_bias_hook(model, tok, bias_value):
    bias = torch.zeros(len(tok))
    bias[tok.eos_token_id] = bias_value
    return model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)


ANCHOR_LAW = dict(temperature=0.8, top_k=20, top_p=0.9)  # the anchors' kind of law, scaled to 300 tokens


@pytest.mark.parametrize("law", [ANCHOR_LAW, dict(temperature=1.0, top_k=0, top_p=1.0), dict(top_p=0.8)])
def test_fast_equals_naive_loop_without_cache(tok, law):
    spread = make_model(tok, seed=1, init_std=0.4)
    kw = dict(num_samples=3, max_new_tokens=10, batch_size=5, seed=11, **law)  # 12 rows: batches 5, 5, 2
    fast = sample_ids_fast(spread, tok, PROMPTS, **kw)
    assert fast == naive_sample_ids(spread, tok, PROMPTS, **kw)
    assert len({tuple(s) for per in fast for s in per}) > 6  # real sampling, not one repeated sequence


def test_fast_equals_naive_loop_when_rows_end_early(tok):
    # Rows that drew EOS are fed EOS afterwards while the others go on: their answers must not change.
    spread = make_model(tok, seed=1, init_std=0.4)
    handle = eos_bias_hook(spread, tok, 4.0)
    try:
        kw = dict(num_samples=4, max_new_tokens=12, batch_size=16, seed=5, **ANCHOR_LAW)
        fast = sample_ids_fast(spread, tok, PROMPTS, **kw)
        assert fast == naive_sample_ids(spread, tok, PROMPTS, **kw)
    finally:
        handle.remove()
    lengths = [len(s) for per in fast for s in per]
    assert min(lengths) < max(lengths)  # some rows ended before others


def test_top_k_one_is_greedy(tok):
    # top_k=1 leaves one candidate: the left-padded batch must reproduce an unpadded one-prompt greedy loop.
    spread = make_model(tok, seed=1, init_std=0.5)
    got = sample_ids_fast(spread, tok, PROMPTS, num_samples=2, max_new_tokens=6, top_k=1, batch_size=8)
    eos = tok.eos_token_id
    for prompt_ids, per in zip(encode_prompts(tok, PROMPTS), got, strict=True):
        ctx, greedy = list(prompt_ids), []
        with torch.no_grad():
            for _ in range(6):
                nxt = int(spread(torch.tensor([ctx])).logits[0, -1].argmax())
                greedy.append(nxt)
                ctx.append(nxt)
                if nxt == eos:
                    break
        assert per == [greedy, greedy]


# probabilities 0.4, 0.25, 0.15, 0.1, 0.06, 0.04 on tokens 3, 0, 5, 1, 4, 2
HAND_PROBS = torch.tensor([0.25, 0.1, 0.04, 0.4, 0.06, 0.15])


@pytest.mark.parametrize(
    "law, kept",
    [
        (dict(), {0, 1, 2, 3, 4, 5}),
        (dict(top_k=2), {3, 0}),
        (dict(top_k=6), {0, 1, 2, 3, 4, 5}),
        (dict(top_k=100), {0, 1, 2, 3, 4, 5}),
        (dict(top_p=0.3), {3}),  # the most likely token always stays
        (dict(top_p=0.64), {3, 0}),  # mass before token 5 is 0.65 >= 0.64
        (dict(top_p=0.66), {3, 0, 5}),
        (dict(top_p=0.85), {3, 0, 5, 1}),
        (dict(top_p=0.85, temperature=0.5), {3, 0}),  # sharper: 0.615, 0.240, 0.087, ...
        (dict(top_k=4, top_p=0.7), {3, 0}),  # renormalised on the top 4: mass before token 5 is 0.722
        (dict(top_p=0.7), {3, 0, 5}),  # without top-k it is 0.65
    ],
)
def test_filter_keeps_exactly_the_right_tokens(law, kept):
    logits = HAND_PROBS.log()[None, :].repeat(2, 1)
    scores = filter_logits(logits, **law)
    for row in scores:
        assert set(torch.nonzero(torch.isfinite(row)).flatten().tolist()) == kept
    assert torch.equal(scores[0], scores[1])
    t = law.get("temperature", 1.0)
    finite = torch.isfinite(scores)
    torch.testing.assert_close(scores[finite], (logits / t)[finite])  # survivors keep their scores


def test_filter_keeps_all_ties_with_the_kth_and_the_draw_follows():
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0, 2.0, 0.0]])
    scores = filter_logits(logits, top_k=2)
    assert torch.isfinite(scores[0]).tolist() == [True, True, True, False, True, False]
    torch.manual_seed(0)
    drawn = set(draw_tokens(logits.repeat(2000, 1), top_k=2).tolist())
    assert drawn == {0, 1, 2, 4}


def test_filter_matches_transformers_warpers():
    # generate's own processors in generate's order: the kept sets and the scores must agree exactly.
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 300, generator=gen) * 3
    for t, k, p in [(0.8, 50, 0.95), (1.0, 0, 0.9), (1.3, 10, 1.0), (0.7, 0, 0.5), (1.0, 299, 0.99)]:
        expected = logits.clone()
        if t != 1.0:
            expected = TemperatureLogitsWarper(t)(None, expected)
        if k > 0:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        got = filter_logits(logits, temperature=t, top_k=k, top_p=p)
        assert torch.equal(torch.isfinite(got), torch.isfinite(expected)), (t, k, p)
        torch.testing.assert_close(got[torch.isfinite(got)], expected[torch.isfinite(expected)])


@pytest.mark.parametrize("law", [ANCHOR_LAW, dict(temperature=1.2), dict(top_p=0.7)])
def test_draw_frequencies_match_filtered_softmax(law):
    gen = torch.Generator().manual_seed(1)
    row = torch.randn(1, 300, generator=gen) * 2
    n = 20000
    torch.manual_seed(3)
    counts = torch.bincount(draw_tokens(row.repeat(n, 1), **law), minlength=300).double()
    probs = filter_logits(row, **law).softmax(-1)[0].double()
    assert counts[probs == 0].sum() == 0  # nothing outside the kept set is ever drawn
    stderr = (probs * (1 - probs) / n).sqrt()
    assert torch.all((counts / n - probs).abs() < 5 * stderr + 1e-3)


def test_fast_eos_cut_rows_never_empty_and_decoding(tok):
    eos = tok.eos_token_id
    eager = make_model(tok, seed=2)
    handle = eos_bias_hook(eager, tok, 3.0)  # make EOS likely so that many samples end early
    try:
        ids = sample_ids_fast(eager, tok, PROMPTS, num_samples=8, max_new_tokens=12, batch_size=7)
        texts = sample_fast(eager, tok, PROMPTS, num_samples=8, max_new_tokens=12, batch_size=7)
    finally:
        handle.remove()
    flat = [s for per in ids for s in per]
    ended = [s for s in flat if s[-1] == eos]
    assert ended and len(ended) < len(flat)
    assert all(1 <= len(s) <= 12 for s in flat)
    assert all(eos not in s[:-1] for s in flat)  # nothing after the first EOS
    assert all(len(s) == 12 for s in flat if s[-1] != eos)  # a row without EOS runs to max_new_tokens
    for per_ids, per_texts in zip(ids, texts, strict=True):
        for s, text in zip(per_ids, per_texts, strict=True):
            body = s[:-1] if s[-1] == eos else s
            assert text == tok.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def test_fast_stops_once_every_row_has_ended(tok):
    m = make_model(tok, seed=2)
    calls = []
    counter = m.register_forward_hook(lambda module, inputs, output: calls.append(1))
    handle = eos_bias_hook(m, tok, 100.0)  # EOS first, every row
    try:
        ids = sample_ids_fast(m, tok, PROMPTS, num_samples=2, max_new_tokens=12, batch_size=8)
        texts = sample_fast(m, tok, PROMPTS, num_samples=2, max_new_tokens=12, batch_size=8)
    finally:
        handle.remove()
        counter.remove()
    assert ids == [[[tok.eos_token_id]] * 2] * len(PROMPTS)
    assert texts == [["", ""]] * len(PROMPTS)
    assert len(calls) == 2  # one forward per call of the sampler: all rows ended at the first token


def test_fast_deterministic_and_caller_rng_untouched(model, tok):
    kw = dict(num_samples=2, max_new_tokens=8, batch_size=3, **ANCHOR_LAW)
    torch.manual_seed(123)
    a = sample_ids_fast(model, tok, PROMPTS, seed=7, **kw)
    after = torch.rand(3)
    torch.manual_seed(123)
    torch.testing.assert_close(after, torch.rand(3))  # not consumed, not reseeded
    assert sample_ids_fast(model, tok, PROMPTS, seed=7, **kw) == a
    assert sample_ids_fast(model, tok, PROMPTS, seed=8, **kw) != a
    texts = sample_fast(model, tok, PROMPTS, seed=7, **kw)
    assert texts == [[decode_response(tok, s) for s in per] for per in a]


def test_fast_restores_training_mode_and_pure_sampling_is_pure(tok):
    m = make_model(tok, init_std=0.02)
    m.train()
    ids = sample_ids_fast(m, tok, ["this movie"], num_samples=600, max_new_tokens=1, batch_size=600)
    assert m.training
    assert len({s[0] for s in ids[0]}) > 150  # top_k=0: no truncation (300 nearly uniform tokens)
    assert sample_fast(m, tok, [], num_samples=2, max_new_tokens=4) == []


def test_fast_bad_input_errors(model, tok):
    with pytest.raises(TypeError, match="one string"):
        sample_fast(model, tok, "this movie", num_samples=1, max_new_tokens=2)
    with pytest.raises(TypeError, match="strings"):
        sample_fast(model, tok, ["ok", None], num_samples=1, max_new_tokens=2)
    for bad, match in [
        (dict(top_k=-1), "top_k"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(temperature=0), "temperature"),
        (dict(num_samples=0), "num_samples"),
        (dict(max_new_tokens=0), "max_new_tokens"),
        (dict(batch_size=0), "batch_size"),
        (dict(max_new_tokens=100), "positions"),
    ]:
        kw = dict(num_samples=1, max_new_tokens=2) | bad
        with pytest.raises(ValueError, match=match):
            sample_ids_fast(model, tok, ["ok"], **kw)


def counting_draw(logits, temperature=1.0, top_k=0, top_p=1.0):
    """draw_tokens as it was written first: the tie check counts the scores at or above the k-th."""
    scores = logits.float() / temperature if temperature != 1.0 else logits.float()
    if 0 < top_k < logits.shape[-1]:
        best, ids = scores.topk(top_k, dim=-1)
        if int((scores >= best[:, -1:]).sum(dim=-1).max()) == top_k:
            if top_p < 1.0:
                probs = best.softmax(dim=-1)
                best = best.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
            return ids.gather(-1, torch.multinomial(best.softmax(dim=-1), num_samples=1)).squeeze(-1)
    return torch.multinomial(filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1), 1).squeeze(-1)


@pytest.mark.parametrize("law", [dict(top_k=2), dict(top_k=3, top_p=0.9, temperature=0.7)])
def test_draw_tokens_tie_check_takes_the_same_path_as_counting(law):
    # draw_tokens reads "no ties beyond the k-th" off topk(k + 1); the path decides which random numbers are
    # used, so equal draws under one seed mean the same path, for ties inside, at and beyond the k-th.
    cases = [
        [[3.0, 2.0, 2.0, 1.0, 2.0, 0.0]],  # ties with the k-th beyond it: full path
        [[3.0, 3.0, 1.0, 0.5, 0.0, 0.0]],  # ties inside the top k only: top-k path
        [[1.0, 1.0, 1.0, 1.0, 1.0, 1.0]],
        [[0.5, 2.0, -1.0, 3.0, 0.0, 2.5], [0.0, 0.0, 4.0, 1.0, 1.0, 1.0]],  # one tied row sends both
    ]
    for rows in cases:
        logits = torch.tensor(rows).repeat(300, 1)
        torch.manual_seed(5)
        expected = counting_draw(logits, **law)
        torch.manual_seed(5)
        assert torch.equal(draw_tokens(logits, **law), expected), rows


def test_gpt2_steps_match_the_models_own_cached_forward(tok):
    """The written-out GPT-2 step (what the anchor uses) gives the logits of the model's own forward."""
    spread = make_model(tok, seed=1, init_std=0.4)
    assert GPT2Steps.applies(spread)
    input_ids, attention_mask = _left_pad(encode_prompts(tok, PROMPTS), tok.eos_token_id, "cpu")
    new = 6
    mask = torch.cat([attention_mask, attention_mask.new_ones(len(PROMPTS), new)], dim=1)
    written, own = cached_steps(spread, mask), ModelSteps(spread, mask)
    assert isinstance(written, GPT2Steps)
    ids, positions = input_ids, (attention_mask.cumsum(-1) - 1).clamp_min(0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(new):
            got, expected = written(ids, positions), own(ids, positions)
            assert got.shape == (len(PROMPTS), len(tok))
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
            ids = torch.randint(len(tok), (len(PROMPTS), 1), generator=gen)
            positions = positions[:, -1:] + 1


def test_gpt2_steps_leave_hooked_or_unusual_models_to_their_own_forward(tok):
    m = make_model(tok, seed=1)
    # TI-DPO's saliency asks for hidden states: transformers 5 then hooks every block for good
    with torch.no_grad():
        m(input_ids=torch.tensor([[1, 2, 3]]), output_hidden_states=True)
    assert GPT2Steps.applies(m)  # those hooks only act while a forward collects outputs: they do not count
    handle = m.transformer.h[0].mlp.register_forward_hook(lambda module, inputs, output: output)
    assert not GPT2Steps.applies(m)  # the hook would be skipped
    handle.remove()
    handle = m.lm_head.register_forward_hook(lambda module, inputs, output: output)
    assert GPT2Steps.applies(m)  # the output layer is called as a module: its hooks run
    handle.remove()
    m.config.scale_attn_by_inverse_layer_idx = True
    assert not GPT2Steps.applies(m)
    assert isinstance(cached_steps(m, torch.ones(1, 4, dtype=torch.long)), ModelSteps)
