"""The grader on Lab 1a against a determined student: full marks for the solution and for correct code in
other styles, 0 for the blank lab, and no false pass, no grader crash and no effect on another submission
from broken, looping, tampering or isolation-breaking submissions. Each class of the issue has its attacks:
A isolation (graded before an honest submission, in one batch), B records, C weak model checks, D outputs
loaded without limits, E correct code that used to fail, F the command line."""
from __future__ import annotations

import csv
import hashlib
import json
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pytest
import torch

import transformers
from labkit import sandbox
from labkit.grade import READONLY, TAMPERING, grading_plan, misfit, rebuild, schema_file, tampering

ROOT = Path(__file__).resolve().parent.parent
SOLUTION = ROOT / "solutions" / "01a-attention-and-gpt.ipynb"
LAB = ROOT / "labs" / "01a-attention-and-gpt.ipynb"
FULL = 17  # 14 visible points + 3 hidden


def solution() -> nbformat.NotebookNode:
    return nbformat.read(SOLUTION, as_version=4)


def blank() -> nbformat.NotebookNode:
    return nbformat.read(LAB, as_version=4)


def code_cell(notebook, text: str) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.cell_type == "code" and text in c.source)


def check_cell(notebook, check_id: str) -> nbformat.NotebookNode:
    return next(c for c in notebook.cells if c.metadata.get("check", {}).get("id") == check_id)


def replace_in(notebook, text: str, old: str, new: str):
    cell = code_cell(notebook, text)
    assert old in cell.source, old
    cell.source = cell.source.replace(old, new)
    return notebook


def unscaled(notebook):
    """A wrong solution: attention without the 1/sqrt(d)."""
    return replace_in(notebook, "def scaled_dot_product_attention", " / math.sqrt(d)", "")


def insert_after_setup(notebook, source: str):
    index = next(i for i, c in enumerate(notebook.cells) if "setup" in c.metadata.get("tags", []))
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source))
    return notebook


def insert_after(notebook, text: str, source: str):
    notebook.cells.insert(notebook.cells.index(code_cell(notebook, text)) + 1, nbformat.v4.new_code_cell(source))
    return notebook


def append(notebook, source: str):
    notebook.cells.append(nbformat.v4.new_code_cell(source))
    return notebook


def edited_to_pass(notebook, check_id="01a.sdpa"):
    check_cell(notebook, check_id).source = "pass"
    return notebook


def deleted_check(notebook, check_id="01a.sdpa"):
    notebook.cells.remove(check_cell(notebook, check_id))
    return notebook


def fresh_ids_no_metadata(notebook):
    """As a notebook tool that drops metadata and renumbers cells might save it."""
    for cell in notebook.cells:
        cell.id = uuid.uuid4().hex[:8]
        cell.metadata = {}
    notebook.metadata = {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}
    return notebook


MONKEYPATCH = """
import numpy, torch
torch.allclose = lambda *a, **k: True
torch.equal = lambda *a, **k: True
torch.testing.assert_close = lambda *a, **k: None
numpy.allclose = lambda *a, **k: True
"""

SNOOP = """
import glob, os, pathlib, labkit
repo = pathlib.Path(labkit.__file__).resolve().parent.parent
seen = {}
for pattern in ("*.ipynb", "**/*.ipynb", "/tmp/**/*.ipynb", "/dev/shm/**/*.ipynb", str(repo / "**" / "*.ipynb"),
                str(repo / "hidden_checks" / "*"), str(repo / "solutions" / "*")):
    for path in glob.glob(pattern, recursive=True):
        try:
            seen[path] = pathlib.Path(path).read_text(errors="replace")
        except OSError:
            pass
hidden = [p for p, text in seen.items() if "sdpa_shapes" in text or "Hidden check" in text]
solutions = [p for p, text in seen.items() if "# BEGIN SOLUTION" in text]
raise RuntimeError(f"SNOOP hidden={len(hidden)} solutions={len(solutions)} files={len(seen)}")
"""

# The grading test listens on this port on the host's loopback; a sandboxed kernel must not reach it.
LISTENER = socket.create_server(("127.0.0.1", 0))
NETWORK = f"""
import socket
try:
    socket.create_connection(("127.0.0.1", {LISTENER.getsockname()[1]}), timeout=3).close()
    reached = True
except OSError:
    reached = False
raise RuntimeError(f"NET reached={{reached}}")
"""

