"""tdpo_lab.core.export: a saved model reloads with the plain transformers classes, keeps its real config, declares
its context in the tokenizer, samples with its saved GenerationConfig, and carries a model card."""

from __future__ import annotations

import contextlib
import json
import logging
import warnings

import pytest
import torch

from tdpo_lab.config import load_config
from tdpo_lab.core.export import CARD, MethodInfo, model_card, save_model

SIZES = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64, "eval_max_new_tokens": 12}


@contextlib.contextmanager
def no_warnings():
    """Fail if the block emits a Python warning or a transformers log record at WARNING or above."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = records.append  # transformers' loggers do not propagate to the root: listen on its own
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        logger.removeHandler(handler)
    assert not caught, [str(w.message) for w in caught]
    assert not records, [r.getMessage() for r in records]


@pytest.fixture
def saved(tiny_model, tiny_tokenizer, tmp_path):
    cfg = load_config("tiny", fast=True, method="tdpo2", beta=0.2, alpha=0.3, **SIZES)
    model = tiny_model(**{k: v for k, v in SIZES.items() if k != "eval_max_new_tokens"})
    metrics = {"pi_ref (step 0)": {"reward": 0.5, "kl_seq": 0.0}, "policy (step 12)": {"reward": 0.75}}
    method = MethodInfo("tdpo2", "TDPO2", ("alpha",), "Zeng et al. 2024")
    folder = save_model(
        model, tiny_tokenizer, tmp_path / "policy", cfg, kind="policy", metrics=metrics, method=method
    )
    return cfg, model, folder


def test_saved_policy_reloads_with_auto_classes_without_warnings(saved, tiny_tokenizer):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, model, folder = saved
    with no_warnings():
        loaded = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        ids = tokenizer("This movie was a", return_tensors="pt")
        loaded(**ids)
    assert tokenizer.model_max_length == cfg.n_positions == loaded.config.n_positions
    assert tiny_tokenizer.model_max_length == 1024, "saving must not change the caller's tokenizer"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


def test_saved_config_keeps_the_real_dropout_and_training_runs_without_it(saved):
    from transformers import GPT2Config

    _, model, folder = saved
    config = json.loads((folder / "config.json").read_text())
    built = GPT2Config()  # small_gpt2_config keeps GPT-2's dropout values
    assert config["resid_pdrop"] == config["embd_pdrop"] == config["attn_pdrop"] == built.resid_pdrop
    assert built.resid_pdrop > 0
    assert model.config.attn_pdrop == built.attn_pdrop  # the in-memory config is not rewritten either
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_generate_uses_the_saved_generation_config(saved):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, _, folder = saved
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gen = model.generation_config
    assert (gen.do_sample, gen.temperature, gen.top_k, gen.top_p) == (True, 1.0, 0, 1.0)
    assert gen.max_new_tokens == cfg.eval_max_new_tokens
    assert gen.eos_token_id == gen.pad_token_id == tokenizer.eos_token_id
    inputs = tokenizer("This movie", return_tensors="pt")
    width = inputs["input_ids"].shape[1]

    def draw(seed, **explicit):
        torch.manual_seed(seed)
        return model.generate(**inputs, **explicit)[0, width:].tolist()

    with no_warnings():
        plain = draw(0)
    pure = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=cfg.eval_max_new_tokens)
    assert plain == draw(0, **pure, pad_token_id=tokenizer.eos_token_id)  # generate() = the kit's sampling
    assert 0 < len(plain) <= cfg.eval_max_new_tokens
    assert any(draw(seed) != plain for seed in (1, 2, 3)), "the saved config samples; it is not greedy"


def test_model_card_names_method_beta_knobs_data_and_metrics(saved):
    cfg, _, folder = saved
    card = (folder / CARD).read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    for text in (
        "TDPO2",
        "| beta | 0.2 |",
        "| alpha | 0.3 |",
        "IMDb",
        "| reward | 0.5 | 0.75 |",
        "generate(",
    ):
        assert text in card, text
    sft = model_card(cfg.to_dict(), kind="sft")
    assert "SFT reference policy" in sft and "beta" not in sft and f"{cfg.sft_steps} x" in sft
    with pytest.raises(ValueError, match="kind"):
        model_card(cfg.to_dict(), kind="dpo")
