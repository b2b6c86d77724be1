"""How many units each layer gives up, beyond the budget's default split (budget.py):

sensitivity.py   ``--allocation sensitivity``: weight each layer by the measured cost of pruning it alone
search.py        ``--allocation search``: refine the per-layer counts by local search on calibration KL
split.py         ``--split search``: the share of KV groups vs MLP channels, chosen on calibration KL
"""

ALLOCATIONS = ("scores", "sensitivity", "search")
SPLITS = ("balanced", "search")
