"""Evaluation: KL identities, naive references for every per-position number, distinct-n, pair SeqKL."""

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from toy import make_model, make_tokenizer

from tdpo_lab.config import load_config
from tdpo_lab.core.evaluate import (
    aggregate_samples,
    distinct_n,
    evaluate_policy,
    evaluate_samples,
    pair_seqkl,
    response_stats,
)
from tdpo_lab.core.generation import encode_prompts, sample

PROMPTS = ["this movie", "a terrible film, boring", "I", "the plot made no sense but", ""]


class LetterE:
    """A fake reward: the fraction of letters 'e' in the text (the real one reads the whole text too)."""

    def score(self, texts):
        return np.array([t.count("e") / max(len(t), 1) for t in texts], dtype=np.float64)


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def reference(tok):
    torch.set_num_threads(1)
    return make_model(tok, seed=0)


@pytest.fixture(scope="module")
def policy(reference):
    # A policy that differs from the reference: the reference plus noise on every weight.
    moved = copy.deepcopy(reference)
    torch.manual_seed(99)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return moved


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", fast=False, eval_samples=3, eval_max_new_tokens=10, sample_batch_size=4)


def naive_row_stats(policy, reference, context, response):
    """Per-row statistics the slow way: one unpadded sequence, float64 probabilities, explicit sums."""
    ids = torch.tensor([context + response])
    with torch.no_grad():
        lp = torch.log_softmax(policy(ids).logits[0].double(), -1)
        lq = torch.log_softmax(reference(ids).logits[0].double(), -1)
    kl_pq = kl_qp = ent = ratio = 0.0
    for k, token in enumerate(response):
        t = len(context) + k - 1  # logits at t predict the token at t + 1
        p, q = lp[t].exp(), lq[t].exp()
        kl_pq += float((p * (lp[t] - lq[t])).sum())
        kl_qp += float((q * (lq[t] - lp[t])).sum())
        ent += float(-(p * lp[t]).sum())
        ratio += float(lp[t, token] - lq[t, token])
    return {"kl_policy_ref": kl_pq, "kl_ref_policy": kl_qp, "entropy": ent, "logratio": ratio}


def test_reference_against_itself_has_zero_kl_and_its_own_reward(reference, tok, cfg):
    reward = LetterE()
    for policy in (reference, copy.deepcopy(reference)):
        result = evaluate_policy(policy, reference, tok, reward, PROMPTS, cfg, seed=5)
        assert result["kl_seq"] == 0.0
        assert result["kl_logratio"] == 0.0
    texts = sample(
        reference,
        tok,
        PROMPTS,
        num_samples=cfg.eval_samples,
        max_new_tokens=cfg.eval_max_new_tokens,
        batch_size=cfg.sample_batch_size,
        seed=5,
    )
    own = reward.score([p + t for p, per in zip(PROMPTS, texts, strict=True) for t in per])
    assert result["reward"] == pytest.approx(float(own.mean()), abs=1e-12)
    assert result["n_samples"] == len(PROMPTS) * cfg.eval_samples
    assert all(isinstance(v, (float, int)) for v in result.values())


def test_different_policy_matches_naive_per_sample(policy, reference, tok, cfg):
    table = evaluate_samples(policy, reference, tok, LetterE(), PROMPTS, cfg, seed=1)
    assert len(table) == len(PROMPTS) * cfg.eval_samples
    assert (table["kl_seq"] >= 0).all() and table["kl_seq"].mean() > 0
    assert (table["n_tokens"] == table["token_ids"].map(len) + table["ended"]).all()
    contexts = encode_prompts(tok, PROMPTS)
    eos = tok.eos_token_id
    for row in table.itertuples():
        response = list(row.token_ids) + ([eos] if row.ended else [])
        naive = naive_row_stats(policy, reference, contexts[row.prompt_id], response)
        assert row.kl_seq == pytest.approx(naive["kl_policy_ref"], rel=1e-4, abs=1e-5)
        assert row.kl_logratio == pytest.approx(naive["logratio"], rel=1e-4, abs=1e-5)
        assert row.entropy_sum == pytest.approx(naive["entropy"], rel=1e-4, abs=1e-5)
    result = aggregate_samples(table)
    assert result["entropy"] == pytest.approx(table["entropy_sum"].sum() / table["n_tokens"].sum())
    per_prompt = table.groupby("prompt_id")["reward"].mean().to_numpy()
    assert result["reward_stderr"] == pytest.approx(per_prompt.std(ddof=1) / np.sqrt(len(per_prompt)))
    assert result["kl_seq"] > 0


