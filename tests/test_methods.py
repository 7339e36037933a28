"""The method registry: what each method declares, IPO's finite minimiser, and a method from outside the kit.

The per-method loss values and gradients against naive float64 formulas are in test_losses.py (parametrised
over the registry, IPO included).
"""

from __future__ import annotations

import dataclasses

import matplotlib
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from test_pipeline import TINY

from tdpo_lab import methods
from tdpo_lab.config import Config, ConfigError, load_config, result_fields
from tdpo_lab.core.logprobs import TokenStats
from tdpo_lab.methods import Method, get_method, method_names, preference_loss, register, unregister

matplotlib.use("Agg")

BUILT_IN = ("dpo", "tdpo1", "tdpo2", "attnpo", "tidpo", "ipo")


def test_built_in_methods_are_registered_in_the_kits_order():
    assert method_names()[: len(BUILT_IN)] == BUILT_IN
    labels = [get_method(m).label for m in BUILT_IN]
    colors = [get_method(m).color for m in BUILT_IN]
    assert len(set(labels)) == len(labels) and len(set(colors)) == len(colors)
    assert get_method("ipo").label == "IPO"


def test_config_defaults_of_method_knobs_come_from_the_methods():
    cfg = load_config("tiny", fast=False)  # the fast switch shrinks anchor_max_new_tokens
    for name in BUILT_IN:
        for knob in get_method(name).knobs.values():
            assert getattr(cfg, knob.name) == knob.default and cfg.to_dict()[knob.name] == knob.default, (
                name,
                knob,
            )
    assert not {f.name for f in dataclasses.fields(Config)} & {
        k for m in BUILT_IN for k in get_method(m).knobs
    }
    # declared facts the loop relies on
    assert get_method("attnpo").token_weights == "judge" and get_method("tidpo").token_weights == "saliency"
    assert {m for m in BUILT_IN if get_method(m).uses_seq_kl} == {"tdpo1", "tdpo2", "tidpo"}


def test_knobs_split_only_the_runs_of_methods_that_read_them():
    dpo = load_config("tiny", method="dpo")
    assert result_fields(dpo.replace(alpha=0.9).to_dict()) == result_fields(dpo.to_dict())
    tdpo2 = load_config("tiny", method="tdpo2")
    assert result_fields(tdpo2.replace(alpha=0.9).to_dict()) != result_fields(tdpo2.to_dict())
    assert "gamma" in result_fields(load_config("tiny", method="tidpo").to_dict())
    assert "gamma" not in result_fields(load_config("tiny", method="ipo").to_dict())


def test_registering_bad_methods_is_a_clear_error():
    loss = methods.dpo.dpo_loss
    with pytest.raises(ValueError, match="registered already"):
        register(Method(name="dpo", label="x", color="k", loss=loss))
    with pytest.raises(ValueError, match="is a Config field already"):
        register(Method(name="odd", label="Odd", color="k", loss=loss, knobs={"lr": 1.0}))
    with pytest.raises(ValueError, match="a knob has one default"):
        register(Method(name="odd", label="Odd", color="k", loss=loss, knobs={"alpha": 0.9}))
    with pytest.raises(ValueError, match="token_weights"):
        Method(name="odd", label="Odd", color="k", loss=loss, token_weights="magic")
    with pytest.raises(ValueError, match="lower-case identifier"):
        Method(name="Odd Method", label="Odd", color="k", loss=loss)
    assert "odd" not in method_names()
    with pytest.raises(ConfigError, match="registered methods"):
        load_config("tiny", method="odd")


# --- IPO: a finite minimiser under noise-free labels ---------------------------------------------------------
def margin_stats(h: torch.Tensor) -> TokenStats:
    """One pair whose log-ratio margin is the scalar leaf ``h`` (one response token each, no KL)."""
    zero = torch.zeros((), dtype=h.dtype)
    logps = torch.stack([torch.stack([zero, h]), torch.stack([zero, zero])])
    mask = torch.tensor([[False, True], [False, True]])
    return TokenStats(logps, torch.zeros_like(logps), torch.zeros_like(logps), mask)


def descend(method: str, beta: float, steps: int, lr: float) -> list[float]:
    h = torch.zeros((), dtype=torch.float64, requires_grad=True)
    path = []
    for _ in range(steps):
        (grad,) = torch.autograd.grad(preference_loss(method, margin_stats(h), beta=beta).loss, h)
        with torch.no_grad():
            h -= lr * grad
        path.append(float(h.detach()))
    return path


