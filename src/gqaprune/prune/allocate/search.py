"""``--allocation search``: refine the per-layer counts by local search on calibration KL.

The sensitivity allocation (sensitivity.py) sets each layer's share from one probe per
layer, through a fixed rule (square root, bounds). It measures layers one at a time;
pruning errors interact, and the rule is a guess. This step starts from that allocation
and improves it directly on the quantity it stands in for: the KL divergence of the
pruned model's next-token distribution from the unpruned model's, on calibration
samples (units removed by zeroing their consuming columns, as in the split search).

Moves keep the parameter count: one layer (the donor) gives up ``delta`` more MLP
channels (its lowest-scored kept ones) and another (the receiver) gets ``delta`` channels
back (its highest-scored removed ones); likewise one KV group for one KV group. With
``moves="mixed"`` a layer may also trade one KV group for MLP channels: it
loses a KV group and a layer (itself or another) gets back as many channels as that group
holds parameters (``group_params / channel_params``, rounded; the rounding is carried so
the total stays within half a channel, or half a ``round_mlp_to`` step, of where it
started), or the reverse. Same-kind moves are exact; ``moves="same"`` (the default)
allows only those: mixed moves lowered the calibration KL but not WikiText-2 perplexity
in benchmarks/results/ablation_smollm2.md, so they are opt-in.
The search is a (1+1) evolution strategy with first improvement, as in EvoPress
(Sieberling et al., 2024), which searches compression levels per layer the same way: a
random move is evaluated and kept if the KL goes down. ``delta`` starts at 1/16 of a
layer's channels and halves after ``PATIENCE`` rejected moves in a row, down to
``round_mlp_to`` (or 8 channels).

Cost: the unpruned model's log-probabilities and the current plan's hidden states
entering every layer are cached, so a move between layers a and b reruns only layers
min(a, b)..L-1 and the head: about half a forward pass per move on ``samples`` sequences.

Overfitting guard: when the calibration batch has more samples than the search uses,
the next ``samples`` ones (never searched on) are scored before and after; the search
result is kept only if their KL goes down too, and both numbers go into the plan's
provenance with every accepted move.
"""

from __future__ import annotations

import copy
import logging
import random
import time

import torch
from tqdm.auto import tqdm

from gqaprune.errors import GQAPruneError
from gqaprune.models.layout import ModelLayout
from gqaprune.prune.layerwise import DenseTarget, Head, ZeroInputs, capture_layer_inputs, check_layers, \
    remove_hooks, run_layers, zero_units
from gqaprune.prune.budget import Target
from gqaprune.prune.plan import PrunePlan, finish_plan

log = logging.getLogger(__name__)

PATIENCE = 12          # rejected moves in a row before the MLP step halves
MIN_DELTA = 8          # smallest MLP move (channels) without --round-mlp-to


class _State:
    """Removed units per layer, chosen by score within the layer (lowest first)."""

    def __init__(self, layout: ModelLayout, scores: list[dict], kv_rm: list[int], mlp_rm: list[int]):
        self.layout = layout
        self.kv_rm, self.mlp_rm = list(kv_rm), list(mlp_rm)
        self._order = [(torch.argsort(s["kv"].double(), stable=True), torch.argsort(s["mlp"].double(), stable=True))
                       for s in scores]

    def copy(self) -> _State:
        c = copy.copy(self)    # the score orders are shared, the counts are not
        c.kv_rm, c.mlp_rm = list(self.kv_rm), list(self.mlp_rm)
        return c

    def removed(self, i: int) -> tuple[list[int], torch.Tensor]:
        kv, mlp = self._order[i]
        return sorted(kv[: self.kv_rm[i]].tolist()), mlp[: self.mlp_rm[i]]

    def keep(self) -> tuple[list[list[int]], list[list[int]]]:
        kv_keep, mlp_keep = [], []
        for i, (kv, mlp) in enumerate(self._order):
            kv_keep.append(sorted(kv[self.kv_rm[i]:].tolist()))
            mlp_keep.append(sorted(mlp[self.mlp_rm[i]:].tolist()))
        return kv_keep, mlp_keep


