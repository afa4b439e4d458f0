"""Print the packages pyproject.toml lists under [tool.emotion-stream] install-without-deps.

`make install` and the Dockerfile install them with `pip install --no-deps` (see the comment
there for why), from this one list.
"""

import sys
from pathlib import Path

import tomllib

PYPROJECT = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "pyproject.toml"
print(" ".join(tomllib.loads(PYPROJECT.read_text())["tool"]["emotion-stream"]["install-without-deps"]))
