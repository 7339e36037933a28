"""tdpo-lab: token-level preference optimisation (DPO, TDPO1/2, TI-DPO, AttentionPO, IPO) on GPT-2 and IMDb.

The notebooks in ``notebooks/`` derive each method; this package does the work they call. It is laid out by
layer, each importing only those below it (contracts in pyproject.toml, checked by ``lint-imports``)::

    cli            the tdpo-lab command
    integrations   the kit's methods in other libraries (TRL); nothing in the kit imports them
    course         chapters, publishing, exercises and their checkers, Colab, stand-ins
    runs           a training run, its folder, many runs at once, results, figures, the frontier study
    products       tokenizer, reward, SFT model, preference pairs, a method's cached inputs
    cache          the keyed store and the graph of stages
    methods        DPO, TDPO1/2, AttentionPO, TI-DPO, IPO: losses, knobs, token weights
    core           log-probs, data, models, sampling, evaluation, the training loop
    config         the validated configuration (imports nothing from the package)

Public names live in ``tdpo_lab`` (the configuration) and in each layer's package (``tdpo_lab.core``,
``tdpo_lab.methods``, ``tdpo_lab.products``, ``tdpo_lab.runs``, ...).
"""

from tdpo_lab.config import (
    FAST_OVERRIDES,
    Config,
    ConfigError,
    Knob,
    config_from_file,
    config_keys,
    default_seeds,
    load_config,
)
from tdpo_lab.core.utils import seed_everything, select_device
from tdpo_lab.methods import get_method, method_names  # importing the registry registers the built-in methods

__version__ = "0.2.0"
__all__ = [
    "FAST_OVERRIDES",
    "Config",
    "ConfigError",
    "Knob",
    "config_from_file",
    "config_keys",
    "default_seeds",
    "get_method",
    "load_config",
    "method_names",
    "seed_everything",
    "select_device",
    "__version__",
]
