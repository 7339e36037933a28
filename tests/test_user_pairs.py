"""Your own preference pairs (tdpo_lab.products.user_pairs): formats, every bad file's error, the held-out split,
the held-out preference accuracy, training on a file end to end, and exporting the kit's pairs."""

from __future__ import annotations

import json
import warnings

import datasets
import pandas as pd
import pytest
import torch
from cli_args import small_cli_args

from tdpo_lab.config import ConfigError, load_config, result_fields
from tdpo_lab.core.data import DataNotFoundError
from tdpo_lab.core.evaluate import pair_seqkl
from tdpo_lab.core.jsonl import read_jsonl
from tdpo_lab.products.pairs_source import fit_to_context, split_user_pairs
from tdpo_lab.products.user_pairs import UserPairsError, UserPairsWarning, load_user_pairs
from tdpo_lab.runs.rundir import RunConfigMismatch, run_name

GOOD = ("a lovely film, I smiled all the way through.", "a dull film, I nearly left after an hour.")


def good_rows(n: int = 20) -> list[dict]:
    """n pairs with distinct prompts; responses continue the prompt (TRL: prompt + chosen = the text)."""
    return [
        {"prompt": f"Review {i}: this was", "chosen": " " + GOOD[i % 2], "rejected": " " + GOOD[1 - i % 2]}
        for i in range(n)
    ]


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def load_quietly(source, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserPairsWarning)  # a good file drops nothing
        return load_user_pairs(source, **kwargs)


# --- formats ------------------------------------------------------------------------------------------------
def test_every_format_loads_the_same_pairs(tmp_path):
    rows = good_rows(6)
    df = pd.DataFrame(rows)
    sources = {"jsonl": write_jsonl(tmp_path / "p.jsonl", rows)}
    (tmp_path / "p.json").write_text(json.dumps(rows))  # a JSON array
    sources["json"] = str(tmp_path / "p.json")
    df.to_csv(tmp_path / "p.csv", index=False)
    sources["csv"] = str(tmp_path / "p.csv")
    df.to_parquet(tmp_path / "p.parquet")
    sources["parquet"] = str(tmp_path / "p.parquet")
    (tmp_path / "folder").mkdir()
    write_jsonl(tmp_path / "folder" / "train.jsonl", rows)
    sources["data folder"] = str(tmp_path / "folder")
    datasets.Dataset.from_pandas(df).save_to_disk(str(tmp_path / "saved"))
    sources["save_to_disk"] = str(tmp_path / "saved")

    loaded = {name: load_quietly(src) for name, src in sources.items()}
    expected = df.assign(pair_id=range(6), prompt_id=range(6))[
        ["pair_id", "prompt_id", "prompt", "chosen", "rejected"]
    ]
    for name, pairs in loaded.items():
        pd.testing.assert_frame_equal(pairs.table, expected, check_dtype=False, obj=name)
        assert pairs.rows_read == 6 and pairs.dropped == {}
    assert len({p.fingerprint for p in loaded.values()}) == 1
    # the text is kept exactly (a leading space continues the prompt)
    assert loaded["csv"].table["chosen"][0] == " " + GOOD[0]


def test_pairs_sharing_a_prompt_share_its_id(tmp_path):
    rows = good_rows(3) + [dict(good_rows(1)[0], chosen=" another fine reply.")]
    table = load_quietly(write_jsonl(tmp_path / "p.jsonl", rows)).table
    assert table["prompt_id"].tolist() == [0, 1, 2, 0]
    assert table["pair_id"].tolist() == [0, 1, 2, 3]


# --- bad files ------------------------------------------------------------------------------------------------
def test_missing_column_is_named(tmp_path):
    rows = [{k: v for k, v in r.items() if k != "rejected"} for r in good_rows(3)]
    with pytest.raises(UserPairsError, match=r"lack the column\(s\) \['rejected'\]"):
        load_user_pairs(write_jsonl(tmp_path / "p.jsonl", rows))


