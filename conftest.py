"""Defaults for every pytest run (unit tests and nbval notebooks alike): the one place that sets the environment.

The kernels nbval starts inherit this environment, so the notebooks run their small configuration.
Values already set by the caller win.
"""

import os
from pathlib import Path

os.environ.setdefault("TDPO_LAB_FAST", "1")  # nbval cannot inject parameters: the fast switch is the env
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ["HF_HUB_OFFLINE"] = "1"  # tests and notebooks never use the network
os.environ.setdefault("MPLBACKEND", "Agg")
_shared_imdb = Path(__file__).resolve().parent.parent / "shared" / "data" / "imdb"
if _shared_imdb.is_dir():
    os.environ.setdefault("TDPO_LAB_IMDB", str(_shared_imdb))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no fork warnings from the Rust tokenizers


def pytest_configure(config):
    # The notebooks run under nbval in lax mode (only cells tagged to check output are compared) in this
    # environment's kernel. Set here rather than in addopts, so the unit tests run where nbval is absent or
    # blocked (-p no:nbval).
    if config.pluginmanager.hasplugin("nbval") and not (config.option.nbval or config.option.nbval_lax):
        config.option.nbval_lax = True
        config.option.nbval_current_env = True
