"""Side by side: original vs pruned vs recovered, recovery %, and the seed guide's verdict.

Pure functions on numbers (no model, no I/O), so every tier can be tested with hand-made values.

**Recovery %** is the share of the quality lost by pruning that recovery won back:

* perplexity (lower is better): ``(ppl_pruned - ppl_recovered) / (ppl_pruned - ppl_original) * 100``
* accuracy (higher is better):  ``(acc_recovered - acc_pruned) / (acc_original - acc_pruned) * 100``

100 % means back to the original, above 100 % better than it, below 0 % worse than the pruned
model. When pruning lost nothing (pruned == original, or pruned better) it is undefined: None.

**Tiers** (the guide states them for Llama-3-8B, original PPL ``REFERENCE_PPL`` = 19.66):

* minimum: PPL < 30, PPL at least 20 % lower than the pruned model's, every task > 85 % of the original's accuracy;
* ideal:   PPL < 25, every task > 95 % of the original's accuracy;
* perfect: 19 <= PPL <= 22.

Tiers are cumulative (ideal needs minimum, perfect needs ideal). The task criterion is applied to
*every* task, not the mean: a recovery that trades one task away for another does not pass.
For any other model or protocol the PPL limits are scaled by ``factor = original PPL / 19.66``
(30 -> 1.53x, 25 -> 1.27x, 22 -> 1.12x, 19 -> 0.97x the original's PPL), and the result says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gqaprune.errors import GQAPruneError

REFERENCE_PPL = 19.66  # the guide's dense Llama-3-8B WikiText-2 PPL, the anchor of its tiers
MIN_PPL, IDEAL_PPL, PERFECT_PPL = 30.0, 25.0, (19.0, 22.0)  # at REFERENCE_PPL
MIN_PPL_GAIN = 0.20  # recovered PPL at least 20 % below the pruned model's
MIN_TASK_RATIO, IDEAL_TASK_RATIO = 0.85, 0.95  # recovered accuracy / original accuracy, per task
TIERS = ("minimum", "ideal", "perfect")
_EPS = 1e-9


@dataclass
class ModelScores:
    """One model's numbers: ``ppl`` {dataset: PPL}, ``acc`` {task: accuracy in [0, 1]}.

    ``protocol`` {dataset: text} says how each PPL was measured (split, window, stride, tokens);
    ``protocol_key`` {dataset: (split, window, stride, max_tokens)} lets ``compare`` refuse mismatched protocols.
    """

    label: str
    ppl: dict[str, float] = field(default_factory=dict)
    acc: dict[str, float] = field(default_factory=dict)
    protocol: dict[str, str] = field(default_factory=dict)
    protocol_key: dict[str, tuple] = field(default_factory=dict)

    @classmethod
    def from_results(cls, label: str, ppl=(), zeroshot=None, *, metric: str = "acc") -> "ModelScores":
        """Build from gqaprune results: ``ppl`` an iterable of PPLResult (or their ``to_dict()``),
        or ``{dataset: float}``; ``zeroshot`` a ZeroShotResult, its ``to_dict()``, or ``{task: acc}``."""
        scores = cls(label)
        items = ppl.items() if isinstance(ppl, Mapping) else ((None, r) for r in ppl)
        for name, r in items:
            if isinstance(r, (int, float)):
                scores.ppl[str(name)] = float(r)
                continue
            d = r.to_dict() if hasattr(r, "to_dict") else dict(r)
            ds = str(name or d["dataset"])
            scores.ppl[ds] = float(d["ppl"])
            scores.protocol_key[ds] = (d.get("split"), d.get("seq_len"), d.get("stride"), d.get("max_tokens"))
            n_tok = d.get("n_tokens")
            scores.protocol[ds] = (f"{d.get('dataset', ds)} {d.get('split')}, window {d.get('seq_len')}, "
                                   f"stride {d.get('stride')}" + (f", {n_tok:,} tokens" if n_tok else ""))
        if zeroshot is not None:
            if hasattr(zeroshot, "accuracies"):
                scores.acc = dict(zeroshot.accuracies(metric))
            elif isinstance(zeroshot, Mapping) and "tasks" in zeroshot:  # ZeroShotResult.to_dict()
                for task, r in zeroshot["tasks"].items():
                    value = r.get(metric) if r.get(metric) is not None else r["acc"]
                    scores.acc[task] = float(value)
            else:
                scores.acc = {str(k): float(v) for k, v in dict(zeroshot).items()}
        return scores


@dataclass
class TierCheck:
    """One tier: passed or not, and one reason per criterion (each says pass or fail)."""

    tier: str
    passed: bool
    reasons: list[str]


@dataclass
class Row:
    """One metric across the three models."""

    metric: str
    kind: str  # "ppl" (lower is better) or "acc" (higher is better)
    original: float
    pruned: float | None
    recovered: float
    recovery_pct: float | None
    vs_original: float  # recovered / original


@dataclass
class Comparison:
    """The side-by-side table, the tier checks and the verdict."""

    labels: tuple[str, str, str]
    ppl_dataset: str
    ppl_protocol: str
    rows: list[Row]
    tiers: list[TierCheck]
    verdict: str  # highest tier reached: "perfect" | "ideal" | "minimum" | "below minimum"
    scale_factor: float
    scaled: bool
    limits: dict[str, Any]
    task_rule: str = "every task"
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": {"original": self.labels[0], "pruned": self.labels[1], "recovered": self.labels[2]},
            "ppl_dataset": self.ppl_dataset,
            "ppl_protocol": self.ppl_protocol,
            "rows": [vars(r).copy() for r in self.rows],
            "tiers": [vars(t).copy() for t in self.tiers],
            "verdict": self.verdict,
            "scale_factor": self.scale_factor,
            "scaled": self.scaled,
            "reference_ppl": REFERENCE_PPL,
            "limits": dict(self.limits),
            "task_rule": self.task_rule,
            "notes": list(self.notes),
        }

    def markdown(self) -> str:
        o, p, r = self.labels
        lines = [
            f"| metric | original ({o}) | pruned ({p}) | recovered ({r}) | recovery % | recovered / original |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.rows:
            fmt = "{:.2f}" if row.kind == "ppl" else "{:.4f}"
            pruned = fmt.format(row.pruned) if row.pruned is not None else "-"
            rec = f"{row.recovery_pct:.1f}%" if row.recovery_pct is not None else "n/a"
            lines.append(f"| {row.metric} | {fmt.format(row.original)} | {pruned} | {fmt.format(row.recovered)} "
                         f"| {rec} | {row.vs_original * 100:.1f}% |")
        lines += ["", f"PPL protocol: {self.ppl_protocol}.", "",
                  f"**Verdict: {self.verdict}** (tiers are cumulative; task criterion applies to {self.task_rule})."]
        if self.scaled:
            lines.append(f"PPL tiers scaled by {self.scale_factor:.3f} = original PPL / {REFERENCE_PPL} "
                         f"(the guide states them for Llama-3-8B at {REFERENCE_PPL}): minimum < "
                         f"{self.limits['minimum_ppl']:.2f}, ideal < {self.limits['ideal_ppl']:.2f}, perfect "
                         f"{self.limits['perfect_ppl'][0]:.2f}-{self.limits['perfect_ppl'][1]:.2f}.")
        else:
            lines.append(f"PPL tiers unscaled: the original's PPL equals the guide's {REFERENCE_PPL}.")
        lines.append("")
        for t in self.tiers:
            lines.append(f"- **{t.tier}: {'PASS' if t.passed else 'FAIL'}**")
            lines += [f"  - {reason}" for reason in t.reasons]
        if self.notes:
            lines += [""] + [f"Note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def recovery_pct(original: float, pruned: float | None, recovered: float, *,
                 higher_is_better: bool) -> float | None:
    """Share (%) of the quality lost by pruning that recovery won back; None when nothing was lost."""
    if pruned is None:
        return None
    lost = (original - pruned) if higher_is_better else (pruned - original)
    if lost <= _EPS * max(1.0, abs(original)):  # nothing lost (or pruning helped): undefined
        return None
    won = (recovered - pruned) if higher_is_better else (pruned - recovered)
    return won / lost * 100.0


def tier_limits(original_ppl: float, reference_ppl: float = REFERENCE_PPL) -> dict[str, Any]:
    """The guide's PPL limits scaled to this model/protocol: ``factor = original_ppl / reference_ppl``."""
    if not (original_ppl > 0 and math.isfinite(original_ppl)):
        raise GQAPruneError(f"original model PPL {original_ppl}: must be a positive finite number to scale the tiers.")
    f = original_ppl / reference_ppl
    return {
        "factor": f,
        "minimum_ppl": MIN_PPL * f,
        "ideal_ppl": IDEAL_PPL * f,
        "perfect_ppl": (PERFECT_PPL[0] * f, PERFECT_PPL[1] * f),
    }


