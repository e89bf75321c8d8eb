"""The golden data guard of tests/conftest.py: under CI a missing golden folder fails the run; a local run says in
its closing summary how many tests it skipped for it and how to point the tests at the folder."""

import os
import subprocess
import sys

from conftest import REPO


def run_pytest(tmp_path, ci: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(LIVEAVATAR_GOLDEN=str(tmp_path / "no-golden"), PYTHONPATH=str(REPO))
    if ci:
        env["CI"] = "true"
    # A quick module of golden tests (the scheduler rules: 4 cases, no model) and nothing else.
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_engine.py",
                           "-k", "scheduler"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_local_run_without_golden_data_says_how_many_tests_it_skipped(tmp_path):
    done = run_pytest(tmp_path, ci=False)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = done.stdout.strip().splitlines()
    line = next(line for line in summary if "golden tests skipped" in line)
    assert line.startswith("4 golden tests skipped")
    assert f"golden data folder not found at {tmp_path / 'no-golden'}" in line and "LIVEAVATAR_GOLDEN" in line
    assert summary[-1].startswith("4 skipped")


def test_ci_without_golden_data_is_an_error_not_a_skip(tmp_path):
    done = run_pytest(tmp_path, ci=True)
    assert done.returncode != 0
    message = done.stdout + done.stderr
    assert f"CI=true and the golden data folder not found at {tmp_path / 'no-golden'}" in message
    assert "LIVEAVATAR_GOLDEN" in message and "skipped" not in message
