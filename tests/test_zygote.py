"""The tests' fork server (tests/zygote.py) against `subprocess.run` of the same command lines: what a command sees
(argv, working folder, environment, PYTHONPATH's sitecustomize, a fresh session) and what comes back (stdout,
stderr, exit code, -signal when killed, a traceback for an uncaught exception) must be the same."""

import os
import subprocess
import sys

import pytest

from . import zygote
from .stages import stage_env

pytestmark = pytest.mark.slow  # starts the server: a few seconds of imports

def _both(cmd, cwd, env):
    ref = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    got = zygote.run(cmd, cwd=cwd, env=env, timeout=120)
    return ref, got


@pytest.mark.parametrize("code", ["0", "3"])
def test_argv_cwd_env_session_output_and_exit_code_as_a_real_process(tmp_path, code):
    probe = "import os, sys\n" \
            "print(sys.argv[1:], os.getcwd(), os.environ.get('PROBE'), os.getsid(0) == os.getpid(), flush=True)\n" \
            "print('to stderr', file=sys.stderr)\n" \
            "sys.exit(int(sys.argv[1]))\n"
    env = {**stage_env(), "PROBE": "value"}
    ref, got = _both([sys.executable, "-c", probe, code, "b"], tmp_path, env)
    assert (got.returncode, got.stdout, got.stderr) == (ref.returncode, ref.stdout, ref.stderr)
    assert got.returncode == int(code) and got.stdout.endswith(" value True\n")


def test_a_command_that_kills_its_group_reports_the_signal_and_spares_the_server(tmp_path):
    kill = "import os, signal; os.killpg(os.getpgrp(), signal.SIGKILL)"
    ref, got = _both([sys.executable, "-c", kill], tmp_path, stage_env())
    assert got.returncode == ref.returncode == -9
    again = zygote.run([sys.executable, "-c", "print('alive')"], cwd=tmp_path, env=stage_env(), timeout=60)
    assert again.returncode == 0 and again.stdout == "alive\n"


def test_sitecustomize_on_pythonpath_runs_and_an_uncaught_error_is_a_traceback(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['SEEN_BY_SITE'] = 'yes'\n")
    env = {**stage_env(), "PYTHONPATH": f"{site}{os.pathsep}{stage_env()['PYTHONPATH']}"}
    code = "import os\nprint(os.environ.get('SEEN_BY_SITE'))\nraise ValueError('boom')\n"
    ref, got = _both([sys.executable, "-c", code], tmp_path, env)
    assert got.stdout == ref.stdout == "yes\n" and got.returncode == ref.returncode == 1
    assert got.stderr == ref.stderr and got.stderr.endswith("ValueError: boom\n")


def test_a_module_runs_as_main_with_its_arguments(tmp_path):
    ref, got = _both([sys.executable, "-m", "pipeline.prepare", "--params", "missing.yaml"], tmp_path, stage_env())
    assert (got.returncode, got.stdout, got.stderr) == (ref.returncode, ref.stdout, ref.stderr)
    assert got.returncode == 2 and got.stderr.startswith("error: params file not found: missing.yaml")
