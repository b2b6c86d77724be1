"""Helpers shared by the benchmark scripts (run from this folder's scripts, which put it on sys.path):
a timestamped log line, the machine facts every results file states, the Markdown writer, and a
measured subprocess run."""

from __future__ import annotations

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
