"""The ``recipe`` package lives at the repository root, next to ``verl``: make it importable here and in the Ray
processes these tests start (they inherit ``PYTHONPATH``), whatever the working directory of pytest."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if REPO not in sys.path:
    sys.path.insert(0, REPO)
_paths = os.environ.get("PYTHONPATH", "").split(os.pathsep) if os.environ.get("PYTHONPATH") else []
if REPO not in _paths:
    os.environ["PYTHONPATH"] = os.pathsep.join([REPO] + _paths)