def test_implicit_prompt_format_gets_a_hint(tmp_path):
    rows = [
        {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in good_rows(3)
    ]
    with pytest.raises(UserPairsError, match="implicit-prompt format"):
        load_user_pairs(write_jsonl(tmp_path / "p.jsonl", rows))


def test_conversational_rows_are_refused_with_the_fix(tmp_path):
    rows = [
        {
            "prompt": [{"role": "user", "content": "How was the film?"}],
            "chosen": [{"role": "assistant", "content": "Lovely."}],
            "rejected": [{"role": "assistant", "content": "Dull."}],
        }
    ]
    with pytest.raises(UserPairsError, match="row 1: column 'prompt' .*conversational.*apply_chat_template"):
        load_user_pairs(write_jsonl(tmp_path / "p.jsonl", rows))


def test_a_number_where_text_belongs_is_named(tmp_path):
    rows = good_rows(3)
    rows[2]["chosen"] = 5
    with pytest.raises(UserPairsError, match=r"row 3: column 'chosen' holds a int \(5\), not text"):
        load_user_pairs(write_jsonl(tmp_path / "p.jsonl", rows))


@pytest.mark.parametrize(
    "column, value, reason",
    [
        ("prompt", "", "empty prompt"),
        ("chosen", "   ", "empty chosen"),  # blank counts as empty
        ("rejected", None, "empty rejected"),
    ],
)
def test_empty_text_is_dropped_and_counted_or_refused_when_strict(tmp_path, column, value, reason):
    rows = good_rows(5)
    rows[3][column] = value
    source = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserPairsWarning, match=rf"dropped 1 of 5 rows: 1 with {reason} \(rows \[4\]\)"):
        pairs = load_user_pairs(source)
    assert len(pairs.table) == 4 and pairs.dropped == {reason: 1}
    assert "Review 3: this was" not in set(pairs.table["prompt"])
    with pytest.raises(UserPairsError, match=rf"strict.*1 with {reason}"):
        load_user_pairs(source, strict=True)


def test_empty_cell_of_a_csv_is_empty_text(tmp_path):
    df = pd.DataFrame(good_rows(3))
    df.loc[1, "rejected"] = ""
    df.to_csv(tmp_path / "p.csv", index=False)
    with pytest.warns(UserPairsWarning, match=r"1 with empty rejected \(rows \[2\]\)"):
        assert len(load_user_pairs(tmp_path / "p.csv").table) == 2


def test_chosen_equal_to_rejected_is_dropped_and_counted(tmp_path):
    rows = good_rows(4)
    rows[0]["rejected"] = rows[0]["chosen"]
    source = write_jsonl(tmp_path / "p.jsonl", rows)
    with pytest.warns(UserPairsWarning, match=r"1 with chosen equal to rejected \(rows \[1\]\)"):
        assert load_user_pairs(source).table["prompt"].tolist() == [r["prompt"] for r in rows[1:]]
    with pytest.raises(UserPairsError, match="chosen equal to rejected"):
        load_user_pairs(source, strict=True)


def test_nothing_left_reports_every_reason_with_counts(tmp_path):
    rows = good_rows(3)
    rows[0]["chosen"] = ""
    rows[1]["chosen"] = ""
    rows[2]["rejected"] = rows[2]["chosen"]
    with pytest.raises(UserPairsError) as info:
        load_user_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    message = str(info.value)
    assert "no pair is left: of 3 rows, 3 cannot be trained on" in message
    assert "2 with empty chosen (rows [1, 2])" in message
    assert "1 with chosen equal to rejected (rows [3])" in message


def test_missing_file_says_what_to_give(tmp_path):
    with pytest.raises(
        DataNotFoundError, match=r"p\.jsonl.*does not exist.*'prompt', 'chosen' and 'rejected'"
    ):
        load_user_pairs(tmp_path / "p.jsonl")


def test_unknown_hub_name_offline_is_an_error_naming_it():
    with pytest.raises(UserPairsError, match="'nobody/no-such-pairs' is no file or folder here"):
        load_user_pairs("nobody/no-such-pairs")


