"""scripts/setup.sh on a fresh environment: torch is installed before NumPy, and nothing it runs in between may
import torch (which then prints "Failed to initialize NumPy")."""

import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import REPO

TORCH_DEPENDENCIES = ["torch", "torchgen", "functorch", "typing_extensions.py", "sympy", "mpmath", "networkx", "jinja2",
                      "fsspec", "markupsafe", "filelock"]


@pytest.fixture
def torch_without_numpy(tmp_path):
    """A `python` that finds torch (and what torch imports) but not NumPy: the environment setup.sh sees after
    installing the torch wheel and before installing the package's dependencies."""
    import torch

    site = Path(torch.__file__).parent.parent
    packages = tmp_path / "site"
    packages.mkdir()
    for name in TORCH_DEPENDENCIES + [p.name for p in site.glob("torch-*.dist-info")]:
        if (site / name).exists():
            (packages / name).symlink_to(site / name)
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nPYTHONPATH={packages} exec {sys.executable} -S \"$@\"\n")
    python.chmod(0o755)
    check = subprocess.run([str(python), "-c", "import torch"], capture_output=True, text=True, timeout=300)
    if check.returncode != 0 or "Failed to initialize NumPy" not in check.stderr:
        pytest.skip(f"cannot reproduce torch without NumPy here: {check.stderr[-300:]}")
    return python


def test_the_torch_pin_needs_no_torch_import(torch_without_numpy, tmp_path):
    script = (REPO / "scripts" / "setup.sh").read_text()
    pin = next(line for line in script.splitlines() if re.search(r'> "\$constraints"\s*$', line))
    out = tmp_path / "constraints.txt"
    done = subprocess.run(["bash", "-c", f'set -euo pipefail; PY="$1"; constraints="$2"; {pin}', "-",
                           str(torch_without_numpy), str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no "Failed to initialize NumPy"
    assert out.read_text().strip() == "torch==" + metadata.version("torch").split("+")[0]
