"""Defaults for every pytest run (unit tests and nbval notebooks alike).

The kernels nbval starts inherit this environment, so the notebooks run their small configuration.
Values already set by the caller win.
"""

import os
from pathlib import Path

os.environ.setdefault("TDPO_LAB_FAST", "1")  # nbval cannot inject parameters: the fast switch is the env
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
_shared_imdb = Path(__file__).resolve().parent.parent / "shared" / "data" / "imdb"
if _shared_imdb.is_dir():
    os.environ.setdefault("TDPO_LAB_IMDB", str(_shared_imdb))
