"""The quick track end to end: `snakemake --cores 2 all` in a clean copy of the repository (opt-in: ~25 min).

The copy holds what a fresh clone holds (tracked and new files git does not ignore: no results/, data/ or
.snakemake/), as its own git repository (the tracking record reads the commit).  Peak memory is the largest
resident set of any process of the run (children's maximum RSS from getrusage, covering every job Snakemake ran).
"""

from __future__ import annotations

import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def clean_copy(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    git = ["git", "-c", "user.email=bench@cmbench", "-c", "user.name=bench"]
    for cmd in (["git", "init", "-q"], [*git, "add", "-A"], [*git, "commit", "-qm", "benchmark copy"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)


def measure(cores: int = 2, log=print) -> dict[str, float | str]:
    work = Path(tempfile.mkdtemp(prefix="cmbench-quicktrack-"))
    clean_copy(work)
    cmd = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), "all"]
    log(f"  quick track: {' '.join(cmd)} in {work}")
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"quick track failed (exit {proc.returncode}) in {work}:\n{proc.stderr[-3000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": f"snakemake --cores {cores} all", "wall_s": wall, "peak_rss_mib": peak_kib / 1024,
            "folder": str(work)}
