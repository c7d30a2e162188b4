"""The design card's rules for the repository itself, checked on every run.

Each root concept file must: open with a module docstring, answer `--help` instantly, import only the
standard library, the card's packages and other root files, without import cycles, and reach the code
of its core equation within its first 150 lines. The README's quick-start test command must be the one
`.ci/run` executes, so the two cannot drift apart.
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ["clip", "qformer", "lora", "nf4", "paligemma", "vlm_train", "flow_matching", "rouge"]
CARD = {"torch", "numpy", "transformers", "safetensors", "bitsandbytes", "torchdiffeq", "PIL", "tqdm", "scipy"}
PRESENT = [name for name in CONCEPTS if (ROOT / f"{name}.py").exists()]


def imported_modules(path):
    """Top-level names of every absolute import in a file (module level and inside functions)."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_at_least_one_concept_file_exists():
    assert PRESENT, "no root concept file found"


@pytest.mark.parametrize("name", PRESENT)
def test_module_docstring_teaches(name):
    doc = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()))
    assert doc and len(doc.splitlines()) >= 10, f"{name}.py needs a module docstring that teaches the idea"


@pytest.mark.parametrize("name", PRESENT)
def test_imports_stay_on_the_design_card(name):
    outside = sorted(m for m in imported_modules(ROOT / f"{name}.py")
                     if m not in CARD | set(CONCEPTS) and m not in sys.stdlib_module_names)
    assert not outside, f"{name}.py imports packages outside the design card: {outside}"


def test_root_import_graph_is_acyclic():
    graph = {n: imported_modules(ROOT / f"{n}.py") & set(PRESENT) - {n} for n in PRESENT}
    state = {}

    def visit(node, path):
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for child in sorted(graph[node]):
            visit(child, path + [node])
        state[node] = "done"

    for node in graph:
        visit(node, [])


def test_no_unexpected_python_files_at_root():
    extra = sorted(p.name for p in ROOT.glob("*.py") if p.stem not in CONCEPTS)
    assert not extra, f"root .py files that are not on the design card: {extra}"


# rouge.py does no tensor work (pure Python on strings), so it alone has no --device flag.
NO_DEVICE = {"rouge"}


