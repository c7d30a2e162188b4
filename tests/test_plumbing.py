"""The contract every root file keeps with its user, checked across the repository.

1. No pickle is loaded anywhere: a checkpoint or data file placed in a run folder must never run code.
2. A run writes only under its --out: no tracked file changes, nothing appears outside the folder, and
   progress bars appear only on a terminal.
3. One command-line grammar: the shared flags (--train, --out, --resume, --seed, --device, --tiny) say
   the same words in every file's --help; a file without one of them says so in its --help.
4. One text of each shared helper: files that may not import clip.py keep byte-identical copies.
5. Under torchrun a finished rank ends with exit code 0: each file that joins a process group ends its
   `python FILE.py` with leave_distributed, which skips the interpreter's shutdown.
"""
import ast
import importlib
import re
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


# Helpers every file needs. clip.py holds the canonical text; a file the import graph lets import
# clip.py uses it (qformer.py, paligemma.py; lora.py uses nf4.py's), the stand-alone ones copy it;
# flow_matching.py, which runs under torchrun, copies leave_distributed too.
SHARED_HELPERS = ("pick_device", "CheckpointError", "check_finite", "fsync_path", "atomic_write")
COPIES = {"flow_matching.py": SHARED_HELPERS + ("leave_distributed",), "nf4.py": SHARED_HELPERS,
          "rouge.py": ("fsync_path", "atomic_write")}


def source_of(file, name):
    """The text of the top-level function or class `name` in a root file, or None."""
    text = (ROOT / file).read_text()
    node = next((n for n in ast.parse(text).body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == name),
                None)
    return None if node is None else "".join(text.splitlines(keepends=True)[node.lineno - 1:node.end_lineno])


@pytest.mark.parametrize("file", sorted(COPIES))
def test_shared_helpers_are_byte_identical_copies(file):
    """The stand-alone files keep a copy of each helper, and the copies must not drift apart."""
    for name in COPIES[file]:
        canonical = source_of("clip.py", name)
        assert canonical is not None, f"clip.py no longer defines {name}"
        assert source_of(file, name) == canonical, f"{file}'s {name} differs from clip.py's (copy it again)"


def test_files_that_may_import_the_helpers_do_not_copy_them():
    import lora
    import nf4
    import paligemma
    for name in ("CheckpointError", "check_finite", "atomic_write"):
        assert getattr(paligemma, name) is getattr(clip, name), f"paligemma.py should use clip.{name}"
        assert source_of("lora.py", name) is None, f"lora.py should use nf4.{name}, not a copy"
    assert lora.nf4.CheckpointError is nf4.CheckpointError
    assert source_of("paligemma.py", "CheckpointError") is None and source_of("qformer.py", "CheckpointError") is None


# ---------------------------------------------------------------------------------------------
# torchrun: a rank that finished its work ends with exit code 0
# ---------------------------------------------------------------------------------------------

def leaving_rank(rank, world, tmp):
    """A rank as torchrun starts it (WORLD_SIZE set): DDP work in the group, an exit handler registered,
    then clip.leave_distributed(), which should end the process without returning or running it."""
    import atexit
    import os
    os.environ["WORLD_SIZE"] = str(world)
    net = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
    net(torch.ones(2, 4)).sum().backward()
    atexit.register(lambda: (Path(tmp) / f"shutdown-{rank}").write_text("the interpreter shut down"))
    clip.leave_distributed()
    (Path(tmp) / f"returned-{rank}").write_text("leave_distributed returned")


