"""Instruction data (Alpaca format: instruction / input / output) and its prompt template."""

from __future__ import annotations

import logging
from pathlib import Path

from gqaprune.data.sources import hub_dataset, local_data_file, read_records
from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

ALPACA_IDS = ("yahma/alpaca-cleaned", "alpaca-cleaned", "alpaca")
ALPACA_LOCAL = "alpaca-cleaned/alpaca_data_cleaned.jsonl.gz"
# Alpaca-cleaned records at file positions i with i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1 (2%, about 1,035
# records) are held out: calibration and fine-tuning never draw them, and the corpus ``alpaca-heldout``
# (gqaprune's validation text for choosing recipes and hyperparameters) is made of them. A fixed
# rule, not a seeded draw, so every seed and every command holds out the same records.
HELD_OUT_EVERY = 50

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_TEMPLATE_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 - the dataset's field name
    """The Alpaca template up to and including ``### Response:\\n``."""
    if input and input.strip():
        return ALPACA_TEMPLATE.format(instruction=instruction, input=input)
    return ALPACA_TEMPLATE_NO_INPUT.format(instruction=instruction)


def resolve_instruction_source(name_or_path: str) -> str:
    """Where instruction data will come from: a local path, or ``hub:<id>``."""
    p = Path(name_or_path).expanduser()
    if p.is_file():
        return str(p)
    if name_or_path.lower() in ALPACA_IDS:
        local = local_data_file(ALPACA_LOCAL)
        if local is not None:
            return str(local)
    if p.suffix in (".json", ".jsonl", ".gz") or name_or_path.startswith((".", "/", "~")):
        raise GQAPruneError(f"--data_path {name_or_path}: no such file")
    return "hub:" + name_or_path


def is_alpaca(name_or_path: str) -> bool:
    """Whether the source is Alpaca-cleaned (its Hub id, alias, or the local copy under GQAPRUNE_DATA_DIR)."""
    if name_or_path.lower() in ALPACA_IDS:
        return True
    p = Path(name_or_path).expanduser()
    if p.name != Path(ALPACA_LOCAL).name or not p.is_file():
        return False    # any other file: no need to look at GQAPRUNE_DATA_DIR (which may not even be set right)
    try:
        local = local_data_file(ALPACA_LOCAL)
    except GQAPruneError:
        return False
    return local is not None and p.resolve() == Path(local).resolve()


def load_instruction_records(name_or_path: str, part: str = "train") -> list[dict]:
    """Instruction records (instruction/input/output) from a Hub id or a local .json/.jsonl(.gz).

    ``part``: for Alpaca-cleaned, ``train`` = all but the held-out records (see HELD_OUT_EVERY),
    ``held_out`` = only those; any other source has no held-out part (``train`` = all of it).
    """
    records = _read_instruction_records(name_or_path)
    if not is_alpaca(name_or_path):
        if part != "train":
            raise GQAPruneError(f"{name_or_path}: only Alpaca-cleaned has a held-out part")
        return records
    k = HELD_OUT_EVERY
    return [r for i, r in enumerate(records) if (i % k == k - 1) == (part == "held_out")]


def _read_instruction_records(name_or_path: str) -> list[dict]:
    src = resolve_instruction_source(name_or_path)
    if src.startswith("hub:"):
        ds = hub_dataset(src[4:], None, "train", f"--data_path {name_or_path}")
        records = [dict(r) for r in ds]
    else:
        records = read_records(Path(src))
    if not records:
        raise GQAPruneError(f"--data_path {name_or_path}: the data is empty")
    if "instruction" not in records[0] or "output" not in records[0]:
        raise GQAPruneError(
            f"--data_path {name_or_path}: records need 'instruction' and 'output' fields (Alpaca format); "
            f"found {sorted(records[0])}"
        )
    log.info("loaded %d instruction records from %s", len(records), src)
    return records


CALIBRATION_FORMATS = ("prompt", "text")


def record_text(r: dict, fmt: str = "prompt") -> str:
    """One instruction record as calibration text: ``prompt`` = the Alpaca template + response (what
    fine-tuning and the chat use); ``text`` = instruction, input and output as plain lines, no template."""
    if fmt == "text":
        return "\n".join(t for t in (str(r.get(k) or "").strip() for k in ("instruction", "input", "output")) if t)
    return alpaca_prompt(r.get("instruction", ""), r.get("input", "")) + str(r.get("output", ""))


