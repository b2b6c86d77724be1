"""Helpers shared by the benchmark scripts (run from this folder's scripts, which put it on sys.path):
a timestamped log line, the machine facts every results file states, the Markdown writer, and a
measured subprocess run."""

from __future__ import annotations

import math
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_rev() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(**extra) -> dict:
    """What every results file states about the machine: CPU, cores, threads, RAM, versions, load at start."""
    import psutil
    import torch
    import transformers

    return {"cpu": cpu_name(), "cores_visible": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "platform": platform.platform(),
            "git": git_rev(), "loadavg_start": [round(x, 2) for x in os.getloadavg()], **extra}


def run_meta(**extra) -> dict:
    """The header of a results JSON: when, the exact command line (script path relative to the repo), the machine."""
    import datetime as _dt
    import sys

    return {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "machine": machine_info(), **extra}


def write_markdown(path: Path, lines: list[str], notes: list[str] | None = None) -> Path:
    """Write a results table (and its notes section) to ``path``."""
    if notes:
        lines = lines + ["", "## Notes", ""] + notes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what platform reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_measured(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its peak RSS (GNU time -v, else psutil sampling), wall time, exit code, output tail."""
    t0 = time.perf_counter()
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    if gnu_time:
        with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
            tpath = tf.name
        proc = subprocess.run([gnu_time, "-v", "-o", tpath, *cmd], env=env, capture_output=True, text=True)
        text = Path(tpath).read_text()
        os.unlink(tpath)
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        peak = int(m.group(1)) / 1024 if m else None
        how = "GNU time -v (kernel ru_maxrss of the child)"
    else:
        import psutil

        proc_ = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ps, peak = psutil.Process(proc_.pid), 0.0
        while proc_.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            time.sleep(0.05)
        out, _ = proc_.communicate()
        proc = subprocess.CompletedProcess(cmd, proc_.returncode, out, "")
        how = "psutil RSS sampled every 50 ms"
    tail = ((proc.stdout or "") + (proc.stderr or ""))[-1500:]
    return {"cmd": cmd, "rc": proc.returncode, "peak_rss_mb": peak, "wall_s": round(time.perf_counter() - t0, 1),
            "method": how, "output_tail": tail}


def prune_once(name: str, cmd: list[str], folder: Path, env: dict) -> float | None:
    """Run the ``gqaprune prune`` command ``cmd`` unless ``folder`` already holds its checkpoint; its wall
    seconds, or None when an earlier invocation wrote the folder (its time was not kept)."""
    if (folder / "config.json").is_file():
        return None
    log(f"{name}: {' '.join(cmd[2:])}")
    res = run_measured(cmd, env)
    if res["rc"] != 0:
        raise SystemExit(f"{name}: gqaprune prune failed (exit {res['rc']}):\n{res['output_tail']}")
    return res["wall_s"]


KEYS = ("val", "A128", "B128", "A2048", "B2048")   # in measuring order: the cheap validation first


class Measurer:
    """The honest protocol's perplexities (docs/architecture.md, "Measuring quality"), resumable.

    ``val``: the first ``val_tokens`` tokens of ``alpaca-heldout`` (for choosing), window 128;
    ``A128``/``B128``/``A2048``/``B2048``: the whole WikiText-2 test split as two halves, split at a
    multiple of 2048 tokens, so each window lies in one half and ``whole()`` of the two is exactly the
    one-pass PPL of the split. Loads each model once and measures the missing ``keys`` of its row in
    ``data["ppl"][name]``, calling ``save()`` after each.
    """

    def __init__(self, val_tokens: int, keys, data: dict, save):
        self.val_tokens, self.keys, self.data, self.save, self.ids = val_tokens, list(keys), data, save, {}

    def token_ids(self, tok) -> None:
        from gqaprune.data.corpora import load_text_corpus
        from gqaprune.evaluate.perplexity import tokenize_corpus

        if self.ids:
            return
        test = tokenize_corpus(tok, load_text_corpus("wikitext2", "test").text)
        half = (len(test) // 2) // 2048 * 2048        # a multiple of both windows: no window straddles A and B
        val = tokenize_corpus(tok, load_text_corpus("alpaca-heldout").text)[: self.val_tokens]
        self.ids = {"val": (val, 128), "A128": (test[:half], 128), "B128": (test[half:], 128),
                    "A2048": (test[:half], 2048), "B2048": (test[half:], 2048)}
        self.data["tokens"] = {"test": len(test), "half": half, "val": len(val)}

    def __call__(self, name: str, ref: str) -> None:
        from gqaprune.evaluate.perplexity import perplexity_of_ids
        from gqaprune.models.io import load_model

        keys = [k for k in KEYS if k in self.keys]
        r = self.data.setdefault("ppl", {}).setdefault(name, {})
        if all(k in r for k in keys):
            return
        # ref: a model reference, or a function giving one (called only when something is left to measure)
        model, tok = load_model(ref() if callable(ref) else ref, dtype="fp32", device="cpu")
        self.token_ids(tok)   # every checkpoint carries the source tokenizer: the same ids for every row
        for key in keys:
            if key in r:
                continue
            ids, win = self.ids[key]
            t = time.perf_counter()
            nll, n = perplexity_of_ids(model, ids, seq_len=win, progress=False)
            r[key] = {"nll": nll, "ppl": math.exp(nll), "n_tokens": n, "seconds": round(time.perf_counter() - t, 1)}
            log(f"{name}: {key} PPL {r[key]['ppl']:.2f} on {n} tokens in {r[key]['seconds']} s")
            self.save()
        del model


def whole(r: dict, win: int) -> tuple[float, int] | None:
    """(PPL of the whole test split, tokens scored) from the halves: exp of the token-weighted mean NLL."""
    a, b = r.get(f"A{win}"), r.get(f"B{win}")
    if not a or not b:
        return None
    n = a["n_tokens"] + b["n_tokens"]
    return math.exp((a["nll"] * a["n_tokens"] + b["nll"] * b["n_tokens"]) / n), n
