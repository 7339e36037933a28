"""``python -m tdpo_lab.cli`` (what ``accelerate launch -m tdpo_lab.cli run ...`` starts in every process)."""

import sys

from tdpo_lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