def test_bad_json_line_is_named(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good_rows(1)[0]) + "\n{not json\n")
    with pytest.raises(UserPairsError, match="line 2, is not a JSON object"):
        load_user_pairs(path)


# --- configuration ----------------------------------------------------------------------------------------
def test_config_keys():
    cfg = load_config("tiny", fast=True, pairs="p.jsonl")
    assert (cfg.reward, cfg.heldout_share) == ("none", 0.1)  # no reward model unless you name one
    assert load_config("tiny", fast=True, pairs="p.jsonl", reward="classifier").reward == "classifier"
    with pytest.raises(ConfigError, match="'reward' is 'none' but 'pairs' is not set"):
        load_config("tiny", fast=True, reward="none")
    for share in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="heldout_share"):
            load_config("tiny", fast=True, pairs="p.jsonl", heldout_share=share)


def test_kit_run_names_do_not_change_and_yours_follow_the_file(tmp_path):
    kit = load_config("tiny", fast=True)
    # the two new keys are late fields: at their defaults they leave every existing run's name alone
    assert not {"pairs", "heldout_share"} & set(result_fields(kit.to_dict()))
    path = tmp_path / "p.jsonl"
    write_jsonl(path, good_rows(4))
    cfg = load_config("tiny", fast=True, pairs=str(path))
    first = run_name(cfg)
    assert run_name(cfg) == first != run_name(kit)
    write_jsonl(path, good_rows(5))  # the same path, other content: another run
    assert run_name(cfg) != first


def test_pairs_key_follows_content_split_and_reference(tmp_path, imdb_path):
    from tdpo_lab.cache.plan import Plan

    rows = good_rows(6)
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    pd.DataFrame(rows).to_csv(tmp_path / "p.csv", index=False)

    def key(**overrides):
        settings = {"pairs": path, "data_path": str(imdb_path), **overrides}
        return Plan(load_config("tiny", fast=True, **settings)).key("pairs")

    first = key()
    assert key(pairs=str(tmp_path / "p.csv")) == first  # the same pairs in another format
    assert key(heldout_share=0.2) != first
    assert key(n_positions=128) != first  # another pi_ref: AttentionPO's cached weights must not be reused
    assert key(pairs="", reward="classifier") != first  # the kit's pairs
    write_jsonl(tmp_path / "p.jsonl", good_rows(7))
    assert key() != first


# --- the held-out split -------------------------------------------------------------------------------------
def test_heldout_split_is_seeded_disjoint_and_whole_prompts(tmp_path):
    rows = good_rows(30) + [dict(r, chosen=" and more, " + r["chosen"]) for r in good_rows(30)]
    table = load_quietly(write_jsonl(tmp_path / "p.jsonl", rows)).table  # 30 prompts, 2 pairs each
    train, held = split_user_pairs(table, 0.1, seed=0)
    again_train, again_held = split_user_pairs(table, 0.1, seed=0)
    pd.testing.assert_frame_equal(held, again_held)
    pd.testing.assert_frame_equal(train, again_train)
    assert held["prompt_id"].nunique() == 3 and len(held) == 6  # 10% of the prompts, with all their pairs
    assert len(train) + len(held) == len(table)
    assert not set(train["prompt_id"]) & set(held["prompt_id"])
    assert set(train["pair_id"]) | set(held["pair_id"]) == set(table["pair_id"])
    other = split_user_pairs(table, 0.1, seed=1)[1]
    assert set(other["prompt_id"]) != set(held["prompt_id"])
    assert split_user_pairs(table, 0.5, seed=0)[1]["prompt_id"].nunique() == 15


def test_heldout_split_needs_two_prompts(tmp_path):
    rows = [dict(good_rows(1)[0], chosen=f" reply {i}.") for i in range(4)]
    table = load_quietly(write_jsonl(tmp_path / "p.jsonl", rows)).table
    with pytest.raises(UserPairsError, match="all 4 pairs share one prompt"):
        split_user_pairs(table, 0.1, seed=0)
    table2 = load_quietly(write_jsonl(tmp_path / "q.jsonl", good_rows(2))).table
    train, held = split_user_pairs(table2, 0.9, seed=0)  # at least one prompt stays to train on
    assert (len(train), len(held)) == (1, 1)