HIDDEN_EDGE = "d = v.shape[-1]"  # scales by the values' width: right when d_v = d_k, as in every visible check

# ---------------------------------------------------------------- A: one submission must not reach another
SITE = Path(transformers.__file__).resolve().parent.parent
PLANTED = [SITE / "labkit_planted.pth", SITE / "labkit_planted.py", ROOT / "sitecustomize.py",
           ROOT / "labkit_planted.py", Path("/tmp/labkit_planted"), Path("/dev/shm/labkit_planted")]
LLAMA = Path(transformers.__file__).resolve().parent / "models" / "llama" / "modeling_llama.py"
PLANT = f"""
for path in {[str(p) for p in PLANTED]!r}:
    try:
        with open(path, "w") as f:
            f.write("import os; os.environ['PLANTED'] = '1'\\n")
    except OSError as error:
        print("could not plant", path, error)
try:  # make transformers' LlamaMLP, a reference of Lab 4, return zeros in the grader's next runs
    with open({str(LLAMA)!r}, "a") as f:
        f.write("\\nLlamaMLP.forward = lambda self, x: x * 0\\n")
except OSError as error:
    print("could not patch transformers", error)
"""
# The honest submission's causal_mask fails if anything planted by the attacker is visible to it. Its paths
# are in hex: the scan of the grader would flag the honest student for naming the packages folder.
PROBE = f"""
import os
_paths = [bytes.fromhex(h).decode() for h in {[str(p).encode().hex() for p in PLANTED]!r}]
_planted = [p for p in _paths if os.path.exists(p)] + (["env"] if "PLANTED" in os.environ else [])
if _planted:
    def causal_mask(T):
        raise RuntimeError(f"planted by another submission: {{_planted}}")
"""

# ---------------------------------------------------------------- B: records the check did not make
FORGE = """
import os, torch, torch.nn.functional as F
folder = os.environ["LABKIT_GRADING_DIR"]
inputs = torch.load(f"{folder}/inputs/01a.causal_mask.pt", weights_only=True)
torch.save({f"mask{T}": torch.ones(T, T, dtype=torch.bool).tril() for T in inputs["sizes"]},
           f"{folder}/outputs/01a.causal_mask.pt")
"""
TRANSFORMER = """
ip = get_ipython()
def swap(lines):  # every later cell, the grader's included, gets the right causal mask
    return [line.replace("causal_mask,", "(lambda T: __import__('torch').ones(T, T).bool().tril()),") for line in lines]
ip.input_transformers_post.append(swap)
"""
EAVESDROP = """
ip = get_ipython()
seen = []
ip.events.register("pre_run_cell", lambda info: seen.append(info.raw_cell))
"""
REFERENCES = """
from labkit.checks.references import mha
def causal_mask(T):
    return mha
"""
PATCH_RECORD = """
import labkit.recording as r
_record = r.record
def record(check_id, token, source, name, *student, forbid=()):
    return _record(check_id, token, source, name, *student, forbid=())
r.record = record
"""
DISGUISED = """
import torch
_save = torch.save
def save(obj, f, *args, **kwargs):  # strip the probes' findings from every record
    return _save({**obj, "integrity": []} if isinstance(obj, dict) and "integrity" in obj else obj, f, *args, **kwargs)
torch.save = save
hooks = getattr(get_ipython(), "input_" + "transformers_post")  # past a scan for the name
hooks.append(lambda lines: [line.replace("causal_mask,", "(lambda T: torch.ones(T, T).bool().tril()),") for line in lines])
"""

