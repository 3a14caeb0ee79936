"""Every requirement the install scripts take resolves from the package index alone.

A new machine has no wheel an earlier session downloaded, no local folder and no URL it can reach
besides the index, so every line of ``requirements/*.txt`` is a plain ``name==version`` pin (or a
comment), and every argument of a ``pip install`` in ``scripts/*.sh`` is a plain pin, an option, ``-r``
with a file under ``requirements/``, or ``-e`` with one of this project's own package folders
(``python``, ``kernels``, ``patches``).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: ``name==version``: PEP 508 name, a version made of release/pre/post/dev/local characters only.
PIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9][A-Za-z0-9.+!_-]*$")
#: pip options that take no value or whose value is not a requirement.
FLAG_OK = {"-q", "--quiet", "--no-deps", "--disable-pip-version-check", "-U", "--upgrade"}
#: this project's own packages, installed editable from the checkout
OWN_PACKAGES = ("python", "kernels", "patches")


def requirement_problems(text: str, source: str) -> list[str]:
    """Lines of a requirements file that are not a plain ``name==version`` pin or a comment."""
    bad = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if not PIN.match(line):
            bad.append(f"{source}:{n}: {raw.strip()!r} is not a plain name==version pin")
    return bad


def pip_install_problems(script: str, source: str) -> list[str]:
    """Arguments of ``pip install`` commands in a shell script that are not plain pins.

    Handles shell continuations and the ``"${PIP[@]}" install`` / ``python -m pip install`` forms;
    ``-r FILE`` must name a file under ``requirements/`` (checked by :func:`requirement_problems`)."""
    bad = []
    joined = re.sub(r"\\\n", " ", script)
    for n, line in enumerate(joined.splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        m = re.search(r"(?:\bpip\b|\$\{PIP\[@\]\}\"?)\s+install\s+(.*)$", code)
        if not m:
            continue
        try:
            args = shlex.split(m.group(1))
        except ValueError as e:
            bad.append(f"{source}:{n}: cannot parse {line.strip()!r}: {e}")
            continue
        i = 0
        while i < len(args):
            a = args[i]
            if a in (";", "&&", "||", "|") or a.startswith((">", "2>")):
                break
            if a in ("-r", "--requirement"):
                target = args[i + 1] if i + 1 < len(args) else ""
                if not target.startswith("requirements/") or not (REPO / target).is_file():
                    bad.append(f"{source}:{n}: -r {target!r} is not a file under requirements/")
                i += 2
                continue
            if a in ("-e", "--editable"):
                target = args[i + 1] if i + 1 < len(args) else ""
                if target not in OWN_PACKAGES:
                    bad.append(f"{source}:{n}: -e {target!r}: only this project's own packages "
                               f"({', '.join(OWN_PACKAGES)})")
                i += 2
                continue
            if a.startswith("-"):
                if a not in FLAG_OK:
                    bad.append(f"{source}:{n}: pip option {a!r} may point pip away from the index")
            elif not PIN.match(a):
                bad.append(f"{source}:{n}: {a!r} is not a plain name==version pin")
            i += 1
    return bad


def test_requirement_files_are_plain_pins():
    files = sorted((REPO / "requirements").glob("*.txt"))
    assert files, "no requirements files found"
    bad = [p for f in files for p in requirement_problems(f.read_text(), f"requirements/{f.name}")]
    assert not bad, "\n".join(bad)


def test_install_scripts_pip_arguments_are_plain_pins():
    scripts = sorted((REPO / "scripts").glob("*.sh"))
    assert scripts
    seen = sum(len(re.findall(r"\binstall\b", s.read_text())) for s in scripts)
    assert seen >= 3, "expected pip install commands in scripts/ (install.sh, kvpress_venv.sh)"
    bad = [p for s in scripts for p in pip_install_problems(s.read_text(), f"scripts/{s.name}")]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("line", [
    "sglang @ file:///tmp/dl/sglang-0.5.23-cp311-cp311-manylinux_2_34_x86_64.whl#sha256=00b3",
    "sglang @ https://example.invalid/sglang-0.5.23.whl",
    "./wheels/sglang-0.5.23.whl",
    "/tmp/dl/sglang-0.5.23.whl",
    "-e git+https://example.invalid/sglang.git#egg=sglang",
    "--find-links /tmp/dl",
    "sglang",
    "sglang>=0.5",
    "transformers>=4.56,<5.3",
])
def test_checker_rejects_what_a_new_machine_cannot_install(line):
    assert requirement_problems(f"numpy==2.4.6\n{line}\n", "r.txt"), line
    script = f'"${{PIP[@]}}" install --no-deps {shlex.quote(line)}\n'
    assert pip_install_problems(script, "s.sh"), line


def test_checker_accepts_pins_comments_and_the_scripts_forms():
    assert requirement_problems("# comment\n\nnumpy==2.4.6\ntorch==2.13.0+cpu  # local tag\n", "r") == []
    script = ('"${PIP[@]}" install torch==2.13.0\n'
              '"${PIP[@]}" install --no-deps -r requirements/cpu.txt\n'
              '"$V/bin/python" -m pip install -q --disable-pip-version-check \\\n  kvpress==0.5.5\n'
              '"${PIP[@]}" install --no-deps -e python\n')
    assert pip_install_problems(script, "s.sh") == []
