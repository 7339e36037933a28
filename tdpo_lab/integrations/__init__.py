"""Optional bridges to other libraries; nothing in the kit imports them.

- :mod:`tdpo_lab.integrations.trl`: the kit's methods (TDPO1, TDPO2, IPO on summed margins, DPO, AttentionPO)
  inside TRL's ``DPOTrainer`` (``pip install "tdpo-lab[trl]"``).
"""
