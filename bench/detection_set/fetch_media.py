"""Copy the detection set's media out of clones of their source repositories.

    git clone https://github.com/<owner>/<name> clones/<name>   # for each source, see README.md
    python -m bench.detection_set.fetch_media --clones clones --out ~/detection-media

Each file is read at the labelled commit (``git show <commit>:<path>``), so a clone whose
branch has moved on still gives the labelled file; its checksum is checked. A clone can
also be named one by one: ``--repo owner/name=PATH``.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
from pathlib import Path

from bench.detection_set import load


def clone_of(repo: str, clones: Path | None, given: dict[str, str]) -> Path:
    if repo in given:
        return Path(given[repo])
    owner, name = repo.split("/")
    for candidate in (clones / name, clones / f"{owner}+{name}", clones / owner / name) if clones else ():
        if candidate.exists():
            return candidate
    raise SystemExit(
        f"no clone of {repo}: clone https://github.com/{repo} into --clones DIR, or pass --repo {repo}=PATH"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="the media folder to fill (passed later as --media)")
    parser.add_argument("--clones", type=Path, help="folder holding a clone of each source repository")
    parser.add_argument("--repo", action="append", default=[], metavar="OWNER/NAME=PATH", help="one clone")
    args = parser.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.repo)
    sources, entries = load()
    out = Path(args.out)
    done = 0
    for file in sorted({(e.source, e.path, e.sha256) for e in entries}):
        source, path, sha256 = file
        repo, commit = sources[source]["repo"], sources[source]["commit"]
        target = out / source / path
        if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == sha256:
            continue
        clone = clone_of(repo, args.clones, given)
        try:
            data = subprocess.run(
                ["git", "-C", str(clone), "show", f"{commit}:{path}"], check=True, capture_output=True
            ).stdout
        except subprocess.CalledProcessError as exc:
            raise SystemExit(
                f"{repo} at {clone}: cannot read {path} at commit {commit} "
                f"(a full clone is needed, not a shallow one): {exc.stderr.decode().strip()}"
            ) from exc
        if hashlib.sha256(data).hexdigest() != sha256:
            raise SystemExit(f"{repo}:{path} at {commit} is not the labelled file (checksum differs)")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        done += 1
    print(
        f"{done} file(s) copied into {out}; the set needs {len({e.file for e in entries})}", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
