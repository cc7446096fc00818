"""Merge the benchmarks' JSON and markdown outputs into one file each (used by run_all.sh).

python benchmarks/merge_results.py OUT.json OUT.md NAME=PART.json[:PART.md] ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import _bench


def main(argv: list[str]) -> None:
    if len(argv) < 3:
        sys.exit(__doc__)
    out_json, out_md, parts = Path(argv[0]), Path(argv[1]), argv[2:]
    merged: dict[str, object] = {"environment": _bench.environment(), "benchmarks": {}}
    sections = ["# aiovirt benchmark results", ""]
    benchmarks: dict[str, object] = {}
    for part in parts:
        name, _, files = part.partition("=")
        json_file, _, md_file = files.partition(":")
        path = Path(json_file)
        if not path.exists():
            benchmarks[name] = {"ok": False, "error": f"{json_file} was not written (the benchmark failed)"}
            sections += [f"## {name}", "", f"Not available: {json_file} was not written.", ""]
            continue
        benchmarks[name] = json.loads(path.read_text())
        sections += [f"## {name}", ""]
        if md_file and Path(md_file).exists():
            sections += [Path(md_file).read_text().rstrip(), ""]
    merged["benchmarks"] = benchmarks
    out_json.write_text(json.dumps(merged, indent=2) + "\n")
    out_md.write_text("\n".join(sections))
    print(f"wrote {out_json} and {out_md}")


if __name__ == "__main__":
    main(sys.argv[1:])
