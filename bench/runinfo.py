"""What a benchmark records about its run (the machine, its load, peak memory) and how it writes its
result: `<stem>.json` and `<stem>.md` side by side in the results folder.

No torch and nothing of memlong: the ret-mem benchmarks run without the model. (The model benchmarks
describe their machine with `memlong.eval.common.machine_info`, which adds torch's threads.) Scripts
import it as `from runinfo import ...`: a script's own folder is first on sys.path.
"""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def loadavg() -> list[float]:
    """1, 5 and 15 minute load averages: on a shared machine, what else was running."""
    return [round(x, 2) for x in os.getloadavg()]


def machine(**extra: object) -> dict:
    """The machine a run is on, and its load as the run starts; `extra` adds keys."""
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_at_start": loadavg(),
        **extra,
    }


def rss_mib() -> float:
    """This process's resident memory now, MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_bytes() -> int:
    """The most resident memory this process has had (ru_maxrss, which Linux gives in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_results(out: Path, stem: str, result: dict, markdown: str) -> None:
    """`result` as out/<stem>.json (indented) and `markdown` as out/<stem>.md, creating `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)