# ---------------------------------------------------------------- C and D: weak model checks, unbounded outputs
SKIPS_BLOCKS = ("        for block in self.blocks:\n            x = block(x)\n", "")
STUB_GPT = """
class GPT(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_len):
        super().__init__()
        self.max_len = max_len
        self.dummy = nn.Parameter(torch.zeros(gpt_param_count(vocab_size, d_model, n_layers, max_len)))
    def forward(self, idx):
        return torch.zeros(*idx.shape, 65 if idx.max() >= 50 else 50) + self.dummy[0]
def gpt_param_count(vocab_size, d_model, n_layers, max_len):
    return vocab_size * d_model + max_len * d_model + n_layers * (12 * d_model**2 + 13 * d_model) + 2 * d_model
"""
HUGE = """
_sdpa = scaled_dot_product_attention
def scaled_dot_product_attention(q, k, v, mask=None):
    out, weights = _sdpa(q, k, v, mask)
    if q.shape[:2] == (2, 3):  # the sdpa checks, visible and hidden, get 8 GB once made contiguous
        return torch.zeros(1).expand(2**31), weights
    return out, weights
"""
FORGE_HUGE = """
import os, torch
folder = os.environ["LABKIT_GRADING_DIR"]
torch.save({"token": "?", "outputs": {"mask1": torch.zeros(1).expand(2**34)}, "integrity": []},
           f"{folder}/outputs/01a.causal_mask.pt")
"""

# ---------------------------------------------------------------- E: correct code, in other styles too
STYLE_A = '''
def scaled_dot_product_attention(q, k, v, mask=None):
    scores = torch.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, -1e9)
    scores = scores - scores.amax(dim=-1, keepdim=True)  # a stable softmax, by hand
    weights = scores.exp() / scores.exp().sum(dim=-1, keepdim=True)
    return torch.einsum("...qk,...kd->...qd", weights, v), weights

def causal_mask(T):
    return torch.tril(torch.ones(T, T)).bool()

class MultiHeadAttention(nn.Module):
    def __init__(self, d_model, n_heads, bias=True):
        super().__init__()
        self.n_heads = n_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d_model, d_model, bias=bias) for _ in range(4))
    def forward(self, x, context=None, mask=None):
        context = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.n_heads, -1)).permute(0, 2, 1, 3)
        out, _ = scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(context)),
                                              split(self.v_proj(context)), mask)
        return self.out_proj(out.permute(0, 2, 1, 3).flatten(-2))

class FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)
    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

class DecoderBlock(nn.Module):
    def __init__(self, d_model, n_heads, d_ff):
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d_model), MultiHeadAttention(d_model, n_heads)
        self.ln2, self.ffn = nn.LayerNorm(d_model), FeedForward(d_model, d_ff)
        self.drop = nn.Dropout(0.1)
    def forward(self, x):
        x = x + self.drop(self.attn(self.ln1(x), mask=causal_mask(x.shape[1])))
        return x + self.drop(self.ffn(self.ln2(x)))

class GPT(nn.Module):
    def __init__(self, vocab_size, d_model, n_heads, n_layers, max_len):
        super().__init__()
        self.max_len = max_len
        self.tok_emb, self.pos_emb = nn.Embedding(vocab_size, d_model), nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(DecoderBlock(d_model, n_heads, 4 * d_model) for _ in range(n_layers))
        self.ln_f, self.lm_head = nn.LayerNorm(d_model), nn.Linear(d_model, vocab_size, bias=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        self.tok_emb.weight = self.lm_head.weight  # tied the other way round
    def forward(self, idx):
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))

def gpt_param_count(vocab_size, d_model, n_layers, max_len):
    return (vocab_size + max_len) * d_model + n_layers * (12 * d_model * d_model + 13 * d_model) + 2 * d_model

@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None):
    for _ in range(max_new_tokens):
        logits = model(idx[:, -model.max_len:])[:, -1] / temperature
        if top_k is not None:
            logits = torch.where(logits < logits.topk(top_k).values[:, [-1]], -torch.inf, logits)
        idx = torch.cat([idx, torch.distributions.Categorical(logits=logits).sample()[:, None]], dim=1)
    return idx
'''
STYLE_B = [  # (a line of the solution, the same computation written another way)
    ("    scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # (..., T_q, T_k)",
     "    q = q / math.sqrt(d)  # scale q first\n    scores = q @ k.transpose(-2, -1)"),
    ('        scores = scores.masked_fill(~mask, float("-inf"))',
     "        scores = scores.masked_fill(mask.logical_not(), torch.finfo(scores.dtype).min)"),
    ("        return x.view(B, T, self.n_heads, self.d_head).transpose(1, 2)",
     "        return x.reshape(B, T, self.n_heads, self.d_head).permute(0, 2, 1, 3)"),
]