def _task_check(ratios: dict[str, float], threshold: float) -> tuple[bool, str]:
    if not ratios:
        return True, "no zero-shot tasks: the task criterion was not checked (PPL only)"
    failing = {t: v for t, v in ratios.items() if not v > threshold}
    worst_task = min(ratios, key=ratios.get)
    if failing:
        listed = ", ".join(f"{t} {v * 100:.1f}%" for t, v in sorted(failing.items(), key=lambda kv: kv[1]))
        return False, f"FAIL: tasks not above {threshold * 100:.0f}% of the original's accuracy: {listed}"
    return True, (f"pass: every task above {threshold * 100:.0f}% of the original's accuracy "
                  f"(lowest: {worst_task} {ratios[worst_task] * 100:.1f}%)")


def _ppl_dataset(original: ModelScores, pruned: ModelScores, recovered: ModelScores, ppl_dataset: str | None) -> str:
    """The dataset the verdict uses; refuses missing PPL and PPL measured under different protocols."""
    common_ppl = [d for d in original.ppl if d in recovered.ppl]
    if ppl_dataset is None:
        ppl_dataset = "wikitext2" if "wikitext2" in common_ppl else (common_ppl[0] if common_ppl else None)
    if ppl_dataset is None or ppl_dataset not in original.ppl or ppl_dataset not in recovered.ppl:
        raise GQAPruneError(
            f"compare: PPL on {ppl_dataset or 'a common dataset'} is needed for the original and the recovered "
            f"model (have: original {sorted(original.ppl)}, recovered {sorted(recovered.ppl)}). "
            "Evaluate all models with the same --ppl dataset."
        )
    for ds in common_ppl:
        keys = {m.label: m.protocol_key.get(ds) for m in (original, pruned, recovered) if m.protocol_key.get(ds)}
        if len(set(keys.values())) > 1:
            raise GQAPruneError(
                f"compare: {ds} PPL was measured with different protocols (split, window, stride, max tokens): "
                f"{keys}. Evaluate all three models with the same --seq-len, --stride and --max-tokens."
            )
    return ppl_dataset