def test_response_stats_chunking_and_padding(policy, reference, tok):
    # Two rows of different lengths (right padding) and a chunk size that splits rows: same as naive.
    contexts = encode_prompts(tok, ["this movie", "I"])
    responses = [
        tok("was great", add_special_tokens=False)["input_ids"] + [tok.eos_token_id],
        tok(" loved every scene of it", add_special_tokens=False)["input_ids"],
    ]
    width = max(len(c) + len(r) for c, r in zip(contexts, responses, strict=True))
    ids = torch.full((2, width), tok.eos_token_id)
    att = torch.zeros((2, width), dtype=torch.long)
    labels = torch.full((2, width), -100)
    for i, (c, r) in enumerate(zip(contexts, responses, strict=True)):
        ids[i, : len(c) + len(r)] = torch.tensor(c + r)
        att[i, : len(c) + len(r)] = 1
        labels[i, len(c) : len(c) + len(r)] = torch.tensor(r)
    for chunk in (1, 3, 1024):
        out = response_stats(policy, reference, ids, att, labels, chunk_size=chunk)
        for i in range(2):
            naive = naive_row_stats(policy, reference, contexts[i], responses[i])
            for key in ("kl_policy_ref", "logratio", "entropy"):
                value = naive[key]
                assert float(out[key][i]) == pytest.approx(value, rel=1e-4, abs=1e-5), (key, chunk)
        assert out["n_tokens"].tolist() == [len(r) for r in responses]


def test_pair_seqkl_is_ref_to_policy_direction(policy, reference, tok):
    pairs = pd.DataFrame(
        {
            "prompt": ["this movie", "a terrible"],
            "chosen": [" was great", " film"],
            "rejected": [" was boring and slow", " plot"],
        }
    )
    got = pair_seqkl(policy, reference, tok, pairs, batch_size=1)
    eos = tok.eos_token_id
    contexts = encode_prompts(tok, list(pairs["prompt"]))
    expect = {}
    for side in ("chosen", "rejected"):
        values = [
            naive_row_stats(policy, reference, c, tok(text, add_special_tokens=False)["input_ids"] + [eos])
            for c, text in zip(contexts, pairs[side], strict=True)
        ]
        expect[side] = np.mean([v["kl_ref_policy"] for v in values])
        forward = np.mean([v["kl_policy_ref"] for v in values])
        # the two directions differ here, so the test can tell them apart
        assert abs(forward - expect[side]) > 1e-3
    assert got["kl_seq_chosen"] == pytest.approx(expect["chosen"], rel=1e-4)
    assert got["kl_seq_rejected"] == pytest.approx(expect["rejected"], rel=1e-4)
    same = pair_seqkl(reference, reference, tok, pairs)
    assert same == {"kl_seq_chosen": 0.0, "kl_seq_rejected": 0.0}


def test_evaluate_policy_keys_modes_and_topk(policy, reference, tok, cfg):
    pairs = pd.DataFrame({"prompt": ["this movie"], "chosen": [" was great"], "rejected": [" was slow"]})
    policy.train()
    try:
        result = evaluate_policy(
            policy, reference, tok, LetterE(), PROMPTS[:2], cfg.replace(eval_topk=5), pairs=pairs
        )
        assert policy.training and not reference.training
    finally:
        policy.eval()
    for key in (
        "reward",
        "reward_stderr",
        "kl_seq",
        "kl_logratio",
        "entropy",
        "distinct2",
        "distinct4",
        "kl_seq_chosen",
        "kl_seq_rejected",
        "reward_topk",
        "n_samples",
    ):
        assert key in result
    assert "reward_topk" not in evaluate_policy(policy, reference, tok, LetterE(), PROMPTS[:2], cfg)


def test_distinct_n_hand_counted():
    seqs = [[1, 2, 1, 2], [2, 1], [7]]
    # bigrams: (1,2) (2,1) (1,2) | (2,1) | none -> 4 total, 2 unique
    assert distinct_n(seqs, 2) == pytest.approx(2 / 4)
    # unigrams: 1 2 1 2 2 1 7 -> 7 total, 3 unique
    assert distinct_n(seqs, 1) == pytest.approx(3 / 7)
    # 4-grams: only (1,2,1,2) -> 1/1; n-grams never cross sequences
    assert distinct_n(seqs, 4) == 1.0
    assert distinct_n([[1, 2, 3, 1, 2, 3]], 3) == pytest.approx(3 / 4)
    assert distinct_n([[1], [2]], 2) == 0.0


def test_entropy_and_distinct_against_naive_over_a_table(policy, reference, tok, cfg):
    table = evaluate_samples(policy, reference, tok, LetterE(), PROMPTS[:3], cfg, seed=2)
    result = aggregate_samples(table)
    grams = [tuple(s[i : i + 2]) for s in table["token_ids"] for i in range(len(s) - 1)]
    assert result["distinct2"] == pytest.approx(len(set(grams)) / len(grams))
    assert result["entropy"] == pytest.approx(
        np.sum(table["entropy"] * table["n_tokens"]) / table["n_tokens"].sum()
    )


def test_bad_input(policy, reference, tok, cfg):
    with pytest.raises(ValueError, match="rejected"):
        pair_seqkl(policy, reference, tok, pd.DataFrame({"prompt": ["a"], "chosen": ["b"]}))
    with pytest.raises(TypeError, match="score"):
        evaluate_policy(policy, reference, tok, object(), PROMPTS, cfg)
    with pytest.raises(ValueError, match="at least one prompt"):
        evaluate_policy(policy, reference, tok, LetterE(), [], cfg)
    with pytest.raises(ValueError, match="returned"):
        evaluate_policy(
            policy, reference, tok, type("R", (), {"score": lambda self, t: [0.0]})(), PROMPTS, cfg
        )
