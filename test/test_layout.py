"""The tree is the architecture: pure floors import no SGLang, no symlinks, wheels hold the product only,
and the README's "Where things are" table names folders that exist and covers the package."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "python" / "sglang_fairkv"
#: folders whose modules must not import SGLang (the adapters above them do)
PURE = [PKG / "placement", PKG / "compress", PKG / "kv", PKG / "telemetry", REPO / "kernels" / "sglang_fairkv_kernels"]


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", PURE, ids=lambda p: p.name)
def test_pure_floors_import_no_sglang_and_no_adapter(folder):
    for f in folder.rglob("*.py"):
        bad = {m for m in _imports(f) if m == "sglang" or m.startswith("sglang.")}
        assert not bad, f"{f.relative_to(REPO)} imports {bad}"
        text = f.read_text()
        assert "from ..serving" not in text and "from ..attention" not in text and "from ..model" not in text, \
            f"{f.relative_to(REPO)} imports an adapter floor"


def test_the_model_floor_does_not_import_the_serving_floor():
    """The model classes get their rank plan from a provider the serving floor installs
    (``model/plan_source.py``): the one owner of the current plan is ``serving/server_plan``."""
    for f in (PKG / "model").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                assert not (mod.startswith("..serving") or mod.startswith("sglang_fairkv.serving")), \
                    f"{f.relative_to(REPO)} imports {mod}"


def test_patches_import_nothing_of_the_project():
    for f in (REPO / "patches" / "sglang_fairkv_patches").rglob("*.py"):
        assert not any(m.startswith("sglang_fairkv") and m != "sglang_fairkv_patches" and
                       not m.startswith("sglang_fairkv_patches.") for m in _imports(f)), f


def test_no_symlinks_in_the_tree():
    out = subprocess.run(["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    links = [line.split("\t", 1)[1] for line in out.splitlines() if line.startswith("120000")]
    assert not links, links


def test_wheels_hold_the_product_only(tmp_path):
    # built from copies of the tracked files: an in-tree build would reuse a stale build/ folder
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "python", "kernels", "patches"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    for f in tracked:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, src / f)
    out = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", str(out), str(src / "python"), str(src / "kernels"), str(src / "patches")],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    wheels = {w.name.split("-")[0]: w for w in out.glob("*.whl")}
    assert set(wheels) == {"sglang_fairkv", "sglang_fairkv_kernels", "sglang_fairkv_patches"}
    for name, w in wheels.items():
        files = [f for f in zipfile.ZipFile(w).namelist() if ".dist-info/" not in f]
        assert files and all(f.startswith(name + "/") for f in files), (name, files)
        assert not [f for f in files if re.search(r"device|bench|check_pool|test", f)], (name, files)
    kernel_files = zipfile.ZipFile(wheels["sglang_fairkv_kernels"]).namelist()
    assert "sglang_fairkv_kernels/ragged_decode.py" in kernel_files and "sglang_fairkv_kernels/ragged_torch.py" in kernel_files
    assert "sglang_fairkv_patches/cpu_path/sgl_kernel/__init__.py" in zipfile.ZipFile(wheels["sglang_fairkv_patches"]).namelist()


def _readme_table() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Where things are", 1)[1].split("\n## ", 1)[0]
    return [m.group(1) for m in re.finditer(r"^\| `([^`]+)`", section, re.M)]


def test_readme_table_matches_the_tree():
    rows = _readme_table()
    for row in rows:
        for part in row.replace("`, `", ", ").split(", "):
            if "*" in part:
                assert list(REPO.glob(part)), part
            else:
                assert (REPO / part).exists(), f"README names {part}, which does not exist"
    named = {Path(r) for r in rows}
    for sub in sorted(p for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        assert sub.relative_to(REPO) in named, f"README's table does not name {sub.relative_to(REPO)}/"
    for top in ("kernels", "patches", "benchmark", "test"):
        assert any(r == top or r.startswith(top + "/") for r in rows), top


def test_readme_first_screen_says_what_it_is_in_60_lines():
    """What a newcomer reads before scrolling: the two commands, the curl of ``/server_info``'s fairkv
    section, the measured headline figures with their machine and a link to RESULTS, what has not run
    on a GPU, and a table of contents -- in at most 60 lines."""
    text = (REPO / "README.md").read_text()
    first = text[:text.index("## What is there today")]
    assert first.count("\n") <= 60, first.count("\n")
    for needle in ("make serve", "make test", "/server_info", "capacity", "benchmark/RESULTS.md", "CPU dev machine",
                   "Not yet run on a GPU", "**Contents**", "docs/DESIGN.md"):
        assert needle in first, needle