def style_b():
    notebook = solution()
    for old, new in STYLE_B:
        next(c for c in notebook.cells if c.cell_type == "code" and old in c.source).source = \
            next(c for c in notebook.cells if c.cell_type == "code" and old in c.source).source.replace(old, new)
    return notebook


def merged_check_cells():
    """Each check call appended to the exercise cell before it, as merging cells does; the check cells gone."""
    notebook = solution()
    for cell in [c for c in notebook.cells if "check" in c.metadata]:
        previous = notebook.cells[notebook.cells.index(cell) - 1]
        if previous.cell_type == "code":
            previous.source += "\n" + cell.source
            notebook.cells.remove(cell)
    return notebook


def copied_check_metadata():
    notebook = solution()
    code_cell(notebook, "class MultiHeadAttention").metadata["check"] = dict(check_cell(notebook, "01a.mha").metadata["check"])
    return notebook


# name -> (a notebook or raw text, the expected score: a number, a set of allowed numbers, or "<" for
# "less than full"), and whether the submission must be flagged. A scratch cell that loops, allocates or
# prints too much costs nothing by itself: the checks after it still run (nbval interrupts the loop).
CASES = {
    "01_blank_lab": (blank, 0, False),
    "02_correct": (solution, FULL, False),
    "03_correct_check_edited_to_pass": (lambda: edited_to_pass(solution()), FULL, False),
    "04_wrong_check_edited_to_pass": (lambda: edited_to_pass(unscaled(solution())), "<", False),
    "05_wrong_check_deleted": (lambda: deleted_check(unscaled(solution())), "<", False),
    "06_wrong_with_monkeypatched_comparisons": (lambda: insert_after_setup(unscaled(solution()), MONKEYPATCH), "<", False),
    "07_snoops_for_hidden_checks": (lambda: insert_after_setup(solution(), SNOOP), 0, True),  # flagged: /dev/shm
    "08_infinite_loop": (lambda: insert_after_setup(solution(), "while True:\n    pass"), FULL, False),
    "09_loop_ignoring_sigint": (lambda: insert_after_setup(
        solution(), "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass"), 0, False),
    # In the sandbox the parent is PID 1 of its namespace and survives; unsandboxed, the run stops
    # there and the hidden checks after it score 0. Both are honest results.
    "10_kills_its_parent": (lambda: append(solution(), "import os\nos.kill(os.getppid(), 9)"), {FULL, FULL - 3}, False),
    "11_allocates_50GB": (lambda: insert_after_setup(
        solution(), "import torch\nx = torch.empty(50 * 2**30, dtype=torch.uint8)\nx.fill_(1)"), FULL, False),
    "12_prints_100MB": (lambda: insert_after_setup(solution(), "print('x' * 100_000_000)"), FULL, False),
    "13_invalid_json": (lambda: '{"cells": [', 0, False),
    "14_notebook_of_another_lab": (lambda: _other_lab(), 0, False),
    "15_fails_a_hidden_edge_case": (lambda: _hidden_edge(), FULL - 1, False),
    "16_fresh_ids_no_metadata": (lambda: fresh_ids_no_metadata(solution()), FULL, False),
    "17_reaches_for_the_network": (lambda: insert_after_setup(solution(), NETWORK), FULL, False),
    # B: records that the check did not make, and ways to tamper with the cells that follow
    "b1_forges_a_record": (lambda: insert_after_setup(blank(), FORGE), 0, True),
    "b2_input_transformer": (lambda: insert_after_setup(blank(), TRANSFORMER), 0, True),
    "b3_eavesdrops_on_cells": (lambda: insert_after_setup(solution(), EAVESDROP), 0, True),
    "b4_imports_the_references": (lambda: insert_after(blank(), "def causal_mask", REFERENCES), 0, True),
    "b5_patches_the_recorder": (lambda: insert_after_setup(solution(), PATCH_RECORD), 0, True),
    "b6_disguised_transformer_and_save": (lambda: insert_after_setup(blank(), DISGUISED), 0, True),
    # C: wrong models that only shapes and causality would have let through
    "c1_gpt_skips_its_blocks": (lambda: replace_in(solution(), "class GPT", *SKIPS_BLOCKS), "<", False),
    "c2_stub_gpt": (lambda: insert_after(blank(), "def generate", STUB_GPT), 0, False),
    # D: outputs that would blow up the grader
    "d1_huge_outputs": (lambda: insert_after(solution(), "def scaled_dot_product_attention", HUGE), FULL - 3, False),
    "d2_forged_huge_record": (lambda: insert_after_setup(blank(), FORGE_HUGE), 0, True),
    # E: correct code that used to fail, and correct code in other styles
    "e1_check_calls_in_exercise_cells": (merged_check_cells, FULL, False),
    "e2_comment_mentions_a_check": (lambda: replace_in(solution(), "def causal_mask", '"""(T, T)', '# labkit.check(' \
        '"01a.causal_mask", causal_mask) comes next\n    """(T, T)'), FULL, False),
    "e3_copied_check_metadata": (copied_check_metadata, FULL, False),
    "e4_style_einsum_dropout_categorical": (lambda: insert_after(solution(), "def generate", STYLE_A), FULL, False),
    "e5_style_q_first_finfo_permute": (style_b, FULL, False),
}


