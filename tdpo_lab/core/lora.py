"""LoRA for preference training through peft: one copy of the weights serves the policy and pi_ref.

With ``lora_r > 0`` (:mod:`tdpo_lab.config`) a preference run does not train every weight of the SFT model: peft's
``get_peft_model`` injects a rank-r adapter into the targeted linear layers (``lora_target_modules``; "" = peft's
default for the architecture: ``c_attn`` on GPT-2, ``q_proj,v_proj`` on Llama/SmolLM2) and freezes the rest.

- **The policy** is the SFT model itself with the adapter layers inside it (:attr:`LoraPolicy.policy`): a plain
  transformers model whose forward adds the adapter, so everything the kit reads off a model (``generate``,
  ``base_model``, ``get_output_embeddings``, ``config``) works unchanged. Its adapter ``B`` starts at zero, so at
  step 0 it computes exactly pi_ref.
- **pi_ref** is the same module with the adapter switched off (:class:`AdapterOff`): every call made through it
  runs under peft's ``disable_adapter()``, so the frozen base weights compute pi_ref exactly (the adapter's
  branch is skipped, not added as zero). No second model is loaded.
- **Only the adapter trains**: the optimiser gets the parameters that require grad, and a checkpoint holds only
  those (:class:`TrainableState`) plus the optimiser state.
- **The saved policy** is merged (:meth:`LoraPolicy.merged`): ``W + (alpha / r) B A`` folded into each weight,
  a plain transformers model that ``from_pretrained`` loads without peft.

peft is imported inside the functions that need it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from tdpo_lab.core.utils import CheckpointError

ALL_LINEAR = "all-linear"


def target_modules(value: str) -> str | list[str] | None:
    """``lora_target_modules`` as peft reads it: None (its default for the architecture), "all-linear", or names.

    >>> target_modules("c_attn, c_proj")
    ['c_attn', 'c_proj']
    """
    value = value.strip()
    if not value:
        return None
    if value == ALL_LINEAR:
        return ALL_LINEAR
    names = [name.strip() for name in value.split(",")]
    if not all(names):
        raise ValueError(
            f"lora_target_modules {value!r} has an empty name; write module names separated by commas"
        )
    return names


def lora_config(cfg, model):
    """The ``peft.LoraConfig`` of ``cfg`` (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``).

    GPT-2's layers are ``Conv1D`` (weights stored as ``[in, out]``): peft needs ``fan_in_fan_out=True`` there.
    """
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    if cfg.lora_r <= 0:
        raise ValueError(f"lora_r must be > 0 to build a LoRA adapter, got {cfg.lora_r}")
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules(cfg.lora_target_modules),
        fan_in_fan_out=any(isinstance(m, Conv1D) for m in model.modules()),
        bias="none",
        task_type="CAUSAL_LM",
    )


class AdapterOff:
    """A module of a peft model seen with the adapter switched off: pi_ref, sharing the policy's weights.

    Calling it, or any method reached through it (``forward``, ``generate``, ``get_output_embeddings`` ...), runs
    under ``peft_model.disable_adapter()``; submodules reached through it (``reference.base_model``) and modules a
    method returns are wrapped the same way; other attributes (``config``, ``training``) are the module's own.
    ``train()``, ``eval()`` and ``requires_grad_(False)`` do nothing: the module is the policy, whose mode and
    trainable adapter belong to the training loop (the base weights are frozen by peft already).
    """

    def __init__(self, peft_model, module: torch.nn.Module | None = None):
        self._peft = peft_model
        self._module = peft_model.get_base_model() if module is None else module

    def __call__(self, *args, **kwargs):
        return self._off(self._module)(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_peft", "_module"):  # copy/pickle probes, half-built objects
            raise AttributeError(name)
        value = getattr(self._module, name)
        if isinstance(value, torch.nn.Module):
            return AdapterOff(self._peft, value)
        if callable(value) and not isinstance(value, type):
            return self._off(value)
        return value

    def _off(self, fn):
        @functools.wraps(fn)  # keeps the signature: the kit inspects ``forward``'s arguments (kv_steps)
        def run(*args, **kwargs):
            with self._peft.disable_adapter():
                out = fn(*args, **kwargs)
            return AdapterOff(self._peft, out) if isinstance(out, torch.nn.Module) else out

        return run

    def train(self, mode: bool = True) -> AdapterOff:
        return self

    def eval(self) -> AdapterOff:
        return self

    def requires_grad_(self, requires_grad: bool = True) -> AdapterOff:
        if requires_grad:
            raise ValueError(
                "pi_ref (the adapter switched off) is frozen; train the policy's adapter instead"
            )
        return self

    def __repr__(self) -> str:
        return f"AdapterOff({type(self._module).__name__})"


@dataclasses.dataclass
class LoraPolicy:
    """The SFT model with a LoRA adapter: the policy, pi_ref (the adapter off) and the merged policy."""

    peft_model: object  # a peft.PeftModelForCausalLM

    @property
    def policy(self) -> torch.nn.Module:
        """The transformers model with the adapter layers inside (trains; its forward includes the adapter)."""
        return self.peft_model.get_base_model()

    @property
    def reference(self) -> AdapterOff:
        """pi_ref: the same model with the adapter switched off."""
        return AdapterOff(self.peft_model)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The adapter's parameters (in the model's order): what the optimiser gets."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    def merged(self) -> torch.nn.Module:
        """The policy with the adapter folded into its weights: a plain transformers model (no peft layers).

        Merges in place (no second copy in memory): afterwards the policy and pi_ref are the merged model. Call
        it once, when training is over.
        """
        return self.peft_model.merge_and_unload()


def attach_lora(model: torch.nn.Module, cfg, *, seed: int | None = None) -> LoraPolicy:
    """Inject ``cfg``'s LoRA adapter into ``model`` (in place, its base weights frozen): a :class:`LoraPolicy`.

    The adapter's ``A`` matrices are drawn from ``seed`` (default ``cfg.seed``) without touching the global RNG,
    so a run and its resumption build the same adapter; ``B`` is zero, so the policy starts equal to pi_ref.
    """
    from peft import get_peft_model

    config = lora_config(cfg, model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed if seed is None else seed)
        try:
            peft_model = get_peft_model(model, config)
        except (
            ValueError
        ) as exc:  # e.g. no module matches lora_target_modules / no default for the architecture
            raise ValueError(
                f"cannot attach LoRA (lora_target_modules={cfg.lora_target_modules!r}) to "
                f"{type(model).__name__}: {exc}; name its linear layers, e.g. lora_target_modules='all-linear'"
            ) from exc
    # the adapter lives where the base weights are (get_peft_model builds it on the CPU for some layers)
    device = next(model.parameters()).device
    peft_model.to(device)
    return LoraPolicy(peft_model)


class TrainableState:
    """A model's trainable parameters as a state dict: what a checkpoint of a LoRA run holds (the adapter).

    ``state_dict()`` holds the parameters that require grad; ``load_state_dict`` restores exactly those and
    refuses a checkpoint that holds anything else (e.g. one written by full fine-tuning).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: p.detach() for name, p in self.model.named_parameters() if p.requires_grad}

    def load_state_dict(self, state: dict) -> None:
        expected = set(self.names())
        if set(state) != expected:
            extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
            raise CheckpointError(
                f"the checkpoint's parameters do not match the ones this run trains (extra {extra[:3]}, missing "
                f"{missing[:3]}): it was written by another configuration; delete it to start again from step 0"
            )
        result = self.model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
