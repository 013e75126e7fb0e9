"""Importing distill4all leaves os.environ alone; the offline defaults are set where programs start."""

from __future__ import annotations

import os
import subprocess
import sys

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY", "TOKENIZERS_PARALLELISM")


def run_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in OFFLINE_VARS}
    return subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True)


def test_import_leaves_the_environment_alone() -> None:
    code = (
        "import os; before = dict(os.environ); import distill4all, distill4all.runtime.api, distill4all.cli; "
        "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())"
    )
    r = run_python(code)
    assert r.returncode == 0, r.stderr


def test_offline_defaults_keep_what_the_user_set() -> None:
    code = (
        "import os, distill4all; distill4all.offline_defaults(); "
        "print(os.environ['HF_HUB_OFFLINE'], os.environ['HF_HUB_DISABLE_TELEMETRY'], os.environ['TOKENIZERS_PARALLELISM'])"
    )
    assert run_python(code).stdout.split() == ["1", "1", "false"]
    assert run_python(code, HF_HUB_OFFLINE="0").stdout.split() == ["0", "1", "false"]


def test_the_cli_sets_them_before_any_command() -> None:
    code = (
        "import os, sys; from distill4all.cli import main\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ['HF_HUB_OFFLINE'], os.environ['TOKENIZERS_PARALLELISM'], file=sys.stderr)"
    )
    r = run_python(code)
    assert r.stderr.split()[-2:] == ["1", "false"], r.stderr