def _rows(original: ModelScores, pruned: ModelScores, recovered: ModelScores, notes: list[str]):
    """(table rows, per-task recovered/original accuracy ratios, the tasks scored for both)."""
    rows: list[Row] = []
    for ds in (d for d in original.ppl if d in recovered.ppl):
        o, r, p = original.ppl[ds], recovered.ppl[ds], pruned.ppl.get(ds)
        rows.append(Row(f"{ds} PPL", "ppl", o, p, r, recovery_pct(o, p, r, higher_is_better=False), r / o))
    tasks = [t for t in original.acc if t in recovered.acc]
    missing = sorted((set(original.acc) | set(recovered.acc)) - set(tasks))
    if missing:
        notes.append(f"tasks not scored for both original and recovered, left out: {', '.join(missing)}")
    ratios: dict[str, float] = {}
    for t in tasks:
        o, r, p = original.acc[t], recovered.acc[t], pruned.acc.get(t)
        # An original at 0 accuracy has nothing to keep: count the task as fully retained.
        ratios[t] = r / o if o > 0 else 1.0
        rows.append(Row(f"{t} acc", "acc", o, p, r, recovery_pct(o, p, r, higher_is_better=True), ratios[t]))
    if tasks:
        mean = lambda d: sum(d[t] for t in tasks) / len(tasks)  # noqa: E731
        p_mean = mean(pruned.acc) if all(t in pruned.acc for t in tasks) else None
        o_mean, r_mean = mean(original.acc), mean(recovered.acc)
        rows.append(Row("mean acc", "acc", o_mean, p_mean, r_mean,
                        recovery_pct(o_mean, p_mean, r_mean, higher_is_better=True),
                        r_mean / o_mean if o_mean > 0 else 1.0))
    return rows, ratios, tasks


