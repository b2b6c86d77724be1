"""``gqaprune prune`` options: one dataclass group per --help heading, each checking its own fields.

Every value is checked here, when the options are built, before any model is loaded;
what needs the model (the budget against its size, a plan against its shape) is checked
right after loading, before any calibration or perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass

from gqaprune.data.instructions import CALIBRATION_FORMATS
from gqaprune.errors import GQAPruneError
from gqaprune.options import Args, ModelArgs, opt
from gqaprune.prune.allocate import ALLOCATIONS, SPLITS
from gqaprune.prune.allocate.search import MOVES as SEARCH_MOVES
from gqaprune.prune.budget import Budget
from gqaprune.prune.compensate import TARGETS as COMPENSATE_TARGETS
from gqaprune.models.pruned_deci import FFN_MULTIPLE as DECI_MULTIPLE
from gqaprune.models.family import FAMILIES
from gqaprune.prune.plan import LAYOUTS, PER_LAYER
from gqaprune.prune.recipes import DEFAULT as DEFAULT_RECIPE, RECIPES, check_name as check_recipe
from gqaprune.prune.recipes import resolve as resolve_recipe
from gqaprune.prune.score import CRITERIA

# MLP widths in multiples of this run near full speed in GPU matmul kernels (tensor-core tiles);
# measured in benchmarks/results/gpu_llama3_8b_shape.md
GPU_MLP_MULTIPLE = 128

def _at_least(obj, minimum, *names: str) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < minimum:
            raise GQAPruneError(f"--{name.replace('_', '-')} {v}: must be at least {minimum}")


@dataclass
class BudgetArgs(Args):
    GROUP = "budget (one of --pruning-ratio, --target-params or --plan is required)"
    pruning_ratio: float | None = opt(None, "fraction of the model's TOTAL parameters to remove (tied embeddings "
                                      "counted once). Not LLM-Pruner's --pruning_ratio, which is the fraction of "
                                      "heads/channels removed inside each pruned layer and removes far less overall")
    target_params: int | None = opt(None, "alternative to --pruning-ratio: parameters to keep")
    plan: str | None = opt(None, "apply this saved plan.json to the model instead of scoring")
    keep_first: int = opt(0, "leave the first K layers unpruned (LLM-Pruner's default protects 4)")
    keep_last: int = opt(0, "leave the last K layers unpruned (LLM-Pruner's default protects 2)")
    min_mlp: int = opt(1, "every layer keeps at least this many MLP channels")
    round_mlp_to: int | None = opt(None, "keep a multiple of M MLP channels per layer, for fast GPU kernels "
                                         "(default: 128 when pruning on a GPU, unrounded on CPU; 1 = unrounded)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 0, "keep_first", "keep_last")
        _at_least(self, 1, "min_mlp", "round_mlp_to")
        if self.plan is not None:
            if self.pruning_ratio is not None or self.target_params is not None:
                raise GQAPruneError("--plan replays a saved plan, whose budget is in it: leave out --pruning-ratio "
                                    "and --target-params")
        elif self.pruning_ratio is not None or self.target_params is not None:
            self.budget()   # the budget checks itself (options used only for scoring may have none)

    def budget(self) -> Budget:
        if self.pruning_ratio is None and self.target_params is None:
            raise GQAPruneError("prune: give --pruning-ratio R (fraction of total parameters to remove), "
                                "--target-params N, or --plan plan.json")
        return Budget(self.pruning_ratio, self.target_params)


@dataclass
class CriterionArgs(Args):
    GROUP = "criterion"
    criterion: str | None = opt(None, "importance criterion (default: the recipe's; obs: the o_proj/down_proj output error when the unit is "
                         "removed and the rest refit, greedy structured OBS on calibration activations)",
                         choices=tuple(CRITERIA))
    hooks: bool = opt(True, "fold each gradient into the scores as it arrives (--no-hooks: after each backward, "
                      "more memory, same scores)")


@dataclass
class LayoutArgs(Args):
    GROUP = "layout and allocation"
    layout: str | None = opt(None, "(default: the recipe's) uniform: same counts in every pruned layer (stock LlamaConfig); per-layer: counts "
                      "vary by layer from globally ranked, per-layer-normalised scores; per-layer-mlp: the same KV "
                      "groups in every layer, MLP widths per layer, saved as DeciLM block_configs (vLLM serves it; "
                      f"widths in multiples of {DECI_MULTIPLE})", choices=LAYOUTS)
    allocation: str | None = opt(None, "per-layer layout (default: the recipe's): scores = per-layer-normalised scores; sensitivity = also "
                          "weight each layer by its measured calibration-loss rise when pruned alone; search = "
                          "start from sensitivity, then move channels/KV groups between layers while the "
                          "calibration KL from the unpruned model goes down", choices=ALLOCATIONS)
    split: str | None = opt(None, "attention vs MLP (default: the recipe's): balanced = both lose the same fraction of their units; search = "
                     "try each share of KV groups removed (MLP takes the rest) and keep the plan whose output moves "
                     "least on calibration samples (KL)", choices=SPLITS)
    sensitivity_samples: int | None = opt(None, "(default: the recipe's) calibration samples used to measure layer sensitivity and to compare "
                                   "splits (--allocation sensitivity, --split search)")
    search_evaluations: int | None = opt(None, "--allocation search (default: the recipe's): moves to try (each reruns about half the model on "
                                  "--search-samples samples)")
    search_moves: str | None = opt(None, "--allocation search (default: the recipe's): same = channels for channels, KV groups for KV groups; "
                            "mixed = layers may also trade a KV group for the same parameters in MLP channels "
                            "(and back)", choices=SEARCH_MOVES)
    search_samples: int | None = opt(None, "--allocation search (default: the recipe's): calibration samples the KL is measured on (the next as "
                              "many, when there are, check that the result generalises)")

    search_screen_samples: int = opt(0, "--allocation search: score each move on this many of its samples first and "
                                     "on the rest only if it helps there (0 = off; cheaper, may turn down good moves)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 1, "sensitivity_samples", "search_evaluations", "search_samples")
        _at_least(self, 0, "search_screen_samples")


@dataclass
class QualityArgs(Args):
    GROUP = "quality steps"
    compensate: bool | None = opt(None, "(default: the recipe's) refit the o_proj/down_proj columns of kept units by least squares so each "
                           "pruned layer's output matches the unpruned layer's on the calibration tokens")
    compensate_target: str = opt("layer", "what the refit matches: layer = the unpruned sublayer on the pruned "
                                 "model's inputs; dense = the dense model's own residual stream",
                                 choices=COMPENSATE_TARGETS)
    compensate_ridge: float | None = opt(None, "ridge of the refit (pulls towards the current weights), relative to "
                                         "the mean diagonal of X^T X (default: chosen per layer on the held-out "
                                         "calibration tokens)")
    compensate_holdout: float = opt(0.125, "fraction of calibration samples kept out of the refit to check it; a "
                                    "refit that raises their error is rejected")
    steps: int = opt(1, "iterative pruning: remove the budget in K equal steps, re-scoring (and compensating) "
                     "between steps")
    reconstruct_epochs: int = opt(0, "block-wise reconstruction after the cut: train every remaining weight of each "
                                  "pruned layer for E passes over the calibration samples so its output matches the "
                                  "dense layer's (Adam, one layer at a time; 0 = off; loads the dense model again)")
    reconstruct_lr: float = opt(1e-4, "--reconstruct-epochs: Adam learning rate (cosine decay to 0)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 1, "steps")
        _at_least(self, 0, "reconstruct_epochs")
        if not self.reconstruct_lr > 0:
            raise GQAPruneError(f"--reconstruct-lr {self.reconstruct_lr}: must be a positive learning rate")
        _at_least(self, 0, "compensate_ridge")
        if not 0 <= self.compensate_holdout < 1:
            raise GQAPruneError(f"--compensate-holdout {self.compensate_holdout}: must be in [0, 1), the fraction "
                                "of calibration samples kept out of the refit to check it")


@dataclass
class CalibrationArgs(Args):
    GROUP = "calibration"
    calibration: str = opt("alpaca", "calibration data: alpaca (yahma/alpaca-cleaned), wikitext2 (train), c4, or a "
                           "local .txt/.json/.jsonl(.gz) file")
    calibration_format: str | None = opt(None, "instruction data (alpaca) as calibration text (default: the "
                                  "recipe's): prompt = the Alpaca "
                                  "template + response, as fine-tuning sees it; text = instruction, input and "
                                  "output as plain text", choices=CALIBRATION_FORMATS)
    num_samples: int | None = opt(None, "calibration samples (default: the recipe's)")
    seq_len: int = opt(128, "tokens per calibration sample")
    calib_batch_size: int = opt(8, "samples per calibration forward/backward; gradient scores are summed per batch")
    seed: int = opt(0, "seed for the calibration sample and the random criterion")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 1, "num_samples", "calib_batch_size")
        _at_least(self, 2, "seq_len")


@dataclass
class PPLArgs(Args):
    GROUP = "perplexity before and after"
    eval_ppl: list[str] = opt(factory=list, help="datasets to measure perplexity on before and after, e.g. wikitext2")
    ppl_seq_len: int = opt(128, "perplexity window length (tokens)")
    ppl_max_tokens: int | None = opt(None, "score only the first N tokens of each PPL dataset (a quicker first try)")

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least(self, 2, "ppl_seq_len")
        _at_least(self, 1, "ppl_max_tokens")


@dataclass
class PruneOutputArgs(Args):
    GROUP = "output"
    output: str | None = opt(None, "output checkpoint folder (Hugging Face layout)", aliases=("-o",))
    overwrite: bool = opt(False, "replace the output folder if gqaprune wrote it")
    dry_run: bool = opt(False, "prune in memory and print the summary, but save nothing (no --output needed)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.output is not None and self.dry_run:
            raise GQAPruneError("prune: --dry-run saves nothing; leave out --output (or --dry-run)")


@dataclass
class PruneOptions(BudgetArgs, CriterionArgs, LayoutArgs, QualityArgs, CalibrationArgs, PPLArgs, PruneOutputArgs,
                   ModelArgs):
    recipe: str | None = opt(None, "a named set of the criterion, layout, allocation, split, refit and calibration "
                             f"options below: {', '.join(RECIPES)} (default: {DEFAULT_RECIPE}; none with --plan). "
                             "Flags given explicitly win over it; the plan records both", choices=tuple(RECIPES))
    model: str = opt("smollm2-135m", "model to prune: HF folder, Hub id, .gguf file, alias smollm2-135m, or legacy "
                     "pytorch_model.bin (with --allow-pickle), of one of these families: " + "; ".join(
                         f"{f.label}: {f.example}" for f in FAMILIES.values()))

    def __post_init__(self) -> None:
        # the recipe fills what was left unset, before any group checks its values
        if self.recipe is not None:
            check_recipe(self.recipe)
            if self.plan is not None:
                raise GQAPruneError(f"--recipe {self.recipe}: --plan replays a saved plan, so nothing is scored; leave "
                                    "out --recipe (add --compensate to refit while replaying)")
        self.recipe_record = resolve_recipe(self, None if self.plan is not None else self.recipe or DEFAULT_RECIPE)
        super().__post_init__()
        if self.layout == "per-layer-mlp" and self.plan is None:   # DeciLM can only express multiples of 256
            if self.round_mlp_to is None:
                self.round_mlp_to = DECI_MULTIPLE
            elif self.round_mlp_to % DECI_MULTIPLE:
                raise GQAPruneError(f"--round-mlp-to {self.round_mlp_to}: --layout per-layer-mlp is saved in DeciLM's "
                                    f"format, whose MLP widths are multiples of {DECI_MULTIPLE}; use a multiple of it")
        if self.round_mlp_to is None and self.plan is None:   # the default that fits the device
            from gqaprune.models.io import resolve_device

            self.round_mlp_to = GPU_MLP_MULTIPLE if resolve_device(self.device).type == "cuda" else None
        elif self.round_mlp_to == 1:
            self.round_mlp_to = None   # unrounded, asked for explicitly
        if self.allocation != "scores" and self.layout not in PER_LAYER and self.plan is None:
            raise GQAPruneError(f"--allocation {self.allocation} sets per-layer budgets: use it with --layout "
                                "per-layer or per-layer-mlp")
        if self.plan is not None and (self.steps > 1 or self.allocation != "scores" or self.split != "balanced"):
            raise GQAPruneError("--plan replays a saved plan: --steps, --allocation and --split only apply when "
                                "scoring")

    def needs_calibration(self) -> bool:
        from gqaprune.prune.score import criterion

        if self.plan is not None:
            return self.compensate or self.reconstruct_epochs > 0
        return criterion(self.criterion).needs_calibration or self.compensate or self.allocation != "scores" \
            or self.split == "search" or self.reconstruct_epochs > 0