def test_leave_distributed_ends_each_rank_at_once_and_does_nothing_in_one_process(tmp_path, monkeypatch):
    from conftest import run_gloo_workers
    assert run_gloo_workers(leaving_rank, 2, tmp_path) == [0, 0]
    assert not list(tmp_path.glob("returned-*")) and not list(tmp_path.glob("shutdown-*"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert clip.leave_distributed() is None                       # one process: back to the caller


@pytest.mark.parametrize("file", ["clip.py", "flow_matching.py", "vlm_train.py"])
def test_files_that_join_a_process_group_leave_it_at_the_end_of_their_command(file):
    tree = ast.parse((ROOT / file).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test) == "__name__ == '__main__'")
    assert [ast.unparse(n) for n in block.body] in (["main()", "leave_distributed()"],
                                                    ["main()", "clip.leave_distributed()"]), file


# ---------------------------------------------------------------------------------------------
# Every root file's main(): only under --out, and no progress bar off a terminal
# ---------------------------------------------------------------------------------------------

def write_rouge_files(tmp):
    (tmp / "refs.txt").write_text("the cat sat on the mat\npolice killed the gunman\n")
    (tmp / "preds.txt").write_text("the cat was on the mat\nthe gunman was killed\n")
    return tmp / "refs.txt", tmp / "preds.txt"


def run_rouge(out):
    import rouge
    refs, preds = write_rouge_files(out)
    rouge.main([])                                                         # the worked example
    rouge.main(["--references", str(refs), "--predictions", str(preds), "--tiny", "--json", str(out / "s.json")])
    rouge.main(["--target_filepattern", str(refs), "--prediction_filepattern", str(preds),
                "--output_filename", str(out / "s.csv")])


# each file's tiny or fastest mode, seconds each; clip.py and qformer.py are run by the test above
RUNS = {
    "lora": lambda out: importlib.import_module("lora").main(["--tiny", "--steps", "3", "--out", str(out),
                                                                "--device", "cpu"]),
    "nf4": lambda out: importlib.import_module("nf4").main(["--tiny", "--device", "cpu"]),
    "paligemma": lambda out: importlib.import_module("paligemma").main(["--out", str(out), "--device", "cpu"]),
    "rouge": run_rouge,
    "flow_matching": lambda out: importlib.import_module("flow_matching").main(
        ["--train", "--tiny", "--steps", "20", "--out", str(out), "--device", "cpu"]),
    "vlm_train": lambda out: importlib.import_module("vlm_train").main(["--out", str(out), "--device", "cpu"]),
}
# what each run must have written under its --out (proof that the run used the folder it was given)
WRITES = {"lora": "lora/adapter_model.safetensors", "paligemma": "model.safetensors", "rouge": "s.csv",
          "flow_matching": "latest", "vlm_train": "metrics.json"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_main_writes_only_under_its_out_and_draws_no_bar_off_a_terminal(name, tmp_path, monkeypatch, capsys):
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    monkeypatch.chdir(ROOT)                     # where a user runs the files: relative paths land here
    threads = torch.get_num_threads()           # flow_matching.main sets one thread on CPU; restore it after
    before = repository_state()
    out = tmp_path / "out"
    out.mkdir()
    try:
        RUNS[name](out)
    finally:
        torch.set_num_threads(threads)
    assert repository_state() == before, f"{name}.py changed the repository outside --out"
    if name in WRITES:
        assert (out / WRITES[name]).exists(), f"{name}.py did not write {WRITES[name]} under --out"
    captured = capsys.readouterr()
    # pytest's capture is not a terminal: a tqdm bar there (carriage returns) would flood logs and CI
    assert "\r" not in captured.out + captured.err, f"{name}.py drew a progress bar off a terminal"


def test_every_progress_bar_is_off_when_not_on_a_terminal():
    """tqdm(disable=None) draws only on a terminal; a call without `disable` would draw in logs and CI."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (dotted(node.func) or "").split(".")[-1] == "tqdm":
                if not any(k.arg == "disable" for k in node.keywords):
                    found.append(f"{path.name}:{node.lineno}")
    assert not found, "tqdm without disable=None (a bar in every log):\n" + "\n".join(found)


# ---------------------------------------------------------------------------------------------
# One command-line grammar
# ---------------------------------------------------------------------------------------------

GRAMMAR = ("--train", "--out", "--resume", "--seed", "--device", "--tiny")
SAME_HELP = ("--resume", "--seed", "--device", "--tiny")   # --train and --out say what this file trains and writes
ROOT_FILES = ["clip", "qformer", "lora", "nf4", "paligemma", "vlm_train", "flow_matching", "rouge"]


def help_of(name, monkeypatch, capsys):
    """({flag: (invocation, help)}, the --help text outside usage and option entries) of `python name.py --help`."""
    monkeypatch.setenv("COLUMNS", "1000")                                  # one line per help string
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    options, prose, entry = {}, [], None
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("usage:"):
            continue
        if re.match(r"  -", line):                                         # an option: invocation, then help
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            invocation, help_text = parts[0], parts[1] if len(parts) > 1 else ""
            entry = [invocation, help_text]
            for flag in re.findall(r"--[\w-]+", invocation):
                options[flag] = entry
        elif entry is not None and line.startswith("   "):                  # the help on the next line
            entry[1] = (entry[1] + " " + line.strip()).strip()
        else:
            entry = None
            prose.append(line)
    return {k: tuple(v) for k, v in options.items()}, "\n".join(prose)


@pytest.mark.parametrize("name", ROOT_FILES)
def test_every_help_speaks_the_shared_grammar_in_clip_words(name, monkeypatch, capsys):
    canonical, _ = help_of("clip", monkeypatch, capsys)
    options, prose = help_of(name, monkeypatch, capsys)
    for flag in GRAMMAR:
        if flag not in options:
            assert re.search(rf"{flag}(?![\w-])", prose), \
                f"{name}.py has no {flag} and its --help does not say why"
            continue
        assert options[flag][0] == canonical[flag][0], f"{name}.py writes {options[flag][0]!r}, clip.py {canonical[flag][0]!r}"
        if flag in SAME_HELP:
            assert options[flag][1] == canonical[flag][1], \
                f"{name}.py --help says {flag}: {options[flag][1]!r}; clip.py says {canonical[flag][1]!r}"


@pytest.mark.parametrize("name", [n for n in ROOT_FILES if n != "rouge"])   # rouge.py has no --device
def test_a_cuda_device_that_is_not_there_is_a_clear_error(name, capsys):
    with pytest.raises(SystemExit) as done:
        importlib.import_module(name).main(["--device", "cuda:99"])
    assert done.value.code == 2 and "--device cuda:99 was asked for, but torch sees" in capsys.readouterr().err
