"""A golden run: a small default experiment (and a projection of its store) whose output files
are digested, so that a change meant to move no number (a refactor, a move, a rename) can be
shown to leave every result byte-identical. Keys that name the run rather than its results
(``code_version``, times) are left out of the digests; everything else counts.

    python benchmarks/golden.py --work /tmp/golden --write golden.json   # before the change
    python benchmarks/golden.py --work /tmp/golden --check golden.json   # after: exit 1 on any difference

One CPU thread: with several, torch's CPU kernels split sums by shape and the last bits can
move between two runs of the same code.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: keys that describe the run, not its results
VOLATILE = {"code_version", "created", "finished", "started", "seconds", "times", "wall_s"}
EXPERIMENT = ["--limit-personas", "8", "--limit-questions", "4", "--max-new-tokens", "8",
              "--layers", "3,15", "--permutations", "300", "--null-draws", "20"]


def _strip(x: object) -> object:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix == ".json":
        data = json.dumps(_strip(json.loads(data)), sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def run(work: Path) -> dict[str, str]:
    shutil.rmtree(work, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "tlpersona"]
    subprocess.run([*cli, "experiment", "--out", str(work / "exp"), *EXPERIMENT], check=True, env=env)
    subprocess.run([*cli, "project", str(work / "exp" / "store"), "--out", str(work / "proj"),
                    "--system", "You are a lighthouse keeper on a remote island."], check=True, env=env)
    files = sorted(p for p in work.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and p.suffix in (".json", ".safetensors", ".csv"))
    return {p.relative_to(work).as_posix(): digest(p) for p in files}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=Path("/tmp/tlpersona-golden"))
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", type=Path, help="record the digests here")
    mode.add_argument("--check", type=Path, help="compare with the digests recorded here")
    args = ap.parse_args()
    got = run(args.work)
    if args.write:
        args.write.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
        print(f"{len(got)} files digested into {args.write}")
        return
    want = json.loads(args.check.read_text())
    differ = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
    for k in differ:
        where = "differs" if k in got and k in want else "only in " + ("new" if k in got else "golden")
        print(f"{where}: {k}")
    print(f"{len(want) - len([k for k in differ if k in want])} of {len(want)} files byte-identical "
          "(volatile keys aside)")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
