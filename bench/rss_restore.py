"""Peak resident memory of restoring one snapshot: from a file on disk vs from bytes.

    python bench/rss_restore.py SNAPSHOT            # both modes, each in a fresh process
    python bench/rss_restore.py SNAPSHOT --mode file

`file` hands `read_snapshot` the open file (read one section at a time); `bytes` reads
the whole object into memory first, as a download held in memory would. Prints the peak
RSS (MiB, `ru_maxrss`) of each process, and the baseline after imports.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _restore(path: str, mode: str) -> None:
    from lhv_index import read_snapshot

    base = _peak_mib()
    with open(path, "rb") as f:
        if mode == "file":
            index, _ = read_snapshot(f)
        else:
            index, _ = read_snapshot(f.read())
    print(f"{mode}: baseline {base:.0f} MiB, peak {_peak_mib():.0f} MiB, items {len(index)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("snapshot")
    parser.add_argument("--mode", choices=["file", "bytes"])
    args = parser.parse_args()
    if args.mode:
        _restore(args.snapshot, args.mode)
        return
    size = Path(args.snapshot).stat().st_size / 2**20
    print(f"snapshot: {size:.0f} MiB")
    for mode in ("file", "bytes"):
        subprocess.run([sys.executable, __file__, args.snapshot, "--mode", mode], check=True)


if __name__ == "__main__":
    main()