def test_ipo_has_a_finite_minimiser_where_dpo_keeps_pushing():
    """Chapter 02's labels are deterministic (argmax of the reward): the chosen side always wins. DPO's
    loss -log sigma(beta h) then decreases for every h, so gradient descent pushes the margin forever; IPO's
    (h - 1/(2 beta))^2 stops at h* = 1/(2 beta)."""
    beta = 0.5
    ipo = descend("ipo", beta, steps=200, lr=0.1)
    assert ipo[-1] == pytest.approx(1.0 / (2.0 * beta), abs=1e-9)
    dpo = descend("dpo", beta, steps=2000, lr=50.0)
    assert all(b > a for a, b in zip(dpo, dpo[1:], strict=False))  # still rising at every step
    assert dpo[-1] > 10.0 / beta  # far past any fixed target
    # the DPO gradient is never zero: -beta sigma(-beta h) < 0
    h = torch.tensor(dpo[-1], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(preference_loss("dpo", margin_stats(h), beta=beta).loss, h)
    assert grad < 0
    torch.testing.assert_close(grad, -beta * torch.sigmoid(-beta * h.detach()))


# --- a method defined outside the package ---------------------------------------------------------------------
def hinge_loss(terms, *, beta, alpha=0.0):
    """SLiC-style hinge on the margin: max(0, 1 - beta h)."""
    return F.relu(1.0 - beta * terms.margin)


@pytest.fixture
def hinge():
    method = register(Method(name="hinge", label="Hinge", color="tab:olive", loss=hinge_loss))
    yield method
    unregister("hinge")


@pytest.mark.slow
def test_a_method_registered_outside_the_kit_trains_collects_and_plots(hinge, imdb_path, tmp_path):
    from tdpo_lab.cli import main
    from tdpo_lab.runs.results import collect, results_markdown
    from tdpo_lab.runs.train import train

    cfg = load_config(
        "tiny", fast=True, method="hinge", data_path=str(imdb_path), cache_dir=str(tmp_path / "cache"), **TINY
    )
    root = tmp_path / "runs"
    run = train(cfg, root / "hinge", progress=False)
    metrics = pd.read_json(run / "metrics.jsonl", lines=True)
    assert len(metrics) == cfg.train_steps and metrics["loss"].notna().all()
    table = collect(root)
    assert set(table["method"]) == {"hinge"}
    assert "| Hinge |" in results_markdown(table)
    assert main(["collect", str(root), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "frontier.png").stat().st_size > 0
    assert "Hinge" in (tmp_path / "report" / "results.md").read_text()


# --- TI-DPO's triplet term: the anchor scored on the drawn ids, against a naive recomputation --------------------
def _triplet_setup(margin: float = 1.0):
    from types import SimpleNamespace

    from toy import make_model, make_tokenizer

    from tdpo_lab.core.data import collate_preference_batch
    from tdpo_lab.core.logprobs import token_stats

    tok = make_tokenizer()
    # float64, so that the two computations' rounding does not hide a real difference
    reference = make_model(tok, seed=1, init_std=0.3).double().requires_grad_(False)
    policy = make_model(tok, seed=1, init_std=0.3).double()
    with torch.no_grad():  # a policy that has moved away from pi_ref, so the log-ratios are not all 0
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = ["this movie", "a terrible film, boring", "the plot made", "I loved"]
    chosen = ["was great and the acting", " and slow from the start", " no sense", " every scene of it"]
    rejected = [" was boring", " but the music was nice", " sense but the music", " it, see it twice"]
    batch = collate_preference_batch(tok, prompts, chosen, rejected)
    stats = token_stats(
        policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
        batch["labels"],
    )
    cfg = SimpleNamespace(
        anchor_max_new_tokens=8,
        anchor_temperature=1.0,
        anchor_top_k=20,
        anchor_top_p=0.95,
        triplet_margin=margin,
    )
    return tok, policy, reference, prompts, stats, cfg


def _naive_triplet(policy, reference, tok, prompts, stats, cfg, anchors):
    """The triplet term as first written, on given anchor ids: full logits of both models, token_stats (exact
    KL and all), left_align; anchors with no visible text are left out."""
    from tdpo_lab.core.data import collate_ids
    from tdpo_lab.core.generation import encode_prompts
    from tdpo_lab.core.logprobs import token_stats
    from tdpo_lab.methods.tidpo import left_align, triplet_loss

    eos = tok.eos_token_id
    bodies = [a[: a.index(eos)] if eos in a else a for a in anchors]
    keep = [i for i, b in enumerate(bodies) if tok.decode(b, skip_special_tokens=True).strip()]
    batch = collate_ids(
        encode_prompts(tok, [prompts[i] for i in keep]), [bodies[i] + [eos] for i in keep], eos
    )
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        ref_logits = reference(input_ids=ids, attention_mask=mask).logits
    anchor = token_stats(policy(input_ids=ids, attention_mask=mask).logits, ref_logits, batch["labels"])
    a, a_mask = left_align(anchor.logps - anchor.ref_logps, anchor.mask)
    half = stats.logps.shape[0] // 2
    ratio = stats.logps - stats.ref_logps
    w, w_mask = left_align(ratio[:half][keep], stats.mask[:half][keep])
    lo, lo_mask = left_align(ratio[half:][keep], stats.mask[half:][keep])
    return triplet_loss(a, a_mask, w, w_mask, lo, lo_mask, margin=cfg.triplet_margin), len(anchors) - len(
        keep
    )


def _loss_and_grads(fn, policy):
    loss, skipped = fn()
    grads = torch.autograd.grad(loss, [p for p in policy.parameters()], retain_graph=True, allow_unused=True)
    return loss.detach(), skipped, grads


def test_triplet_term_equals_a_naive_recomputation_on_the_same_anchors():
    from tdpo_lab.core.generation import sample_ids_fast
    from tdpo_lab.methods.tidpo import triplet_term

    tok, policy, reference, prompts, stats, cfg = _triplet_setup()
    seed = 17
    anchors = sample_ids_fast(
        policy, tok, prompts, num_samples=1, max_new_tokens=cfg.anchor_max_new_tokens,
        temperature=cfg.anchor_temperature, top_k=cfg.anchor_top_k, top_p=cfg.anchor_top_p,
        batch_size=len(prompts), seed=seed,
    )  # fmt: skip
    anchors = [group[0] for group in anchors]
    assert len({len(a) for a in anchors}) > 1 or tok.eos_token_id not in anchors[0]  # real draws
    got = _loss_and_grads(
        lambda: triplet_term(policy, reference, tok, prompts, stats, cfg, seed, "cpu"), policy
    )
    want = _loss_and_grads(
        lambda: _naive_triplet(policy, reference, tok, prompts, stats, cfg, anchors), policy
    )
    assert got[1] == want[1] == 0
    assert float(want[0]) > 0  # the hinge is active, so the anchor's log-ratios carry a gradient
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    assert any(g is not None and g.abs().max() > 0 for g in want[2])
    for g_got, g_want in zip(got[2], want[2], strict=True):
        if g_want is None:
            assert g_got is None or not g_got.any()
        else:
            torch.testing.assert_close(g_got, g_want, rtol=1e-8, atol=1e-10)


def test_triplet_term_skips_anchors_without_text_and_reports_them(monkeypatch):
    import tdpo_lab.methods.tidpo as tidpo
    from tdpo_lab.methods.tidpo import triplet_term

    tok, policy, reference, prompts, stats, cfg = _triplet_setup()
    eos = tok.eos_token_id
    space, word = tok(" ", add_special_tokens=False)["input_ids"], tok(" was great", add_special_tokens=False)
    anchors = [
        [eos],  # EOS first: empty
        space + [eos],  # only whitespace before the EOS: empty, as the decoded text was judged before
        word["input_ids"] + [eos],
        word["input_ids"] * 3,  # ran to the token limit without an EOS: scored with one appended
    ]
    monkeypatch.setattr(tidpo, "sample_ids_fast", lambda *args, **kwargs: [[a] for a in anchors])
    loss, skipped = triplet_term(policy, reference, tok, prompts, stats, cfg, 0, "cpu")
    want, want_skipped = _naive_triplet(policy, reference, tok, prompts, stats, cfg, anchors)
    assert skipped == want_skipped == 2
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)

    monkeypatch.setattr(tidpo, "sample_ids_fast", lambda *args, **kwargs: [[[eos]] for _ in prompts])
    loss, skipped = triplet_term(policy, reference, tok, prompts, stats, cfg, 0, "cpu")
    assert skipped == len(prompts) and float(loss) == 0.0

    # the training step reports them: triplet/skipped in the step's metrics
    from tdpo_lab.runs.train import compute_loss

    rows = pd.DataFrame(
        {"prompt": prompts, "chosen": ["was great"] * 4, "rejected": [" boring"] * 4, "pair_id": range(4)}
    )
    step_cfg = load_config("tiny", method="tidpo", gamma=0.1)
    _, metrics = compute_loss(policy, reference, tok, rows, step_cfg, step_seed=0)
    assert metrics["triplet/skipped"] == len(prompts) and metrics["triplet/loss"] == 0.0