class _Evaluator:
    """KL(dense || state) on fixed calibration samples, rerunning only the layers a move touches."""

    @torch.no_grad()
    def __init__(self, model, layout: ModelLayout, ids: torch.Tensor, batch_size: int):
        self.layout = layout
        self.layers = check_layers(model, "--allocation search")
        self.head = Head(model, "--allocation search")
        batches = capture_layer_inputs(model, ids, batch_size)
        self.kws = [kw for _, kw in batches]
        self.tokens = sum(h.shape[0] * (h.shape[1] - 1) for h, _ in batches)
        h0 = [h for h, _ in batches]
        self.ref = [DenseTarget(self.head, run_layers(self.layers, h, kw)) for h, kw in zip(h0, self.kws)]
        self.h0 = h0
        self.cache: list[list[torch.Tensor]] | None = None   # hidden states entering each layer, current state

    def _hooks(self, state: _State, start: int) -> list[ZeroInputs]:
        r, d = self.layout.q_per_kv, self.layout.head_dim
        return [hk for i in range(start, len(self.layers))
                for hk in zero_units(self.layers[i], *state.removed(i), r, d)]

    @torch.no_grad()
    def run(self, state: _State, start: int = 0, keep: bool = False) -> tuple[float, list | None]:
        """Mean KL per token; with ``keep`` also the hidden states entering layers start..L-1."""
        hooks = self._hooks(state, start)
        kept = [[] for _ in range(start, len(self.layers))] if keep else None
        total = 0.0
        try:
            for j, kw in enumerate(self.kws):
                h = self.h0[j] if start == 0 else self.cache[start][j]
                for li in range(start, len(self.layers)):
                    if keep:
                        kept[li - start].append(h)
                    h = self.layers[li](h, **kw[li])
                total += self.ref[j].kl(h)
        finally:
            remove_hooks(hooks)
        return total / self.tokens, kept

    def reset(self, state: _State) -> float:
        start_kl, kept = self.run(state, 0, keep=True)
        self.cache = kept
        return start_kl

    def commit(self, start: int, kept: list) -> None:
        self.cache[start:] = kept


MOVES = ("same", "mixed")


def _removed_params(state: _State) -> int:
    lay = state.layout
    return sum(state.kv_rm) * lay.group_params + sum(state.mlp_rm) * lay.channel_params


def _channels_for(excess: float, channel_params: int, step: int) -> int:
    """MLP channels (a multiple of ``step``) whose parameters come nearest ``excess``."""
    return step * round(excess / channel_params / step)


def _moves(state: _State, pruned: list[int], delta: int, floor_mlp: int, rng: random.Random,
           mixed: bool = False, target: int = 0, step: int = 1, kv: bool = True):
    """One random move: ('mlp'|'kv'|'kv>mlp'|'mlp>kv', layer a, layer b, amount) or None.

    'mlp' / 'kv': a gives up ``amount`` channels / one KV group, b gets as many back (exact).
    'kv>mlp': a loses one KV group, b gets ``amount`` channels back; 'mlp>kv': a gets one KV
    group back, b gives up ``amount`` channels (``mixed`` only; the total stays nearest ``target``).
    """
    lay = state.layout
    kinds = []
    mlp_donors = [i for i in pruned if lay.layers[i].n_mlp - state.mlp_rm[i] - delta >= floor_mlp]
    mlp_recv = [i for i in pruned if state.mlp_rm[i] >= delta]
    if mlp_donors and mlp_recv and (len(set(mlp_donors) | set(mlp_recv)) > 1):
        kinds.append("mlp")
    kv_donors = [i for i in pruned if lay.layers[i].n_kv - state.kv_rm[i] - 1 >= 1]
    kv_recv = [i for i in pruned if state.kv_rm[i] >= 1]
    if kv and kv_donors and kv_recv and (len(set(kv_donors) | set(kv_recv)) > 1):
        kinds.append("kv")   # (the per-layer-mlp layout keeps the KV groups equal: no KV moves)
    cross = {}
    if mixed:
        now, A, M = _removed_params(state), lay.group_params, lay.channel_params
        c = _channels_for(now + A - target, M, step)        # kv>mlp: channels given back for one group
        recv = [i for i in pruned if state.mlp_rm[i] >= c]
        if kv_donors and c > 0 and recv:
            cross["kv>mlp"] = (kv_donors, recv, c)
        c = _channels_for(target - (now - A), M, step)      # mlp>kv: channels taken for one group back
        donors = [i for i in pruned if lay.layers[i].n_mlp - state.mlp_rm[i] - c >= floor_mlp]
        if kv_recv and c > 0 and donors:
            cross["mlp>kv"] = (kv_recv, donors, c)
        kinds += list(cross)
    if not kinds:
        return None
    kind = rng.choice(kinds)
    if kind in cross:
        a_list, b_list, c = cross[kind]
        return kind, rng.choice(a_list), rng.choice(b_list), c
    donors, recv = (mlp_donors, mlp_recv) if kind == "mlp" else (kv_donors, kv_recv)
    for _ in range(50):
        a, b = rng.choice(donors), rng.choice(recv)
        if a != b:
            return kind, a, b, (delta if kind == "mlp" else 1)
    return None