def _mark(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def _minimum(r_ppl, p_ppl, ratios, lim, at) -> TierCheck:
    passed = r_ppl < lim["minimum_ppl"]
    ok, reasons = passed, [f"{_mark(passed)}: PPL {r_ppl:.2f} {'<' if passed else '>='} "
                           f"{at(lim['minimum_ppl'], MIN_PPL)}"]
    if p_ppl is None:
        ok = False
        reasons.append("FAIL: the pruned model's PPL is missing, so the 20% improvement cannot be checked")
    else:
        need = (1 - MIN_PPL_GAIN) * p_ppl
        passed = r_ppl <= need
        ok &= passed
        reasons.append(f"{_mark(passed)}: PPL {(p_ppl - r_ppl) / p_ppl * 100:.1f}% lower than the pruned model's "
                       f"{p_ppl:.2f} (needs at least {MIN_PPL_GAIN * 100:.0f}%: <= {need:.2f})")
    passed, text = _task_check(ratios, MIN_TASK_RATIO)
    return TierCheck("minimum", ok and passed, reasons + [text])


def _ideal(r_ppl, ratios, lim, at, below: TierCheck) -> TierCheck:
    reasons = [] if below.passed else ["FAIL: needs the minimum tier"]
    passed = r_ppl < lim["ideal_ppl"]
    reasons.append(f"{_mark(passed)}: PPL {r_ppl:.2f} {'<' if passed else '>='} {at(lim['ideal_ppl'], IDEAL_PPL)}")
    tasks_ok, text = _task_check(ratios, IDEAL_TASK_RATIO)
    return TierCheck("ideal", below.passed and passed and tasks_ok, reasons + [text])


def _perfect(r_ppl, lim, at, below: TierCheck) -> TierCheck:
    reasons = [] if below.passed else ["FAIL: needs the ideal tier"]
    lo, hi = lim["perfect_ppl"]
    passed = lo <= r_ppl <= hi
    if passed:
        reasons.append(f"pass: PPL {r_ppl:.2f} within {at(lo, PERFECT_PPL[0])} .. {at(hi, PERFECT_PPL[1])}")
    elif r_ppl < lo:
        reasons.append(f"FAIL: PPL {r_ppl:.2f} below {at(lo, PERFECT_PPL[0])}: better than the original by more than "
                       "the guide expects; check that the evaluation text was not in the fine-tuning data")
    else:
        reasons.append(f"FAIL: PPL {r_ppl:.2f} above {at(hi, PERFECT_PPL[1])}")
    return TierCheck("perfect", below.passed and passed, reasons)


def compare(original: ModelScores, pruned: ModelScores, recovered: ModelScores, *,
            ppl_dataset: str | None = None) -> Comparison:
    """Compare the three models; the verdict uses ``ppl_dataset`` (default wikitext2, else the first)."""
    ppl_dataset = _ppl_dataset(original, pruned, recovered, ppl_dataset)
    notes: list[str] = []
    rows, ratios, tasks = _rows(original, pruned, recovered, notes)
    o_ppl, r_ppl, p_ppl = original.ppl[ppl_dataset], recovered.ppl[ppl_dataset], pruned.ppl.get(ppl_dataset)
    lim = tier_limits(o_ppl)
    f = lim["factor"]
    scaled = abs(o_ppl - REFERENCE_PPL) >= 0.005  # 19.66 as the guide rounds it
    at = (lambda v, ref: f"{v:.2f} (= {ref:g} x {f:.3f})") if scaled else (lambda v, ref: f"{ref:g}")
    tiers = [_minimum(r_ppl, p_ppl, ratios, lim, at)]
    tiers.append(_ideal(r_ppl, ratios, lim, at, tiers[-1]))
    tiers.append(_perfect(r_ppl, lim, at, tiers[-1]))
    reached = [t.tier for t in tiers if t.passed]
    if not tasks:
        notes.append("no zero-shot results: the verdict rests on PPL alone")
    protocol = (recovered.protocol.get(ppl_dataset) or original.protocol.get(ppl_dataset)
                or f"{ppl_dataset} (split, window and stride not given)")
    return Comparison(
        labels=(original.label, pruned.label, recovered.label), ppl_dataset=ppl_dataset, ppl_protocol=protocol,
        rows=rows, tiers=tiers, verdict=reached[-1] if reached else "below minimum", scale_factor=f, scaled=scaled,
        limits=lim, notes=notes,
    )
