"""Helpers shared by the benchmark scripts (run from this folder's scripts, which put it on sys.path)."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


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
