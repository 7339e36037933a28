"""tdpo_lab.core.models: the from-scratch GPT-2, save/load through from_pretrained, eager attention, dropout off."""

from __future__ import annotations

import math

import pytest
import torch

from tdpo_lab.config import load_config
from tdpo_lab.core.hub import HubUnavailableError
from tdpo_lab.core.models import ModelError, build_model, disable_dropout, load_model, small_gpt2_config


def _ids(vocab: int, shape=(2, 12), seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def test_small_gpt2_config_follows_cfg():
    cfg = load_config("tiny", fast=True)
    config = small_gpt2_config(cfg, 777, 5)
    assert (config.vocab_size, config.n_layer, config.n_head, config.n_embd, config.n_positions) == (
        777,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.n_positions,
    )
    # GPT-2's own dropout values in the config (a saved copy keeps them); build_model switches the modules off
    assert config.resid_pdrop == config.embd_pdrop == config.attn_pdrop == 0.1
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == 5


@pytest.mark.parametrize(
    ("vocab", "eos", "match"), [(1, 0, "vocab_size"), (10, 10, "eos_token_id"), (10, None, "eos")]
)
def test_small_gpt2_config_bad_input(vocab, eos, match):
    with pytest.raises(ModelError, match=match):
        small_gpt2_config(load_config("tiny", fast=True), vocab, eos)


def test_build_model_from_scratch(tiny_model, tiny_tokenizer):
    model = tiny_model(n_layer=2, n_embd=48, n_head=4)
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert model.config.vocab_size == len(tiny_tokenizer) == model.get_input_embeddings().num_embeddings
    assert (model.config.n_layer, model.config.n_embd, model.config.n_head) == (2, 48, 4)
    logits = model(_ids(len(tiny_tokenizer))).logits
    assert logits.shape == (2, 12, len(tiny_tokenizer)) and torch.isfinite(logits).all()


def test_build_model_is_seeded_and_leaves_the_global_rng_alone(tiny_model):
    # the weights come from data_seed (a training seed shares pi_ref with the other seeds of its data seed)
    a, b, c = tiny_model(data_seed=0, seed=0), tiny_model(data_seed=0, seed=5), tiny_model(data_seed=1)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model(data_seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_dropout_is_off_and_outputs_are_reproducible_in_train_mode(tiny_model, tiny_tokenizer):
    model = tiny_model().train()
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = _ids(len(tiny_tokenizer))
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_disable_dropout_on_a_model_built_with_dropout():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)).train()
    ids = _ids(50, (2, 8))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout 0.1 by default: noisy
    disable_dropout(model)
    # the modules are off, the config keeps the model's real values (what save_pretrained writes)
    assert model.config.resid_pdrop == model.config.embd_pdrop == model.config.attn_pdrop == 0.1
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_disable_dropout_also_zeroes_float_dropout_attributes():
    """Llama-style attention reads a float ``attention_dropout`` copied from the config, not a Dropout module."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=16,
        attention_dropout=0.5,
    )
    model = LlamaForCausalLM(config).train()
    model.config._attn_implementation = "eager"
    ids = _ids(50, (2, 8))
    assert not torch.equal(model(ids).logits, model(ids).logits)  # attention dropout 0.5: noisy
    disable_dropout(model)
    assert model.model.layers[0].self_attn.attention_dropout == 0.0 and model.config.attention_dropout == 0.5
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_save_and_load_back_identical_logits(tiny_model, tiny_tokenizer, tmp_path):
    model = tiny_model(n_layer=2).eval()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"))
    assert type(loaded) is type(model)
    ids = _ids(len(tiny_tokenizer))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    # The same folder through build_model (cfg.model = folder), as users take it.
    again = build_model(load_config("tiny", fast=True, model=str(tmp_path / "m")), tiny_tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=0)


def _naive_first_layer_attention(model, ids):
    """Attention probabilities of layer 0 from the weights: softmax(q k^T / sqrt(d) + causal mask)."""
    block = model.transformer.h[0]
    positions = torch.arange(ids.shape[1])
    h = block.ln_1(model.transformer.wte(ids) + model.transformer.wpe(positions))
    q, k, _ = block.attn.c_attn(h).split(model.config.n_embd, dim=-1)
    heads, d = model.config.n_head, model.config.n_embd // model.config.n_head
    q = q.view(*ids.shape, heads, d).transpose(1, 2)
    k = k.view(*ids.shape, heads, d).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    return scores.masked_fill(~causal, float("-inf")).softmax(-1)


def test_eager_attention_returns_the_attention_maps(tiny_model, tiny_tokenizer, tmp_path):
    tiny_model(n_layer=2).save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", attn_implementation="eager").eval()
    assert model.config._attn_implementation == "eager"
    ids = _ids(len(tiny_tokenizer), (2, 10))
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions
        reference = _naive_first_layer_attention(model, ids)
    assert len(attentions) == 2 and attentions[0].shape == (2, 2, 10, 10)
    torch.testing.assert_close(attentions[0], reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attentions[1].sum(-1), torch.ones(2, 2, 10))
    assert (attentions[1].triu(1) == 0).all()  # causal


def test_build_model_eager_from_scratch(tiny_model, tiny_tokenizer):
    model = tiny_model(attn_implementation="eager")
    attentions = model(_ids(len(tiny_tokenizer)), output_attentions=True).attentions
    assert len(attentions) == 1 and attentions[0].shape == (2, 2, 12, 12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16", "torch.float64"])
def test_load_model_dtype(tiny_model, tmp_path, dtype):
    tiny_model().save_pretrained(tmp_path / "m")
    model = load_model(tmp_path / "m", dtype=dtype)
    expected = torch.bfloat16 if "bfloat16" in str(dtype) else torch.float64
    assert {p.dtype for p in model.parameters()} == {expected}


def test_load_model_bad_dtype(tiny_model, tmp_path):
    tiny_model().save_pretrained(tmp_path / "m")
    with pytest.raises(ModelError, match="unknown dtype 'float17'"):
        load_model(tmp_path / "m", dtype="float17")


def test_load_model_unknown_name_offline_is_clear():
    with pytest.raises(HubUnavailableError, match=r"model 'no-such-org/no-such-model'.*HF_HUB_OFFLINE"):
        load_model("no-such-org/no-such-model")


def test_load_model_folder_without_model(tmp_path):
    with pytest.raises(ModelError, match="cannot load a causal LM"):
        load_model(tmp_path)


def test_build_model_vocabulary_too_small(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(
        GPT2Config(vocab_size=100, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    ).save_pretrained(tmp_path / "small")
    cfg = load_config("tiny", fast=True, model=str(tmp_path / "small"))
    with pytest.raises(ModelError, match=f"100 embedding rows but the tokenizer has {len(tiny_tokenizer)}"):
        build_model(cfg, tiny_tokenizer)


def test_build_model_needs_an_eos(tiny_tokenizer):
    import copy

    no_eos = copy.deepcopy(tiny_tokenizer)
    no_eos.eos_token = None
    with pytest.raises(ModelError, match="no EOS token"):
        build_model(load_config("tiny", fast=True), no_eos)


# --- progress bars: transformers' per-load bars off, the hub's download bars on unless CI says none ----------
def test_hub_download_bars_follow_the_environment():
    import huggingface_hub.constants as hub_constants
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    from tdpo_lab.core.models import configure_progress_bars

    if hub_constants.HF_HUB_DISABLE_PROGRESS_BARS is not None:
        pytest.skip("HF_HUB_DISABLE_PROGRESS_BARS was set when huggingface_hub was imported: it has priority")
    try:
        assert configure_progress_bars({}) is True
        assert not hub_utils.are_progress_bars_disabled()  # downloads show a bar
        assert not hf_logging.is_progress_bar_enabled()  # "Loading weights" bars stay off
        for var in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
            for value in ("1", "true"):
                assert configure_progress_bars({var: value}) is False
                assert hub_utils.are_progress_bars_disabled()
        assert configure_progress_bars({"TQDM_DISABLE": "0"}) is True
    finally:
        configure_progress_bars()  # back to what this process's environment says


def test_importing_models_leaves_hub_download_bars_on():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    code = "import tdpo_lab.core.models, huggingface_hub.utils as h; print(h.are_progress_bars_disabled())"
    shown = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == "False", shown.stderr
    env["TQDM_DISABLE"] = "1"
    quiet = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert quiet.stdout.strip() == "True", quiet.stderr