@pytest.mark.parametrize("name", PRESENT)
def test_help_answers(name):
    out = subprocess.run([sys.executable, f"{name}.py", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if name not in NO_DEVICE:
        assert "--device" in out.stdout, f"{name}.py --help does not offer --device"


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [l.strip() for l in readme.splitlines() if "python -m pytest" in l and not l.strip().startswith("#")]
    assert lines, "README has no quick-start test command"
    assert lines[0] in ci, f"README's test command is not the one .ci/run runs:\n{lines[0]}"


def concept_share(path):
    """Lines above the "Plumbing" banner over all lines, in percent (None without a banner). The
    banner is a comment line that starts with "# Plumbing"."""
    lines = path.read_text().splitlines()
    banner = next((i for i, line in enumerate(lines) if line.startswith("# Plumbing")), None)
    return None if banner is None else 100 * banner / len(lines)


@pytest.mark.parametrize("name", PRESENT)
def test_concept_first_and_the_readme_states_the_share(name):
    """Each file teaches its concept first: at least half its lines sit above one "Plumbing" banner,
    and the README's file table states that share (to the point, give or take 2 for small edits)."""
    share = concept_share(ROOT / f"{name}.py")
    assert share is not None, f"{name}.py has no '# Plumbing' banner comment"
    assert share >= 50, f"{name}.py: only {share:.0f}% of its lines come before the Plumbing banner"
    row = next((line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith(f"| [`{name}.py`]")), None)
    assert row is not None, f"README's file table has no row for {name}.py"
    stated = int(row.rstrip(" |").rsplit("|", 1)[1].strip().rstrip("%"))
    assert abs(stated - share) <= 2, f"README says {stated}% for {name}.py, the file has {share:.0f}%"


# The def/class that computes each file's core equation: the one its module docstring is about.
# "Class.method" names a method. Rule: a reader reaches it within the first 150 lines.
CORE_EQUATION = {
    "clip": "clip_loss",              # L = (CE(logits, diag) + CE(logits^T, diag)) / 2
    "qformer": "itc_similarity",      # s(I, T) = max_q cos(z_q, t_cls); itc_loss follows it
    "lora": "lora_linear",            # h = W x + b + (alpha / r) B A x; LoRALinear.forward computes the same
    "nf4": "quantize_nf4",            # c_b = max |w_i|, q_i = argmin_j |w_i / c_b - code_j|
    "paligemma": "prefix_lm_mask",    # full attention over image + prompt, causal over the answer
    "flow_matching": "icfm_path",     # x_t = t x1 + (1 - t) x0, u_t = x1 - x0: the regression target of L_CFM
    "rouge": "score_ngrams",          # ROUGE-N, Lin 2004 eq. 1: clipped n-gram overlap
    "vlm_train": "LinearConnector",   # u = W z + b, "the only new part" (the first of the five connectors)
}
CORE_LINE_LIMIT = 150


def definition_line(path, dotted_name):
    """Line of the `def` / `class` statement named "f", "C" or "C.method" in a file, None if absent."""
    body = ast.parse(path.read_text()).body
    node = None
    for part in dotted_name.split("."):
        node = next((n for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            return None
        body = node.body
    return node.lineno


def test_every_concept_file_names_its_core_equation():
    assert set(CORE_EQUATION) == set(CONCEPTS)


def configuration_lines(path, before):
    """Lines of the configuration block above line `before`: from the first top-level `...Config` class
    to the last `...Config` class, PRESETS or CONNECTOR_DEFAULTS table, comments between them included (0 without one)."""
    body = [n for n in ast.parse(path.read_text()).body if n.lineno < before]
    config = [n for n in body if (isinstance(n, ast.ClassDef) and n.name.endswith("Config"))
              or (isinstance(n, ast.Assign) and any(getattr(t, "id", "") in ("PRESETS", "CONNECTOR_DEFAULTS") for t in n.targets))]
    if not config:
        return 0
    first = min(n.lineno - len(n.decorator_list) if isinstance(n, ast.ClassDef) else n.lineno for n in config)
    return max(n.end_lineno for n in config) - first + 1


@pytest.mark.parametrize("name", PRESENT)
def test_core_equation_within_150_lines(name):
    """Docstring, then the core math: the code of the docstring's main equation starts within 150 lines.
    A configuration block may come first (dataclass configs and presets, as nanoGPT and nanoVLM open
    with theirs); its lines do not count, so a file need not put its recipe below its model to pass."""
    path = ROOT / f"{name}.py"
    line = definition_line(path, CORE_EQUATION[name])
    assert line is not None, f"{name}.py has no def/class {CORE_EQUATION[name]}"
    counted = line - configuration_lines(path, line)
    assert counted <= CORE_LINE_LIMIT, (f"{name}.py: {CORE_EQUATION[name]} starts at line {line}, "
                                        f"{counted} lines after the configuration, more than {CORE_LINE_LIMIT}")


@pytest.mark.parametrize("name", PRESENT)
def test_every_public_function_of_every_file_has_type_hints(name):
    """One style for the whole repo: every public function and method states its parameter and return
    types, and every hint names something real (tests/test_clip.py's `unannotated`)."""
    import importlib

    from test_clip import unannotated
    assert unannotated(importlib.import_module(name)) == []


def parameter_counts(path):
    """{"f" or "C.method": parameters} of every def in a file, nested ones included; self and cls are
    not counted (the object a method belongs to is not an argument a caller writes), *args and
    **kwargs count one each."""
    counts = {}

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = child.args
                names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
                n = len(names) + (a.vararg is not None) + (a.kwarg is not None)
                n -= bool(names) and names[0] in ("self", "cls") and isinstance(node, ast.ClassDef)
                counts[prefix + child.name] = n
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(ast.parse(path.read_text()), "")
    return counts


# Six parameters is a lot (nanoGPT's most is four): what a run needs beyond them (its folders, resume,
# logging, test hooks) travels in one object, vlm_train.Run, not through every signature.
MAX_PARAMETERS = {"clip": 6, "vlm_train": 6}


@pytest.mark.parametrize("name", sorted(MAX_PARAMETERS))
def test_no_function_takes_more_than_six_parameters(name):
    counts = parameter_counts(ROOT / f"{name}.py")
    assert counts, f"{name}.py defines no functions"
    over = {f: n for f, n in counts.items() if n > MAX_PARAMETERS[name]}
    assert not over, f"{name}.py: functions with more than {MAX_PARAMETERS[name]} parameters: {over}"


def test_parameter_counts_count_what_a_caller_writes(tmp_path):
    source = tmp_path / "example.py"
    source.write_text("def f(a, b=1, *c, d, **e):\n    def g(x): pass\n"
                      "class C:\n    def m(self, a): pass\n    @classmethod\n    def k(cls): pass\n")
    assert parameter_counts(source) == {"f": 5, "f.g": 1, "C.m": 1, "C.k": 0}


def test_ruff_finds_no_pyflakes_errors():
    """Undefined names, unused imports or variables and empty f-strings, in every root file, test and
    benchmark: `ruff check` with the configuration in pyproject.toml."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
