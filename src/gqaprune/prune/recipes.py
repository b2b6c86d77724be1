"""``--recipe fast|balanced|best``: named sets of the existing prune flags (docs/architecture.md, "Recipes").

A recipe only fills the options the user left unset; an explicit flag always wins, and the
plan records both the recipe and what overrode it. The recipes hold settings only: what they
measure on SmolLM2 (quality and prune time) is in ``benchmarks/results/recipes_smollm2.json``,
written by ``benchmarks/recipes_smollm2.py``, and ``measured()`` reads it for the summary.

- ``fast``: the seed guide's one-shot prune (LLM-Pruner's Taylor scores, the same counts in every
  layer, no refit). Seconds of scoring; a stock ``LlamaConfig`` that every engine serves.
- ``balanced`` (the default): greedy-OBS scores, per-layer counts weighted by each layer's measured
  sensitivity and then a short allocation search (40 moves of KV groups or channels between layers,
  each kept only if the KL on 8 calibration samples goes down), the attention/MLP split searched on
  calibration KL, and the least-squares refit of the kept units' o_proj/down_proj columns. Minutes,
  not seconds, on a 2-core CPU for a 135M model. The short search was chosen over the sensitivity
  allocation alone on held-out validation text (``benchmarks/results/recipes_smollm2.md``).
- ``best``: ``balanced`` with the long allocation search (150 moves, KL on 16 samples). A multiple of
  ``balanced``'s cost.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

# option -> value when neither the recipe nor a flag sets it (the settings of ``fast``)
BASE = {"criterion": "taylor", "layout": "uniform", "allocation": "scores", "split": "balanced",
        "compensate": False, "num_samples": 64, "calibration_format": "prompt", "sensitivity_samples": 8,
        "search_samples": 8, "search_evaluations": 150, "search_moves": "same"}
_BALANCED = {"criterion": "obs", "layout": "per-layer", "allocation": "search", "split": "search",
             "compensate": True, "num_samples": 128, "sensitivity_samples": 4, "search_evaluations": 40}
RECIPES: dict[str, dict] = {
    "fast": dict(BASE),
    "balanced": {**BASE, **_BALANCED},
    "best": {**BASE, **_BALANCED, "search_evaluations": 150, "search_samples": 16},
}
DEFAULT = "balanced"
RESULTS = Path(__file__).resolve().parents[3] / "benchmarks" / "results" / "recipes_smollm2.json"


def check_name(name: str) -> None:
    if name not in RECIPES:
        raise GQAPruneError(f"--recipe {name}: unknown; choose one of {', '.join(RECIPES)} (the README's 'Recipes' "
                            f"table says what each sets), or leave it out for the default, {DEFAULT}")


def resolve(opts, name: str | None) -> dict:
    """Fill ``opts``' unset (None) recipe options from recipe ``name``; returns what the plan records:
    {name, settings (the values that ran), overridden {option: (recipe's, given)}, adjusted [notes]}."""
    from gqaprune.prune.plan import PER_LAYER

    recipe = RECIPES[name] if name else BASE
    overridden, adjusted = {}, []
    given = {k: getattr(opts, k) for k in recipe if getattr(opts, k) is not None}
    for k, v in recipe.items():
        if k in given:
            if given[k] != v and name:
                overridden[k] = (v, given[k])
            continue
        setattr(opts, k, v)
    # an explicit uniform layout cannot take a recipe's per-layer allocation: the layout wins
    if name and opts.layout not in PER_LAYER and "allocation" not in given and opts.allocation != "scores":
        adjusted.append(f"--allocation {opts.allocation} of recipe {name} needs a per-layer layout; with --layout "
                        f"{opts.layout} (given) it is --allocation scores")
        opts.allocation = "scores"
    for k, (was, now) in overridden.items():
        log.warning("recipe %s: --%s %s (given) overrides the recipe's %s", name, k.replace("_", "-"), now, was)
    for note in adjusted:
        log.warning("recipe %s: %s", name, note)
    return {"name": name, "settings": {k: getattr(opts, k) for k in recipe},
            "overridden": {k: {"recipe": a, "given": b} for k, (a, b) in overridden.items()}, "adjusted": adjusted}


def measured(name: str | None, ratio: float | None, path: Path | None = None) -> str | None:
    """One line of what recipe ``name`` measured on SmolLM2 at the nearest benchmarked ratio, read from the
    results file (default RESULTS); None when the file or the recipe's rows are not there (an installed wheel)."""
    try:
        rows = json.loads((path or RESULTS).read_text())["summary"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    mine = [r for r in rows if r.get("recipe") == name]
    if not mine or ratio is None:
        return None
    r = min(mine, key=lambda x: abs(x["ratio"] - ratio))
    long = f" and {r['x_dense_w2048']:.2f}x (window 2048)" if r.get("x_dense_w2048") else ""
    lo, hi = r.get("prune_s_range") or (r["prune_s"], r["prune_s"])
    cost = f"{lo:.0f} s" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} s (alone or beside other jobs)"
    return (f"recipe {name} measured on {r['model']} at -{r['ratio']:.0%}: {r['x_dense_w128']:.2f}x dense PPL "
            f"(window 128){long}, {r['protocol']}; "
            f"prune {cost} on {r['machine']} (benchmarks/results/recipes_smollm2.md)")