def test_long_prompts_keep_their_end(tiny_tokenizer, capsys):
    long_prompt = "I watched this film on a rainy evening with my whole family and " * 8 + "overall it was"
    table = pd.DataFrame([{"prompt": long_prompt, "chosen": " good.", "rejected": " bad."}, good_rows(1)[0]])
    fitted = fit_to_context(table, tiny_tokenizer, 32)
    ids = tiny_tokenizer(fitted["prompt"][0], add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) <= 16 and long_prompt.endswith(fitted["prompt"][0])
    assert fitted["prompt"][1] == table["prompt"][1]  # a short prompt is untouched
    assert "1 prompt(s) longer than 16 tokens keep their last 16" in capsys.readouterr().out


# --- held-out preference accuracy ---------------------------------------------------------------------------
def test_pair_accuracy_identities(tiny_model, tiny_tokenizer):
    reference = tiny_model()
    policy = tiny_model(data_seed=1)  # the weights come from data_seed
    pairs = pd.DataFrame(good_rows(6))
    at_ref = pair_seqkl(reference, reference, tiny_tokenizer, pairs, batch_size=4, beta=0.1)
    assert at_ref == {"kl_seq_chosen": 0.0, "kl_seq_rejected": 0.0, "pair_accuracy": 0.0, "pair_margin": 0.0}
    out = pair_seqkl(policy, reference, tiny_tokenizer, pairs, batch_size=4, beta=0.1)
    swapped = pairs.rename(columns={"chosen": "rejected", "rejected": "chosen"})
    back = pair_seqkl(policy, reference, tiny_tokenizer, swapped, batch_size=4, beta=0.1)
    # no ties between two different random models: swapping the sides flips every margin
    assert out["pair_accuracy"] + back["pair_accuracy"] == pytest.approx(1.0)
    assert back["pair_margin"] == pytest.approx(-out["pair_margin"])
    twice = pair_seqkl(policy, reference, tiny_tokenizer, pairs, batch_size=3, beta=0.2)
    assert twice["pair_margin"] == pytest.approx(2 * out["pair_margin"])  # beta scales the margin
    assert twice["pair_accuracy"] == out["pair_accuracy"]
    assert "pair_accuracy" not in pair_seqkl(policy, reference, tiny_tokenizer, pairs)  # the kit's runs
    # the margin is DPO's implicit reward: beta * (sum log-ratio chosen - sum log-ratio rejected), by hand
    from tdpo_lab.core.data import collate_preference_batch

    batch = collate_preference_batch(
        tiny_tokenizer, list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    )
    with torch.no_grad():
        lp = torch.log_softmax(policy(input_ids=batch["input_ids"]).logits.double(), -1)[:, :-1]
        lq = torch.log_softmax(reference(input_ids=batch["input_ids"]).logits.double(), -1)[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    tgt = labels.clamp(min=0)[..., None]
    ratio = ((lp.gather(-1, tgt) - lq.gather(-1, tgt)).squeeze(-1) * mask).sum(1)
    margin = 0.1 * (ratio[:6] - ratio[6:])
    assert out["pair_margin"] == pytest.approx(float(margin.mean()), abs=1e-5)
    assert out["pair_accuracy"] == pytest.approx(float((margin > 0).double().mean()))


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_args(imdb_path, tmp_path_factory):
    return small_cli_args(
        imdb_path, tmp_path_factory.mktemp("user-pairs-cache"), n_positions=64, eval_pairs=4
    )


@pytest.mark.slow
def test_run_trains_tdpo2_on_a_pairs_file(small_args, tmp_path, capsys):
    from tdpo_lab.cli import main

    source = write_jsonl(tmp_path / "my_pairs.jsonl", good_rows(20))
    out = tmp_path / "run"
    args = ["run", "--method", "tdpo2", "--out", str(out), *small_args, "--set", f"pairs={source}"]
    assert main(args) == 0
    evals = read_jsonl(out / "eval.jsonl")
    assert [e["step"] for e in evals] == [0, 1, 2]
    for e in evals:  # no reward model: the held-out pairs only, no samples
        assert {"pair_accuracy", "pair_margin", "kl_seq_chosen", "kl_seq_rejected"} <= set(e)
        assert "reward" not in e and "kl_seq" not in e
        assert 0.0 <= e["pair_accuracy"] <= 1.0
    assert evals[0]["pair_accuracy"] == 0.0 and evals[0]["kl_seq_chosen"] == 0.0  # step 0 is pi_ref
    assert evals[-1]["kl_seq_chosen"] > 0.0  # the policy moved
    record = json.loads((out / "pairs.json").read_text())
    assert (record["pairs"], record["rows_read"]) == (20, 20)
    assert json.loads((out / "config.json").read_text())["pairs"] == source
    # collect writes the table (with the held-out accuracy) and the SeqKL figure; no reward, no frontier
    assert main(["collect", str(out), "--out", str(tmp_path / "collected")]) == 0
    assert "held-out pair accuracy" in (tmp_path / "collected" / "results.md").read_text()
    assert (tmp_path / "collected" / "seqkl.png").exists()
    assert not (tmp_path / "collected" / "frontier.png").exists()

    # the same folder and path, other content: refused, never reported as the finished old run
    write_jsonl(tmp_path / "my_pairs.jsonl", good_rows(21))
    with pytest.raises(RunConfigMismatch, match="trained on other pairs"):
        main(args)

    # a bad file stops the command with its message and makes no run folder
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(SystemExit) as info:
        main(["run", "--out", str(tmp_path / "never"), *small_args, "--set", f"pairs={bad}"])
    assert info.value.code == 2 and "['rejected']" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()

    # with a reward model named, evaluation also samples from the held-out prompts and scores them
    source2 = write_jsonl(tmp_path / "my_pairs2.jsonl", good_rows(20))
    out2 = tmp_path / "run-reward"
    more = ["--set", f"pairs={source2}", "--set", "reward=classifier", "--set", "train_steps=1"]
    # (attnpo: its judge weights are cached per pair under the key of your pairs; the judge reads the prompt and
    # both responses in one text, so it needs more positions)
    more += ["--set", "n_positions=192"]
    assert main(["run", "--method", "attnpo", "--out", str(out2), *small_args, *more]) == 0
    last = read_jsonl(out2 / "eval.jsonl")[-1]
    assert {"reward", "kl_seq", "pair_accuracy", "kl_seq_rejected"} <= set(last)
    assert last["n_prompts"] == 2  # eval_prompts of the held-out prompts


@pytest.mark.slow
def test_export_pairs_round_trip(small_args, tmp_path, capsys):
    from tdpo_lab.cli import main
    from tdpo_lab.products.pairs import build_pairs

    out = tmp_path / "exported"
    assert main(["export-pairs", *small_args, "--out", str(out)]) == 0
    assert "have a prompt that ends inside a word" in capsys.readouterr().out
    dd = datasets.load_from_disk(str(out))
    assert set(dd) == {"train", "test"}  # DPOTrainer(train_dataset=dd["train"], eval_dataset=dd["test"])
    ds = datasets.concatenate_datasets([dd["train"], dd["test"]])
    assert ds.column_names[:3] == ["prompt", "chosen", "rejected"]  # TRL's names, first
    assert {"prompt_id", "pair_id", "reward_chosen", "reward_rejected", "heldout"} <= set(ds.column_names)
    assert not any(dd["train"]["heldout"]) and all(dd["test"]["heldout"])
    table = ds.to_pandas().sort_values("pair_id").reset_index(drop=True)
    assert len(table) > 0 and (table["reward_chosen"] > table["reward_rejected"]).all()
    assert 0 < table["heldout"].sum() < len(table)
    sets = dict(s.split("=", 1) for s in small_args[3::2])
    kit = build_pairs(
        load_config("tiny", fast=True, **{k: _value(v) for k, v in sets.items()}), progress=False
    )
    assert table["chosen"].tolist() == kit["chosen"].tolist()
    # the exported folder is itself a valid pairs source, its test split the held-out pairs
    again = load_quietly(str(out)).table.sort_values("heldout", kind="stable")
    order = table.sort_values("heldout", kind="stable")
    texts = ["prompt", "chosen", "rejected", "heldout"]
    assert again[texts].reset_index(drop=True).equals(order[texts].reset_index(drop=True))
    # pushing offline: a clear error, and the folder is written all the same
    with pytest.raises(SystemExit):
        main(["export-pairs", *small_args, "--out", str(tmp_path / "e2"), "--push-to-hub", "me/pairs"])
    assert "cannot push to the hub" in capsys.readouterr().err
    assert sum(datasets.load_from_disk(str(tmp_path / "e2")).num_rows.values()) == len(table)


def _value(text: str):
    import yaml

    return yaml.safe_load(text)


# --- train and test splits ------------------------------------------------------------------------------------
def test_pairs_dataset_puts_every_held_out_pair_in_test_and_reads_back_without_splitting_again(tmp_path):
    from tdpo_lab.products.export_pairs import pairs_dataset
    from tdpo_lab.products.pairs_source import held_out_split

    rows = pd.DataFrame(good_rows(10)).assign(pair_id=range(10), prompt_id=range(10))
    held = [i % 4 == 1 for i in range(10)]  # rows 1, 5, 9: not what a seeded share would pick
    dd = pairs_dataset(rows, held)
    assert set(dd) == {"train", "test"} and (dd["train"].num_rows, dd["test"].num_rows) == (7, 3)
    assert dd["test"]["pair_id"] == [1, 5, 9] and dd["train"].column_names[:3] == [
        "prompt",
        "chosen",
        "rejected",
    ]
    dd.save_to_disk(str(tmp_path / "dd"))
    pairs = load_quietly(str(tmp_path / "dd"))
    cfg = load_config("tiny", fast=True, heldout_share=0.5)
    train, heldout = held_out_split(pairs.table, cfg)
    assert heldout["prompt"].tolist() == [rows["prompt"][i] for i in (1, 5, 9)]
    assert set(train["prompt"]) == set(rows["prompt"]) - set(heldout["prompt"])
    # the split is part of the pairs: the same texts split otherwise have another fingerprint
    pairs_dataset(rows, [i % 4 == 2 for i in range(10)]).save_to_disk(str(tmp_path / "other"))
    assert load_quietly(str(tmp_path / "other")).fingerprint != pairs.fingerprint
    # a plain Dataset (no test split) keeps the seeded split and its old fingerprint
    datasets.Dataset.from_pandas(rows[["prompt", "chosen", "rejected"]]).save_to_disk(str(tmp_path / "plain"))
    plain = load_quietly(str(tmp_path / "plain"))
    assert "heldout" not in plain.table and len(held_out_split(plain.table, cfg)[1]) == 5
    assert plain.fingerprint == load_quietly(write_jsonl(tmp_path / "p.jsonl", good_rows(10))).fingerprint


def test_boundary_count_counts_prompts_that_end_inside_a_word():
    from tdpo_lab.products.export_pairs import boundary_count, ends_inside_word

    assert ends_inside_word("Go", "ue came") and ends_inside_word("year 19", "99")
    assert (
        not ends_inside_word("Go ", "ue")
        and not ends_inside_word("Go", " ue")
        and not ends_inside_word("Go.", "x")
    )
    assert not ends_inside_word("", "x") and not ends_inside_word("x", "")
    table = pd.DataFrame(
        {
            "prompt": ["The film", "The film", "The fil", "A"],
            "chosen": [" was", " is", "m was", " b"],
            "rejected": [" is", "s are", " is", "nd so"],
        }
    )
    naive = sum(
        any(p and r and p[-1].isalnum() and r[0].isalnum() for r in (c, j))
        for p, c, j in table.itertuples(index=False)
    )
    assert boundary_count(table) == naive == 3
