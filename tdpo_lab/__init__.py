"""tdpo-lab: token-level preference optimisation (DPO, TDPO1/2, TI-DPO, AttentionPO, IPO) on GPT-2 and IMDb.

The notebooks in ``notebooks/`` derive each method; this package does the work they call.
"""

from tdpo_lab.config import Config, ConfigError, load_config
from tdpo_lab.utils import seed_everything, select_device

__version__ = "0.2.0"
__all__ = [
    "Config",
    "ConfigError",
    "load_config",
    "seed_everything",
    "select_device",
    "__version__",
]
