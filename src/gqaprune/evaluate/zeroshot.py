"""Zero-shot accuracy through lm-evaluation-harness 0.4, on the Hub or on local files.

The seven tasks of the LLM-Pruner tables (boolq, piqa, hellaswag, winogrande, arc_easy,
arc_challenge, openbookqa) are loaded from lm-eval's own task YAML files, so its prompts,
metrics and preprocessing apply unchanged. Only the data source may change:

* Online (default): the stock task reads its Hub dataset and scores the split lm-eval
  chooses: ``test`` for ARC and OpenBookQA, ``validation`` for the rest.
* Offline (``GQAPRUNE_DATA_DIR`` set, or ``data_dir`` given): the task reads
  ``<data_dir>/zeroshot/<file>.jsonl[.gz]`` (the Hub schema) through the ``json`` dataset
  builder, and scores its ``validation`` split. For ARC and OpenBookQA that is NOT the split
  papers report (test); every result records the split it used and says so.

Every result records: task, accuracy (acc, and acc_norm where the task defines it, with
their standard errors), split, number of examples scored and available, limit, and source.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gqaprune.compat import datasets as datasets_compat
from gqaprune.compat import huggingface_hub as hub_compat
from gqaprune.compat import lm_eval as lm_eval_compat
from gqaprune.data import sources
from gqaprune.errors import GQAPruneError

log = logging.getLogger(__name__)

# task -> (stock YAML inside lm_eval/tasks, local file inside <data_dir>/zeroshot)
TASKS: dict[str, tuple[str, str]] = {
    "boolq": ("super_glue/boolq/default.yaml", "boolq.validation.jsonl"),
    "piqa": ("piqa/piqa.yaml", "piqa.validation.jsonl"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag.validation.jsonl.gz"),
    "winogrande": ("winogrande/default.yaml", "winogrande_xl.validation.jsonl"),
    "arc_easy": ("arc/arc_easy.yaml", "arc_easy.validation.jsonl"),
    "arc_challenge": ("arc/arc_challenge.yaml", "arc_challenge.validation.jsonl"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa_main.validation.jsonl"),
}
SUPPORTED_TASKS: tuple[str, ...] = tuple(TASKS)
LOCAL_SPLIT = "validation"


@dataclass
class TaskResult:
    """One task's zero-shot accuracy and the protocol that produced it."""

    task: str
    acc: float
    acc_norm: float | None  # None where lm-eval's task defines no length-normalised accuracy
    acc_stderr: float | None
    acc_norm_stderr: float | None
    split: str  # the split actually scored
    n: int  # examples scored
    n_available: int  # examples in that split
    limit: int | None
    source: str  # "hub:<dataset path>[/<name>]" or the local file's path
    note: str = ""  # e.g. "lm-eval scores this task on test on the Hub; this is validation"

    def line(self) -> str:
        """One human line, e.g. ``piqa: acc 0.6200 acc_norm 0.6400 (validation, n=50 of 1838, local ...)``."""
        acc = f"acc {self.acc:.4f}" + (f" ± {self.acc_stderr:.4f}" if self.acc_stderr is not None else "")
        if self.acc_norm is not None:
            acc += f", acc_norm {self.acc_norm:.4f}"
        lim = f", limit {self.limit}" if self.limit is not None else ""
        text = f"{self.task}: {acc} ({self.split} split, n={self.n} of {self.n_available}{lim}; {self.source})"
        return text + (f" [{self.note}]" if self.note else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ZeroShotResult:
    """Zero-shot results for several tasks, with what is needed to reproduce them."""

    tasks: dict[str, TaskResult]
    limit: int | None
    batch_size: int
    num_fewshot: int = 0
    lm_eval_version: str = ""
    wall_s: float = 0.0
    offline: bool = False
    data_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def __getitem__(self, task: str) -> TaskResult:
        return self.tasks[task]

    @property
    def mean_acc(self) -> float:
        """Unweighted mean of ``acc`` over the tasks (the LLM-Pruner tables' "average")."""
        return self.mean()[0]

    def mean(self, exclude: Sequence[str] = ()) -> tuple[float, float | None]:
        """(unweighted mean of ``acc`` over the tasks not in ``exclude``, its standard error). The tasks'
        examples are disjoint, so the mean's variance is the sum of the tasks' variances over k^2; the
        standard error is None where a task has none."""
        rs = [r for name, r in self.tasks.items() if name not in exclude]
        k = max(len(rs), 1)
        se = None if any(r.acc_stderr is None for r in rs) else math.sqrt(sum(r.acc_stderr ** 2 for r in rs)) / k
        return sum(r.acc for r in rs) / k, se

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ZeroShotResult":
        """The inverse of ``to_dict`` (a results file read back)."""
        fields = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        fields["tasks"] = {name: TaskResult(**t) for name, t in d["tasks"].items()}
        return cls(**fields)

    def accuracies(self, metric: str = "acc") -> dict[str, float]:
        """``{task: acc}`` (or ``acc_norm``, falling back to ``acc`` where a task has none)."""
        out = {}
        for name, r in self.tasks.items():
            value = getattr(r, metric) if metric == "acc" else (r.acc_norm if r.acc_norm is not None else r.acc)
            out[name] = value
        return out

    def lines(self) -> list[str]:
        """One line per task, then the mean; what the CLI prints."""
        head = (f"zero-shot (lm-eval {self.lm_eval_version}, {self.num_fewshot}-shot, "
                f"{'local files' if self.offline else 'Hub datasets'}, limit {self.limit}, {self.wall_s:.1f} s)")
        mean, se = self.mean()
        return [head] + [r.line() for r in self.tasks.values()] + [
            f"mean acc: {mean:.4f}" + (f" ± {se:.4f}" if se is not None else "")]

    def markdown(self) -> str:
        """A Markdown table: task | acc | acc_norm | split | n | source."""
        rows = ["| task | acc | acc_norm | split | n | source |", "|---|---|---|---|---|---|"]
        for r in self.tasks.values():
            norm = f"{r.acc_norm:.4f}" if r.acc_norm is not None else "-"
            split = r.split + (" *" if r.note else "")
            rows.append(f"| {r.task} | {r.acc:.4f} | {norm} | {split} | {r.n} of {r.n_available} | {r.source} |")
        rows.append(f"| **mean** | {self.mean_acc:.4f} | | | | |")
        out = "\n".join(rows)
        starred = [r for r in self.tasks.values() if r.note]
        if starred:
            out += ("\n\n\\* lm-eval scores " + ", ".join(r.task for r in starred) + " on the Hub's test split; "
                    "these rows come from local validation files, so they are validation accuracy.")
        if self.limit is not None:
            out += f"\n\nLimited to the first {self.limit} examples per task (a quick check, not a full score)."
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean_acc"], d["mean_acc_stderr"] = self.mean()
        return d


# ----------------------------------------------------------------------------- resolution

def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Normalise ``"piqa,boolq"`` / ``["piqa"]`` / ``"all"`` to a list of supported task names."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if str(t).strip()]
    if names == ["all"]:
        return list(SUPPORTED_TASKS)
    if not names:
        raise GQAPruneError(f"--tasks: no task given. Choose from: {', '.join(SUPPORTED_TASKS)} (or 'all').")
    unknown = [t for t in names if t not in TASKS]
    if unknown:
        raise GQAPruneError(
            f"--tasks: unknown task(s) {', '.join(unknown)}. Supported: {', '.join(SUPPORTED_TASKS)} (or 'all')."
        )
    return list(dict.fromkeys(names))


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The local data root (``data_dir``, else ``$GQAPRUNE_DATA_DIR`` through data.sources), or None for the Hub."""
    if data_dir is None:
        return sources.data_dir()
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise GQAPruneError(f"data_dir={root}: not a folder. Point it at a folder laid out like shared/data "
                            "(with zeroshot/*.jsonl), or leave it out to read the Hub datasets.")
    return root


def local_file(task: str, root: Path) -> Path:
    """The local file for ``task`` under ``root``; GQAPruneError naming the path when it is missing."""
    path = root / "zeroshot" / TASKS[task][1]
    if not path.is_file():
        raise GQAPruneError(
            f"zero-shot task {task}: local file {path} not found. Put the {task} validation split there "
            f"(Hub schema, one JSON object a line), or unset {sources.DATA_DIR_ENV} to read the Hub dataset."
        )
    return path


def _stock_yaml(task: str) -> Path:
    """lm-eval's own YAML for ``task``; looked up in its index if the file moved in this version."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / TASKS[task][0]
    if path.is_file():
        return path
    from lm_eval.tasks import TaskManager  # slow (indexes every YAML): only when the layout changed

    entry = TaskManager().task_index.get(task)
    if entry is None or entry.yaml_path is None:
        raise GQAPruneError(f"zero-shot task {task}: this lm-eval version does not define it; "
                            "install lm-eval>=0.4,<0.5 (pip install 'gqaprune[eval]').")
    return Path(entry.yaml_path)


def _boolq_answer_to_label(dataset):
    """BoolQ from the ``boolq`` Hub dataset names its target ``answer`` (bool); lm-eval's
    super_glue task reads ``label`` (0 = no, 1 = yes). Add ``label`` without touching the prompt."""
    if "label" in dataset.column_names or "answer" not in dataset.column_names:
        return dataset
    return dataset.map(lambda doc: {"label": int(bool(doc["answer"]))})


def task_config(task: str, local_path: Path | None = None) -> dict[str, Any]:
    """lm-eval's stock config for ``task``; with ``local_path``, its data source swapped for the file.

    Only the data fields change (dataset_path/name/kwargs and splits), so the stock prompts,
    targets, metrics and ``process_docs`` still apply.
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_stock_yaml(task), resolve_func=True)
    for key in ("tag", "group", "task_list"):  # structural keys the task factory drops too
        cfg.pop(key, None)
    cfg["task"] = task
    cfg["num_fewshot"] = 0  # zero-shot, whatever the YAML says
    if local_path is not None:
        cfg.update(
            dataset_path="json",
            dataset_name=None,
            dataset_kwargs={"data_files": {LOCAL_SPLIT: str(local_path)}},
            training_split=None,
            validation_split=LOCAL_SPLIT,
            test_split=None,
            fewshot_split=None,
        )
        if task == "boolq" and cfg.get("process_docs") is None:
            cfg["process_docs"] = _boolq_answer_to_label
    return cfg


@contextlib.contextmanager
def hf_offline() -> Iterator[None]:
    """Force the Hugging Face Hub and datasets offline for the block, also in already-imported modules."""
    with hub_compat.offline(), datasets_compat.offline():
        yield


def _source(cfg: dict[str, Any]) -> str:
    name = cfg.get("dataset_name")
    return f"hub:{cfg.get('dataset_path')}" + (f"/{name}" if name else "")


def _float(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # lm-eval writes "N/A" where no stderr was computed
        return None


# ----------------------------------------------------------------------------- evaluation

def zeroshot(model, tokenizer, tasks: str | Sequence[str], *, limit: int | None = None, batch_size: int = 8,
             data_dir: str | os.PathLike | None = None) -> ZeroShotResult:
    """Zero-shot accuracy of an already-loaded model on lm-eval tasks.

    ``model`` is a transformers causal LM or a PEFT model wrapping one, on its device;
    ``tasks`` a subset of SUPPORTED_TASKS (list, comma string, or "all"). ``limit`` scores
    only the first N examples of each task. With ``data_dir`` (or ``$GQAPRUNE_DATA_DIR``) the
    data come from local files and nothing touches the network; otherwise from the Hub.
    """
    names = parse_tasks(tasks)
    if limit is not None and limit < 1:
        raise GQAPruneError(f"--limit {limit}: must be a positive number of examples per task (or omit it).")
    if batch_size < 1:
        raise GQAPruneError(f"--batch-size {batch_size}: must be at least 1.")
    root = resolve_data_dir(data_dir)
    files = {t: local_file(t, root) for t in names} if root is not None else {}  # fail before any work

    try:
        import lm_eval
        from lm_eval import simple_evaluate
        from lm_eval.api.task import ConfigurableTask
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # pragma: no cover - depends on the install
        raise GQAPruneError(
            f"zero-shot evaluation needs lm-evaluation-harness 0.4 ({err}). "
            "Install it with: pip install 'gqaprune[eval]'  (or pip install 'lm-eval>=0.4,<0.5')."
        ) from err

    offline = root is not None
    guard = hf_offline() if offline else contextlib.nullcontext()
    t0 = time.perf_counter()
    with guard, lm_eval_compat.quiet():
        configs = {t: task_config(t, files.get(t)) for t in names}
        task_objs = {}
        for t, cfg in configs.items():
            log.info("zero-shot %s: loading %s", t, files.get(t) or _source(cfg))
            task_objs[t] = ConfigurableTask(config=cfg)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        was_training = getattr(model, "training", False)
        model.eval()
        try:
            out = simple_evaluate(
                model=lm,
                tasks=list(task_objs.values()),
                limit=limit,
                batch_size=batch_size,
                log_samples=False,
                bootstrap_iters=1000,  # acc's stderr is closed-form; 0 would drop it
                # An empty index: the default TaskManager indexes every YAML lm-eval ships (~10 s)
                # only to look up tasks we already built.
                task_manager=TaskManager(include_defaults=False),
            )
        finally:
            if was_training:
                model.train()
    wall = time.perf_counter() - t0
    results = {t: _task_result(t, out, task_objs[t], configs[t], files.get(t), limit, offline) for t in names}
    return ZeroShotResult(
        tasks=results, limit=limit, batch_size=batch_size, num_fewshot=0,
        lm_eval_version=getattr(lm_eval, "__version__", ""), wall_s=wall, offline=offline,
        data_dir=str(root) if root is not None else None,
    )


def _task_result(t: str, out: dict, task_obj, cfg: dict, file: Path | None, limit: int | None,
                 offline: bool) -> TaskResult:
    """One task's result from lm-eval's output, with the split it scored and where the data came from."""
    res = out["results"][t]
    split = task_obj.config.test_split if task_obj.has_test_docs() else task_obj.config.validation_split
    counts = out.get("n-samples", {}).get(t, {})
    note = ""
    if offline and (stock := stock_split(t)) != split:
        note = (f"lm-eval scores {t} on the Hub's {stock} split; the local file is the "
                f"{split} split, so this is {split} accuracy")
    r = TaskResult(task=t, acc=float(res["acc,none"]), acc_norm=_float(res.get("acc_norm,none")),
                   acc_stderr=_float(res.get("acc_stderr,none")), acc_norm_stderr=_float(res.get("acc_norm_stderr,none")),
                   split=str(split), n=int(counts.get("effective", res.get("sample_len", 0))),
                   n_available=int(counts.get("original", 0)), limit=limit,
                   source=str(file) if offline else _source(cfg), note=note)
    log.info("%s", r.line())
    return r


def stock_split(task: str) -> str:
    """The split lm-eval's stock config scores on the Hub: test where it has one (ARC, OpenBookQA)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(_stock_yaml(task), resolve_func=False)
    return cfg.get("test_split") or cfg.get("validation_split") or "validation"