def _other_lab():
    notebook = solution()
    notebook.metadata["labkit"] = {"lab": "02"}
    return notebook


def _hidden_edge():
    return replace_in(solution(), "def scaled_dot_product_attention", "d = q.shape[-1]", HIDDEN_EDGE)


def grade(folder: Path, out: Path, *extra: str, timeout: int = 1500) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "labkit.grade", str(folder), "--lab", "01a", "--out", str(out),
                          "--cell-timeout", "40", "--timeout", "240", "--memory-gb", "6", *extra],
                         capture_output=True, text=True, timeout=timeout)
    return run, time.perf_counter() - start


def write(folder: Path, cases: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, (make, *_) in cases.items():
        made = make()
        (folder / f"{name}.ipynb").write_text(made if isinstance(made, str) else nbformat.writes(made))


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    folder, out = tmp_path_factory.mktemp("submissions"), tmp_path_factory.mktemp("reports")
    write(folder, CASES)
    run, seconds = grade(folder, out, "--workers", "2")
    results = {name: json.loads((out / name / "results.json").read_text()) for name in CASES}
    return run, results, out, seconds


def test_grader_finishes_and_prints_the_summary(graded):
    run, _, _, seconds = graded
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Traceback" not in run.stdout + run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.endswith("failed") and " passed, " in last
    print(f"graded {len(CASES)} submissions in {seconds:.0f} s")


@pytest.mark.parametrize("name", CASES)
def test_expected_score_and_flag(graded, name):
    _, results, _, _ = graded
    result, (_, expected, flagged) = results[name], CASES[name]
    assert sum(t["max_score"] for t in result["tests"]) == FULL
    summary = {t["name"]: t["output"][:150] for t in result["tests"] if t["score"] < t["max_score"]}
    if expected == "<":
        assert FULL - 1 > result["score"], f"false pass: {name} scored {result['score']}"
    elif isinstance(expected, set):
        assert result["score"] in expected, f"{name}: {result['score']} not in {expected}; failed: {summary}"
    else:
        assert result["score"] == expected, f"{name}: {result['score']} != {expected}; failed: {summary}"
    assert bool(result["labkit"]["integrity"]) == flagged, result["labkit"]["integrity"]
    assert ("integrity: " in result["output"]) == flagged


def test_gradescope_format(graded):
    _, results, _, _ = graded
    for result in results.values():
        assert set(result) >= {"score", "tests", "output"}
        for test in result["tests"]:
            assert set(test) >= {"name", "score", "max_score", "output", "visibility"}
            assert test["visibility"] in ("visible", "after_published")


def test_reasons_are_clear(graded):
    _, results, _, _ = graded
    outputs = lambda name: {t["name"]: t["output"] for t in results[name]["tests"]}
    assert "not a readable JSON notebook" in results["13_invalid_json"]["output"]
    assert "notebook of lab 02, not of lab 01a" in results["14_notebook_of_another_lab"]["output"]
    assert "NotImplementedError" in outputs("01_blank_lab")["01a.sdpa"]
    assert "timed out" in outputs("09_loop_ignoring_sigint")["01a.sdpa"]
    assert "NO 1/sqrt(d) scaling" in outputs("06_wrong_with_monkeypatched_comparisons")["01a.sdpa"]
    hidden = {t["name"]: t for t in results["15_fails_a_hidden_edge_case"]["tests"]}
    assert hidden["01a.hidden.sdpa_shapes"]["score"] == 0 and hidden["01a.hidden.sdpa_shapes"]["visibility"] == "after_published"
    assert "GPT-2 with no blocks" in outputs("c1_gpt_skips_its_blocks")["01a.gpt"]
    assert "01a.causal_mask: a record that its check cell did not make" in results["b1_forges_a_record"]["labkit"]["integrity"]
    assert "input transformers" in " ".join(results["b6_disguised_transformer_and_save"]["labkit"]["integrity"])
    assert "reaches into the grading machinery" in " ".join(results["b5_patches_the_recorder"]["labkit"]["integrity"])
    assert "pending review" in outputs("b3_eavesdrops_on_cells")["01a.sdpa"]


def test_a_timed_out_cell_is_reported(graded):
    _, _, out, _ = graded
    assert "Timeout of 40 seconds exceeded" in (out / "08_infinite_loop" / "log.txt").read_text()


def test_no_network_in_the_sandbox(graded):
    _, _, out, _ = graded
    log = (out / "17_reaches_for_the_network" / "log.txt").read_text()
    assert "NET reached=False" in log, log[-2000:]


def test_memory_is_capped(graded):
    _, _, out, _ = graded
    assert "can't allocate memory" in (out / "11_allocates_50GB" / "log.txt").read_text()


def test_snooping_finds_neither_hidden_checks_nor_solutions(graded):
    _, results, out, _ = graded
    log = (out / "07_snoops_for_hidden_checks" / "log.txt").read_text()
    assert "SNOOP hidden=0 solutions=0" in log, log[-2000:]
    assert results["07_snoops_for_hidden_checks"]["labkit"]["sandbox"].startswith("unshare")


def test_scores_csv(graded):
    _, _, out, _ = graded
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert {r["submission"] for r in rows} == set(CASES)
    correct = next(r for r in rows if r["submission"] == "02_correct")
    assert float(correct["total"]) == FULL and float(correct["01a.sdpa"]) == 2 and correct["integrity"] == ""
    assert next(r for r in rows if r["submission"] == "b1_forges_a_record")["integrity"]
    assert len({r["seed"] for r in rows}) == 1 and rows[0]["seed"].isdigit()


# ---------------------------------------------------------------- A: isolation, an attacker then an honest student
def test_an_attacker_cannot_change_the_next_submission_or_the_grader(tmp_path):
    _, description = sandbox.namespace_prefix(tmp_path, [], READONLY)
    if not description.startswith("unshare"):  # unsandboxed, the attack would damage this environment
        pytest.skip(f"no sandbox here ({description})")
    original = LLAMA.read_bytes()
    before = hashlib.sha256(original).hexdigest()
    cases = {"1_attacker": (lambda: insert_after_setup(blank(), PLANT),),
             "2_honest": (lambda: insert_after(solution(), "def causal_mask", PROBE),)}
    write(tmp_path / "subs", cases)
    run, _ = grade(tmp_path / "subs", tmp_path / "out", "--workers", "1", "--seed", "7")
    planted = [p for p in PLANTED if p.exists()]
    for path in planted:  # so that a broken sandbox fails this test only, not every test after it
        path.unlink()
    changed = LLAMA.read_bytes() != original
    if changed:
        LLAMA.write_bytes(original)
    assert run.returncode == 0, run.stderr[-3000:]
    honest = json.loads((tmp_path / "out" / "2_honest" / "results.json").read_text())
    assert honest["score"] == FULL, [t["output"][:200] for t in honest["tests"] if not t["score"]]
    assert not changed and hashlib.sha256(LLAMA.read_bytes()).hexdigest() == before, "the attacker changed transformers"
    assert not planted, "the attacker planted files outside its sandbox"
    assert honest["labkit"]["seed"] == 7


# ---------------------------------------------------------------- F: the command line
def test_a_lab_is_named_by_id_or_notebook_and_an_unknown_one_refused(tmp_path):
    write(tmp_path / "subs", {"blank": (blank,)})
    for lab in ("99", "01a-nonsense"):
        run = subprocess.run([sys.executable, "-m", "labkit.grade", str(tmp_path / "subs"), "--lab", lab,
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2 and f"no lab '{lab}'" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("make", [lambda t: t / "empty", lambda t: t / "missing"], ids=["empty folder", "no such path"])
def test_nothing_to_grade_is_an_error(tmp_path, make):
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, "-m", "labkit.grade", str(make(tmp_path)), "--lab", "01a",
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("labkit.grade: "), run.stderr


def test_reports_of_same_named_files_never_collide(tmp_path):
    """nbgrader's submitted/<student>/<assignment>/<name>.ipynb, a notebook beside a .json of its name, a
    README, and a lone surrogate in a markdown cell; graded by the lab notebook's name."""
    subs = tmp_path / "submitted"
    for student in ("alice", "bob"):
        write(subs / student / "lab01a", {"01a-attention-and-gpt": (blank,)})
    weird = json.loads(nbformat.writes(blank()))
    weird["cells"][0]["source"] = "".join(weird["cells"][0]["source"]) + " \ud800"  # cannot be written as UTF-8
    (subs / "carol.ipynb").write_text(json.dumps(weird))  # ASCII, with the surrogate as an escape
    (subs / "carol.json").write_text("{}")
    (subs / "README.txt").write_text("hello")
    run = subprocess.run([sys.executable, "-m", "labkit.grade", str(subs), "--lab", "01a-attention-and-gpt",
                          "--out", str(tmp_path / "out"), "--workers", "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped" in run.stdout and "README.txt" in run.stdout and "carol.json" in run.stdout
    rows = {r["submission"]: r for r in csv.DictReader((tmp_path / "out" / "scores.csv").open())}
    assert set(rows) == {"alice/lab01a/01a-attention-and-gpt", "bob/lab01a/01a-attention-and-gpt", "carol"}
    carol = json.loads((tmp_path / "out" / "carol" / "results.json").read_text())
    assert carol["labkit"]["status"] == "graded" and len(carol["tests"]) == len(grading_plan("01a").cells) and carol["score"] == 0


# ---------------------------------------------------------------- the static scan: no false flags
@pytest.mark.parametrize("path", sorted((ROOT / "solutions").glob("*.ipynb")), ids=lambda p: p.stem)
def test_no_solution_is_flagged(path):
    notebook = nbformat.read(path, as_version=4)
    assert tampering(rebuild(notebook, notebook, [])) == []


def test_correct_styles_are_not_flagged_and_tampering_is():
    for notebook in (insert_after(solution(), "def generate", STYLE_A), style_b(), merged_check_cells()):
        assert tampering(rebuild(notebook, notebook, [])) == []
    for source in (FORGE, TRANSFORMER, EAVESDROP, REFERENCES, PATCH_RECORD, "import sys\nsys.settrace(None)",
                   "import torch\nwith torch._C.DisableTorchFunction(): pass"):
        notebook = insert_after_setup(solution(), source)
        assert tampering(rebuild(notebook, notebook, [])), source
    assert len(TAMPERING) >= 6


@pytest.mark.parametrize("lab", sorted(p.name.split("-")[0] for p in (ROOT / "solutions").glob("*.ipynb")))
def test_every_check_has_the_schema_of_its_collect(lab):
    """``make schemas`` writes them; rerun it after changing a collect."""
    assert set(json.loads(schema_file(lab).read_text())) == set(grading_plan(lab).checks)


def test_records_unlike_what_collect_returns_are_refused():
    schema = json.loads(schema_file("01a").read_text())["01a.causal_mask"]
    masks = {f"mask{T}": torch.ones(T, T, dtype=torch.bool).tril() for T in (1, 4, 9)}
    assert misfit(masks, schema) == ""
    assert misfit(masks | {"mask4": {"raised": "TypeError: ..."}, "mask9": None}, schema) == ""  # verify reports these
    assert "keys" in misfit(masks | {"extra": torch.zeros(1)}, schema)
    assert "3 axes, not 2" in misfit(masks | {"mask4": torch.ones(1, 4, 4, dtype=torch.bool)}, schema)
    assert "a floating dtype, not integer" in misfit(masks | {"mask4": torch.ones(4, 4)}, schema)
    assert "far more than 81" in misfit(masks | {"mask9": torch.ones(9, 2**20, dtype=torch.bool)}, schema)
    assert "a list, where collect returns a tensor" in misfit(masks | {"mask1": [True]}, schema)
