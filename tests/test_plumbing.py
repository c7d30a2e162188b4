"""The contract every root file keeps with its user, checked across the repository.

1. No pickle is loaded anywhere: a checkpoint or data file placed in a run folder must never run code.
2. A run writes only under its --out: no tracked file changes, nothing appears outside the folder.
"""
import ast
import subprocess
from pathlib import Path

import pytest
import torch

import clip
import qformer

# tiny models: one torch thread (tests/conftest.py says why; two threads made the run test ten times slower here)
pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "runs", "__pycache__", "node_modules"}


def python_files():
    """Every *.py of the repository: root files, tests, benchmarks (not the virtual environment)."""
    return sorted(p for p in ROOT.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def dotted(node):
    """'torch.load' for the expression torch.load; None for anything that is not a dotted name."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = dotted(node.value)
        return base and f"{base}.{node.attr}"
    return None


def keyword_is(call, name, value):
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


# Modules whose loaders unpickle. The scanner works on the syntax tree, so the strings in this file
# (module names, messages) are never mistaken for the calls they describe.
PICKLING_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve"}


def pickle_loads(path, root=ROOT):
    """['file:line what'] for every way `path` can load a pickle."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"{where} imports from {node.module}")
        elif isinstance(node, ast.Call):
            name = dotted(node.func) or ""
            if name.endswith("torch.load"):
                if not keyword_is(node, "weights_only", True):
                    found.append(f"{where} calls {name} without weights_only=True")
            elif name.split(".")[-1] in ("load", "loadtxt") and name.split(".")[0] in ("np", "numpy"):
                if keyword_is(node, "allow_pickle", True):
                    found.append(f"{where} calls {name} with allow_pickle=True")
            elif name.split(".")[-1] == "read_pickle":
                found.append(f"{where} calls {name}")
    return found


def test_the_scanner_finds_each_kind_of_pickle_loading(tmp_path):
    sample = tmp_path / "sample.py"                            # outside the repository: never scanned there
    sample.write_text("\n".join(["import " + "pickle", "import torch, numpy as np",
                      "torch." + "load('a.pt')", "torch." + "load('a.pt', weights_only=False)",
                      "torch." + "load('a.pt', weights_only=True)", "np." + "load('a.npy', allow_" + "pickle=True)",
                      "np." + "load('a.npy')", "from " + "pickle import loads"]))
    found = pickle_loads(sample, root=tmp_path)
    assert sorted(int(line.split(" ", 1)[0].rsplit(":", 1)[1]) for line in found) == [1, 3, 4, 6, 8], found


def test_no_pickle_loading_anywhere():
    files = python_files()
    assert ROOT / "clip.py" in files and ROOT / "tests" / "test_plumbing.py" in files
    found = [line for path in files for line in pickle_loads(path)]
    assert not found, "pickle loading (runs code from a file); use safetensors + JSON:\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# A run writes only under its --out
# ---------------------------------------------------------------------------------------------

def repository_state():
    """git's view of the work tree, ignored files included: what a run could have changed."""
    out = subprocess.run(["git", "status", "--porcelain", "--ignored", "--untracked-files=all"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return {line for line in out.splitlines() if "__pycache__" not in line and ".pytest_cache" not in line}


@pytest.mark.slow
def test_runs_write_only_under_their_out(tmp_path, monkeypatch, capsys):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    monkeypatch.chdir(ROOT)                     # where a user runs the files: relative paths land here
    before = repository_state()
    clip_run, q_run = tmp_path / "clip", tmp_path / "qformer"
    clip.main(["--train", "--tiny", "--steps", "6", "--out", str(clip_run), "--device", "cpu"])
    # --resume reports the steps this process trained, not the whole run's
    clip.main(["--train", "--tiny", "--steps", "8", "--resume", "--out", str(clip_run), "--device", "cpu"])
    assert "trained 2 steps (to step 8)" in capsys.readouterr().out
    qformer.main(["--train", "--tiny", "--steps", "4", "--out", str(q_run), "--clip-dir", str(clip_run),
                  "--device", "cpu"])
    clip.main(["--out", str(tmp_path / "demo"), "--device", "cpu"])
    assert repository_state() == before
    assert sorted(p.name for p in clip_run.iterdir()) == ["latest", "similarity.png", "step-000008"]
    assert sorted(p.name for p in q_run.iterdir()) == ["latest", "step-000004"]
    assert torch.isfinite(qformer.QFormer.from_pretrained(q_run).query_tokens).all()


def test_shared_helpers_are_byte_identical_copies():
    """Where the import graph lets a file import a helper, it does (qformer.py and paligemma.py use
    clip.pick_device); the stand-alone files keep a copy, and the copies must not drift apart."""
    def source_of(file, name):
        text = (ROOT / file).read_text()
        node = next(n for n in ast.parse(text).body if isinstance(n, ast.FunctionDef) and n.name == name)
        return "".join(text.splitlines(keepends=True)[node.lineno - 1:node.end_lineno])

    canonical = source_of("clip.py", "pick_device")
    for file in ("flow_matching.py", "nf4.py"):
        assert source_of(file, "pick_device") == canonical, f"{file}'s pick_device differs from clip.py's"