def _apply(state: _State, move) -> _State:
    kind, a, b, n = move
    s = state.copy()
    if kind == "kv>mlp":
        s.kv_rm[a] += 1
        s.mlp_rm[b] -= n
    elif kind == "mlp>kv":
        s.kv_rm[a] -= 1
        s.mlp_rm[b] += n
    else:
        rm = s.mlp_rm if kind == "mlp" else s.kv_rm
        rm[a] += n
        rm[b] -= n
    return s


@torch.no_grad()
def search_allocation(model, layout: ModelLayout, scores: list[dict], plan: PrunePlan, ids: torch.Tensor,
                      target: Target, *, evaluations: int = 150, samples: int = 8, batch_size: int = 8,
                      round_mlp_to: int | None = None, seed: int = 0, moves: str = "same", screen: int = 0,
                      progress: bool = True) -> tuple[PrunePlan, dict]:
    """Refine ``plan``'s per-layer counts (same parameters) to lower calibration KL; returns (plan, report).

    Only the layers of ``target`` (the budget the plan was made for) change. ``screen`` (0 = off): score
    each move on the first ``screen`` search samples first, and on the rest only if it lowers the KL
    there; a move that passes gets exactly the KL the unscreened search computes (both parts, weighted by
    tokens), so the screen can only turn down moves early, at ``screen / samples`` of the cost.
    """
    if moves not in MOVES:
        raise GQAPruneError(f"--search-moves {moves}: choose one of {', '.join(MOVES)}")
    kv_moves = plan.layout != "per-layer-mlp"
    if moves == "mixed" and not kv_moves:
        raise GQAPruneError("--search-moves mixed trades KV groups, which --layout per-layer-mlp keeps equal in every "
                            "layer; use --search-moves same")
    t0 = time.perf_counter()
    pruned = list(target.pruned)
    kv_rm = [s.n_kv - len(k) for s, k in zip(layout.layers, plan.kv_groups)]
    mlp_rm = [s.n_mlp - len(c) for s, c in zip(layout.layers, plan.mlp_channels)]
    state = _State(layout, scores, kv_rm, mlp_rm)
    removed_target = _removed_params(state)
    search_ids = ids[:samples]
    check_ids = ids[samples: 2 * samples]
    was = model.training
    model.eval()
    rng = random.Random(seed)
    step = max(round_mlp_to or 1, 1)
    n_mlp = max(s.n_mlp for s in layout.layers)
    delta = max(step, step * round(n_mlp / 16 / step))
    floor_delta = MIN_DELTA if step == 1 else step
    floor_mlp = max(target.min_mlp, 1)
    accepted, tried, fails = [], 0, 0
    try:
        screen = min(screen, search_ids.shape[0] - 1)
        first = _Evaluator(model, layout, search_ids[:screen], batch_size) if screen > 0 else None
        ev = _Evaluator(model, layout, search_ids[screen:] if first else search_ids, batch_size)
        check = _Evaluator(model, layout, check_ids, batch_size) if check_ids.shape[0] else None
        both = (lambda a, b: (a * first.tokens + b * ev.tokens) / (first.tokens + ev.tokens)) if first else None
        first_kl = first.reset(state) if first else None
        start_kl = ev.reset(state) if not first else both(first_kl, ev.reset(state))
        check_start = check.run(state)[0] if check else None
        cur_kl, screened_out = start_kl, 0
        bar = tqdm(total=evaluations, desc="allocation search", disable=not progress, leave=False)
        while tried < evaluations:
            move = _moves(state, pruned, delta, floor_mlp, rng, mixed=moves == "mixed", target=removed_target,
                           step=step, kv=kv_moves)
            if move is None:
                break
            cand = _apply(state, move)
            lo = min(move[1], move[2])
            tried += 1
            bar.update(1)
            if first:
                f_kl, f_kept = first.run(cand, lo, keep=True)
                passed = f_kl < first_kl
                screened_out += not passed
            if not first or passed:
                cand_kl, kept = ev.run(cand, lo, keep=True)
                cand_kl = both(f_kl, cand_kl) if first else cand_kl
            if (not first or passed) and cand_kl < cur_kl:
                state, cur_kl = cand, cand_kl
                ev.commit(lo, kept)
                if first:
                    first.commit(lo, f_kept)
                    first_kl = f_kl
                accepted.append({"eval": tried, "kind": move[0], "donor": move[1], "receiver": move[2],
                                 "units": move[3], "kl": cand_kl})
                fails = 0
            else:
                fails += 1
                if fails >= PATIENCE and delta > floor_delta:
                    delta = max(floor_delta, step * max(1, round(delta / 2 / step)))
                    fails = 0
            bar.set_postfix(kl=f"{cur_kl:.4f}", delta=delta)
        bar.close()
        check_end = check.run(state)[0] if check else None
    finally:
        model.train(was)
    kept_result = check is None or check_end <= check_start
    kv_traded = sum(m["kind"] == "kv>mlp" for m in accepted) - sum(m["kind"] == "mlp>kv" for m in accepted)
    rep = {"moves": moves, "kv_traded": kv_traded, "evaluations": tried, "accepted": accepted,
           "screen_samples": screen, "screened_out": screened_out,
           "samples": int(search_ids.shape[0]), "tokens": ev.tokens + (first.tokens if first else 0), "kl_start": start_kl, "kl_end": cur_kl, "check_samples": int(check_ids.shape[0]),
           "check_kl_start": check_start, "check_kl_end": check_end, "used": kept_result,
           "seconds": round(time.perf_counter() - t0, 2)}
    if not kept_result:
        rep["why_not"] = "the KL on the check samples (not searched on) went up: kept the starting allocation"
        log.info("allocation search rejected: check KL %.4f -> %.4f", check_start, check_end)
        return plan, rep
    kv_keep, mlp_keep = state.keep()
    new = finish_plan(layout, kv_keep, mlp_keep, target, layout_kind=plan.layout, round_mlp_to=round_mlp_to,
                      provenance=plan.provenance)
    log.info("allocation search: KL %.4f -> %.4f over %d moves (%d accepted)", start_kl, cur_kl, tried,
             len(accepted))
    return new, rep


def summary_line(rep: dict) -> str:
    chk = ""
    if rep.get("check_kl_start") is not None:
        chk = f"; on {rep['check_samples']} other calibration samples {rep['check_kl_start']:.4f} -> " \
              f"{rep['check_kl_end']:.4f}"
    used = "" if rep.get("used", True) else " (rejected: " + rep.get("why_not", "") + ")"
    trade = f" (mixed moves: {rep['kv_traded']:+d} KV groups traded for MLP channels)" \
        if rep.get("moves") == "mixed" else ""
    scr = f"; {rep['screened_out']} turned down on the first {rep['screen_samples']} samples" \
        if rep.get("screen_samples") else ""
    return (f"allocation search: KL per token on {rep['tokens']:,} calibration tokens {rep['kl_start']:.4f} -> "
            f"{rep['kl_end']:.4f}, {len(rep['accepted'])} of {rep['evaluations']} moves kept{scr}{trade}{chk}{used}")
