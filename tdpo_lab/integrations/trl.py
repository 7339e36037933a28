"""The kit's preference methods inside TRL's ``DPOTrainer``: :class:`KitDPOTrainer`.

TRL (1.16 series, ``pip install "tdpo-lab[trl]"``) brings the machinery: accelerate (devices, several
processes, mixed precision), peft adapters, logging to its trackers, evaluation, checkpoints. The kit brings
the loss: any registered method of :mod:`tdpo_lab.methods`, computed as the kit computes it, from the exact
per-token statistics of the policy's and the reference's full logits (:func:`tdpo_lab.core.logprobs.token_stats`:
log-probs and the exact KL over the vocabulary at every response position) and
:func:`tdpo_lab.methods.preference_loss`. So one step of this trainer on the kit's tokens gives the kit's loss
and gradient (tests/test_trl_integration.py checks it for every supported method).

Supported: ``dpo``, ``tdpo1``, ``tdpo2``, ``ipo`` (the kit's, on summed log-ratios: not TRL's ``loss_type="ipo"``,
which averages them per token), ``attnpo`` (its judge weights carried as dataset columns ``chosen_weights`` and
``rejected_weights``, :func:`add_judge_weights`) and any method you register that needs no per-step hook. Not
supported: ``tidpo``. Its token weights are the saliency of the *current* policy, recomputed every step from the
gradient of the logits with respect to the input embeddings, and its triplet term samples an anchor response from
the policy each step; both are hooks of the kit's own loop (they read the kit's config, the prompt texts and
GPT-2-specific fast paths), with no counterpart in TRL's batch of token ids. Train TI-DPO with ``tdpo-lab run``.

Tokenisation: a dataset with the text columns ``prompt``, ``chosen``, ``rejected`` is tokenised as the kit does
it (:func:`kit_tokenize`: prompt and response each on its own, the EOS appended to the response), not as TRL
does (``prompt + response`` as one string, which differs where a prompt ends inside a word). A dataset that
already has ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` is used as it is.

``precompute_ref_log_probs`` is refused: TRL precomputes one sequence log-prob per response, while the kit's
losses read the reference per token (the SeqKL needs its whole next-token distribution at every position; the
weighted methods weight its per-token log-probs).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from tdpo_lab.core import IGNORE_INDEX, token_stats
from tdpo_lab.methods import Method, attention_weights, get_method, logit_metrics, preference_loss

__all__ = ["KitDPOTrainer", "WeightedPreferenceCollator", "add_judge_weights", "kit_tokenize"]

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
WEIGHT_COLUMNS = ("chosen_weights", "rejected_weights")


def _supported(method: Method) -> Method:
    if method.token_weights == "saliency" or method.extra_loss is not None:
        raise NotImplementedError(
            f"method {method.name!r} recomputes its token weights from the live policy or adds a sampled term "
            "every step (hooks of the kit's own loop), which KitDPOTrainer does not run; train it with "
            "`tdpo-lab run`. Supported here: methods with no weights or with judge weights carried as the "
            f"dataset columns {WEIGHT_COLUMNS}"
        )
    return method


def kit_tokenize(dataset, tokenizer, *, num_proc: int | None = None):
    """Add ``prompt_ids``, ``chosen_ids``, ``rejected_ids``, tokenised as the kit's batches are.

    ``dataset``: a ``datasets.Dataset`` with the text columns ``prompt``, ``chosen``, ``rejected`` (TRL's
    explicit-prompt format). Prompt and response are tokenised each on its own (``add_special_tokens=False``)
    and the EOS is appended to each response: the rows of :func:`tdpo_lab.core.data.collate_preference_batch`.
    Judge weight columns (``chosen_weights``/``rejected_weights``, one weight per response token as
    :func:`tdpo_lab.methods.attnpo_judge.attention_weights` gives them) get weight 1 for the EOS, as the kit
    trains it. Returns the mapped dataset.
    """
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ValueError(f"kit_tokenize needs the text columns prompt, chosen, rejected; missing {missing}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token: set tokenizer.eos_token (GPT-2: '<|endoftext|>')")

    def encode(example):
        def ids(text):
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        out = {"prompt_ids": ids(example["prompt"])}
        for side in ("chosen", "rejected"):
            response = ids(example[side])
            out[f"{side}_ids"] = [*response, eos]
            name = f"{side}_weights"
            if name in example:
                weights = [float(w) for w in example[name]]
                if len(weights) != len(response):
                    raise ValueError(
                        f"{name} has {len(weights)} entries but {side} has {len(response)} tokens: the weights "
                        "must come from the same text tokenised on its own (add_judge_weights)"
                    )
                out[name] = [*weights, 1.0]  # the appended EOS is trained with weight 1
        return out

    return dataset.map(encode, num_proc=num_proc, desc="Tokenising as tdpo-lab does")


def add_judge_weights(
    dataset, judge, tokenizer, *, layer: int = -1, fix_sink: bool = True, layer_mean: bool = False
):
    """AttentionPO's judge weights of every pair as the columns ``chosen_weights`` and ``rejected_weights``.

    ``judge``: the reference model, loaded with ``attn_implementation="eager"`` (it must return attentions);
    the knobs are the kit's ``attn_layer``, ``attn_fix_sink``, ``attn_layer_mean``. One weight per response
    token of the response tokenised on its own; run before :func:`kit_tokenize` (or hand the text dataset to
    :class:`KitDPOTrainer`, which tokenises it). Costs two judge forward passes per pair, once.
    """

    def weigh(example):
        w_c, w_r = attention_weights(
            judge,
            tokenizer,
            example["prompt"],
            example["chosen"],
            example["rejected"],
            layer=layer,
            fix_sink=fix_sink,
            layer_mean=layer_mean,
        )
        return {"chosen_weights": w_c.float().tolist(), "rejected_weights": w_r.float().tolist()}

    return dataset.map(weigh, desc="AttentionPO judge weights")


@dataclasses.dataclass
class WeightedPreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator plus ``token_weights`` ``[2B, T]``: each response token's weight at its own
    input position (0 on prompt and padding), truncated and padded like ``input_ids``."""

    def torch_call(self, examples):
        out = super().torch_call(examples)
        rows = []
        for side in ("chosen", "rejected"):
            for k, ex in enumerate(examples):
                if f"{side}_weights" not in ex:
                    raise ValueError(
                        f"example {k} has no {side}_weights: a weighted method reads its token weights from the "
                        f"dataset columns {WEIGHT_COLUMNS} (add_judge_weights computes AttentionPO's)"
                    )
                weights, ids = ex[f"{side}_weights"], ex[f"{side}_ids"]
                if len(weights) != len(ids):
                    raise ValueError(
                        f"example {k}: {side}_weights has {len(weights)} entries, {side}_ids {len(ids)}; one "
                        "weight per response token (kit_tokenize adds the EOS's)"
                    )
                row = [0.0] * len(ex["prompt_ids"]) + [float(w) for w in weights]
                if self.max_length is not None:
                    keep_end = self.truncation_mode == "keep_end"
                    row = row[-self.max_length :] if keep_end else row[: self.max_length]
                rows.append(row)
        grid = torch.zeros(out["input_ids"].shape, dtype=torch.float32)
        for i, row in enumerate(rows):
            grid[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        out["token_weights"] = grid
        return out


class KitDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` training a registered kit method (see the module docstring).

    Arguments are ``DPOTrainer``'s, plus ``method`` (a registered name or a :class:`~tdpo_lab.methods.Method`),
    ``alpha`` (the TDPO KL weight; default the method's own knob default) and ``chunk_size`` (rows per chunk of
    :func:`~tdpo_lab.core.logprobs.token_stats`; None = automatic). ``args.beta`` is the kit's ``beta``.
    TRL's own loss options (``loss_type``, ``ld_alpha``, ``use_weighting``, ``f_divergence_type``) do not apply
    and are refused when set. Logged per step, under TRL's names: ``rewards/*``, ``logps/*``, ``logits/*``,
    and the kit's ``kl_seq/*`` (and ``token_reward/*`` for the SeqKL methods).
    """

    def __init__(
        self, model=None, ref_model=None, args=None, *, method="tdpo2", alpha=None, chunk_size=None, **kw
    ):
        self.kit_method = _supported(method if isinstance(method, Method) else get_method(method))
        self.kit_alpha = float(method_alpha(self.kit_method) if alpha is None else alpha)
        self.kit_chunk_size = chunk_size
        if args is not None:
            _check_args(args, self.kit_method)
        for key in ("train_dataset", "eval_dataset"):  # text columns: the kit's tokenisation, not TRL's
            kw[key] = _tokenized(kw.get(key), kw.get("processing_class"))
        super().__init__(model, ref_model, args, **kw)
        if self.kit_method.weighted and isinstance(self.data_collator, DataCollatorForPreference):
            base = self.data_collator
            self.data_collator = WeightedPreferenceCollator(
                pad_token_id=base.pad_token_id,
                max_length=base.max_length,
                truncation_mode=base.truncation_mode,
                pad_to_multiple_of=base.pad_to_multiple_of,
            )

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if set(TOKEN_COLUMNS) <= set(dataset.column_names or ()):
            return (
                dataset  # the kit's tokens (kit_tokenize or your own): TRL's re-tokenisation would undo them
            )
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self.kit_method.weighted:  # keep the weight columns through remove_unused_columns
            self._signature_columns = [*self._signature_columns, *WEIGHT_COLUMNS]

    def _reference_logits(self, model_kwargs):
        with (
            torch.no_grad(),
            disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
        ):
            if is_peft_model(self.model) and self.ref_model is None:
                # the base model with the adapter switched off (or an adapter named "ref"), as TRL does
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=name):
                    return self.model(**model_kwargs).logits
            return self.ref_model(**model_kwargs).logits

    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        method = self.kit_method
        model_kwargs = {
            "input_ids": inputs["input_ids"],
            "attention_mask": inputs["attention_mask"],
            "use_cache": False,
        }
        # rows [:B] prompt + chosen, [B:] prompt + rejected: the kit's layout; -100 off the response
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)
        outputs = model(**model_kwargs)
        policy_logits = outputs.logits
        if method.needs_reference:
            ref_logits = self._reference_logits(model_kwargs)
        else:  # scored against itself (r_t = 0, SeqKL = 0), as the kit's loop does
            ref_logits = policy_logits.detach()
        stats = token_stats(policy_logits, ref_logits, labels, chunk_size=self.kit_chunk_size)
        weights = None
        if method.weighted:
            if "token_weights" not in inputs:
                raise ValueError(
                    f"method {method.name!r} needs token weights: give the dataset the columns {WEIGHT_COLUMNS} "
                    "(add_judge_weights) and keep TRL's preference collator"
                )
            weights = inputs["token_weights"][:, 1:].to(stats.logps.dtype) * stats.mask  # label grid
        out = preference_loss(method, stats, beta=self.beta, alpha=self.kit_alpha, weights=weights)
        metrics = {k: v for k, v in out.metrics.items() if k != "loss"}  # Trainer logs the loss itself
        metrics.update(logit_metrics(policy_logits, labels))
        values = torch.tensor(list(metrics.values()), dtype=torch.float32, device=self.accelerator.device)
        values = self.accelerator.gather_for_metrics(values[None]).mean(0).tolist()  # mean over processes
        for key, value in zip(metrics, values, strict=True):
            self._metrics[mode][key].append(value)
        return (out.loss, outputs) if return_outputs else out.loss


def method_alpha(method: Method) -> float:
    """The ``alpha`` a method reads by default (its knob), else 0.0 (the method ignores it)."""
    return float(method.knobs["alpha"].default) if "alpha" in method.knobs else 0.0


def _tokenized(dataset, tokenizer):
    if dataset is None or tokenizer is None:
        return dataset
    if isinstance(dataset, dict):
        return {name: _tokenized(ds, tokenizer) for name, ds in dataset.items()}
    names = set(dataset.column_names or ())
    if set(TOKEN_COLUMNS) <= names or not {"prompt", "chosen", "rejected"} <= names:
        return dataset  # already tokenised, or not the explicit-prompt text format: TRL's rules apply
    for message in ("prompt", "chosen", "rejected"):
        if not isinstance(dataset[0][message], str):
            raise ValueError(
                f"KitDPOTrainer reads text pairs; column {message!r} holds {type(dataset[0][message]).__name__} "
                "(TRL's conversational format): render each conversation to text first, or tokenise it yourself "
                f"into the columns {TOKEN_COLUMNS}"
            )
    return kit_tokenize(dataset, tokenizer)


def _check_args(args, method: Method) -> None:
    if getattr(args, "precompute_ref_log_probs", False):
        why = (
            "the SeqKL needs the reference's whole next-token distribution at every response position"
            if method.uses_seq_kl
            else "the kit's losses read the reference's per-token log-probs, TRL precomputes one sum per response"
        )
        raise ValueError(
            f"precompute_ref_log_probs=True cannot train the kit's {method.name!r}: {why}. Set "
            "precompute_ref_log_probs=False (the reference then runs beside the policy each step, or, with a "
            "peft adapter, the base model with the adapter switched off)"
        )
    loss_type = list(args.loss_type) if isinstance(args.loss_type, (list, tuple)) else [args.loss_type]
    if loss_type != ["sigmoid"]:
        raise ValueError(
            f"loss_type={args.loss_type!r} is TRL's loss; KitDPOTrainer trains the kit's method "
            f"{method.name!r} (choose it with method=...): leave loss_type at its default"
        )
    for name, neutral in (("ld_alpha", None), ("use_weighting", False), ("f_divergence_type", "reverse_kl")):
        value = getattr(args, name, neutral)
        if value != neutral and not (isinstance(value, float) and math.isnan(value)):
            raise ValueError(
                f"{name}={value!r} is an option of TRL's losses, not used by KitDPOTrainer: unset it"
            )
