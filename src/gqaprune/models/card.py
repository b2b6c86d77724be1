"""Model cards: the README.md every checkpoint folder gets (prune, merge), ready for the Hub.

YAML front matter (``base_model``, ``library_name: transformers``, ``tags``, the base model's
license where it is known), then: parameters before and after, the per-layer shape, each
perplexity with its protocol, the exact command line, how to load the checkpoint (which layout
needs what) and how to export it to GGUF. Everything comes from the plan and the run's records;
nothing here is a measured figure of its own.
"""

from __future__ import annotations

import re
from pathlib import Path

from gqaprune.models.io import ALIASES, resolve_model_ref


def base_model_info(ref: str) -> tuple[str, str | None]:
    """(the base model's Hub id or reference, its license when known) for ``ref``."""
    alias = ALIASES.get(str(ref).lower())
    if alias is not None:
        return alias[3], alias[4]
    try:
        m = resolve_model_ref(ref)
    except Exception:  # noqa: BLE001 - a card is written for any reference; an unknown one just has no license
        return str(ref), None
    if m.kind == "hub":
        return m.path, None
    readme = Path(m.path) / "README.md" if Path(m.path).is_dir() else None
    if readme is not None and readme.is_file():
        front = re.match(r"^---\n(.*?)\n---", readme.read_text(errors="replace"), re.S)
        if front:
            lic = re.search(r"^license:\s*(\S+)", front.group(1), re.M)
            base = re.search(r"^base_model:\s*(\S+)", front.group(1), re.M)
            return (base.group(1) if base else str(ref)), (lic.group(1) if lic else None)
    return str(ref), None


def _ppl_rows(ppl: list[dict], label: str) -> list[str]:
    return [f"| {label} | {p['dataset']} | {p['split']} | {p['seq_len']} | {p['stride']} | {p['n_tokens']:,} | "
            f"{p['ppl']:.2f} |" for p in ppl]


def _load_lines(per_layer: bool, folder_name: str, serve: str) -> list[str]:
    if per_layer:
        return ["Per-layer layout (layers differ in KV groups or MLP width): the model code ships in this folder",
                "(`auto_map`), so it loads anywhere with `trust_remote_code=True`, or with gqaprune installed",
                "without it:", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{folder_name}", trust_remote_code=True)',
                f'tok = AutoTokenizer.from_pretrained("{folder_name}")', "```", "", f"Where it runs: {serve}."]
    return [f"Where it runs: {serve}.", "",
            "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{folder_name}")',
            f'tok = AutoTokenizer.from_pretrained("{folder_name}")', "```"]


def model_card(plan: dict, *, folder_name: str, command: str, per_layer: bool, ppl_before: list[dict] | None = None,
               ppl_after: list[dict] | None = None, title: str = "pruned", extra: list[str] | None = None) -> str:
    """The README.md text for a checkpoint made from ``plan`` (the plan as saved: a dict)."""
    from gqaprune.export.gguf import where_it_runs

    prov = plan.get("provenance", {})
    src = prov.get("source_model", "?")
    base, lic = base_model_info(src)
    tags = ["pruned", "gqaprune", "structured-pruning", "gqa", plan.get("layout", "uniform") + "-layout"]
    front = ["---", f"base_model: {base}", "library_name: transformers", "tags:"] + [f"- {t}" for t in tags]
    front += [f"license: {lic}"] if lic else []
    front += ["---", ""]
    shape = plan.get("source_shape", {})
    kv_src, mlp_src, r = shape.get("kv_per_layer", []), shape.get("mlp_per_layer", []), shape.get("q_per_kv", 1)
    layers = plan.get("layers") or [{"layer": i, "kv_groups": g, "mlp_channels": c}
                                    for i, (g, c) in enumerate(zip(plan.get("kv_groups", []),
                                                                   plan.get("mlp_channels", [])))]
    body = [f"# {folder_name}: {base} {title} with gqaprune", "",
            f"{base} with whole KV groups (a key/value head with its {r} query heads) and MLP channels removed, "
            f"chosen by `{prov.get('criterion', '?')}` importance on {prov.get('calibration') or 'no calibration data'}"
            f" (layout `{plan.get('layout')}`). Every layer keeps the model's {r}:1 query-to-KV ratio.", "",
            "| | parameters |", "|---|---:|", f"| before | {prov.get('params_before', 0):,} |",
            f"| after | {prov.get('params_after', 0):,} (-{prov.get('reduction', 0):.2%}) |", "",
            "## Shape per layer", "", "| layer | query heads | KV heads | MLP channels |", "|---:|---:|---:|---:|"]
    for x, kv0, m0 in zip(layers, kv_src, mlp_src):
        n_kv, n_m = len(x["kv_groups"]), _count(x["mlp_channels"])
        body.append(f"| {x['layer']} | {n_kv * r}/{kv0 * r} | {n_kv}/{kv0} | {n_m}/{m0} |")
    ppl_before, ppl_after = ppl_before or [], ppl_after or []
    if ppl_before or ppl_after:
        body += ["", "## Perplexity", "", "| model | dataset | split | window | stride | tokens scored | PPL |",
                 "|---|---|---|---:|---:|---:|---:|"] + _ppl_rows(ppl_before, "before") + _ppl_rows(ppl_after, "after")
    body += ["", "## How it was made", "", "```bash", command, "```", "", "The full plan (kept units, provenance) is "
             "`prune_plan.json`; re-apply it to the original model with `gqaprune prune --model ORIGINAL --plan "
             "prune_plan.json --output DIR`.", "", "## How to load it", ""] + _load_lines(
        per_layer, folder_name, where_it_runs(shape.get("family", "llama"), per_layer, plan.get("layout")))
    body += ["", "## Export to GGUF (llama.cpp, Ollama, LM Studio)", "", "```bash",
             f"gqaprune export {folder_name} --format gguf --output {folder_name}.gguf --outtype f16 "
             "[--quantize Q4_K_M]", "```"]
    return "\n".join(front + body + ([""] + extra if extra else [])) + "\n"


def _count(channels) -> int:
    """MLP channels in a plan's layer entry: a list of indices and [start, stop) ranges."""
    return sum(x[1] - x[0] if isinstance(x, list) else 1 for x in channels)
