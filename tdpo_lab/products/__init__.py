"""The products a run is built on, each cached by :mod:`tdpo_lab.cache`: the tokenizer, the reward, the SFT
reference policy, the preference pairs (the kit's, or your own file: :mod:`.pairs_source`) and a method's
cached inputs (AttentionPO's judge weights). What the chapters use is importable from here."""

from tdpo_lab.products.export_pairs import export_pairs
from tdpo_lab.products.method_inputs import attnpo_weights, method_inputs, method_state
from tdpo_lab.products.pairs import (
    InvertedPairError,
    assert_no_inverted,
    build_pairs,
    pair_report,
    pairs_path,
    samples_table,
    split_pairs,
)
from tdpo_lab.products.pairs_source import TrainingInputs, evaluation_prompts, pairs_source
from tdpo_lab.products.reward import get_reward, load_reward
from tdpo_lab.products.sft import (
    SFT_FIELDS,
    heldout_loss,
    load_reference,
    pack_blocks,
    sft_dir,
    sft_history,
    sft_key,
    train_sft,
)
from tdpo_lab.products.tokenizer import get_tokenizer, load_tokenizer
from tdpo_lab.products.user_pairs import load_user_pairs

__all__ = [
    "SFT_FIELDS",
    "InvertedPairError",
    "TrainingInputs",
    "assert_no_inverted",
    "attnpo_weights",
    "build_pairs",
    "evaluation_prompts",
    "export_pairs",
    "get_reward",
    "get_tokenizer",
    "heldout_loss",
    "load_reference",
    "load_reward",
    "load_tokenizer",
    "load_user_pairs",
    "method_inputs",
    "method_state",
    "pack_blocks",
    "pair_report",
    "pairs_path",
    "pairs_source",
    "samples_table",
    "sft_dir",
    "sft_history",
    "sft_key",
    "split_pairs",
    "train_sft",
]
