"""README's shell commands as a newcomer copies them: install lines that install, `bitfit-fast` command lines that
the CLI accepts, and the installed `bitfit-fast` script. (README's Python blocks run in tests/test_readme.py.)"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from bitfit_fast import cli

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S)
            for line in block.splitlines() if line.strip()]
CPU_TORCH = "pip install torch --index-url https://download.pytorch.org/whl/cpu"


def words(line: str) -> list[str]:
    """The command's words, without its comment and output redirection."""
    split = shlex.split(line, comments=True)
    return split[:split.index(">")] if ">" in split else split


def section(title: str) -> str:
    return README.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


CLI_LINES = [line for line in COMMANDS if words(line)[0] == "bitfit-fast" or "bitfit_fast.cli" in line]


def test_readme_documents_the_cli():
    assert {words(line)[1] for line in CLI_LINES if words(line)[0] == "bitfit-fast"} >= {"train", "eval", "predict",
                                                                                          "bench"}


@pytest.mark.parametrize("line", CLI_LINES)
def test_every_documented_command_line_is_accepted(line):
    args = words(line)
    args = args[1:] if args[0] == "bitfit-fast" else args[args.index("bitfit_fast.cli") + 1:]  # torchrun ... -m
    if args == ["--version"]:  # prints and exits
        with pytest.raises(SystemExit) as exit_:
            cli.build_parser().parse_args(args)
        assert exit_.value.code == 0
        return
    parsed = cli.build_parser().parse_args(args)
    conflict = getattr(parsed, "conflict", lambda _: None)(parsed)
    assert conflict is None, conflict


def test_install_lines_get_the_cpu_build_of_torch_first():
    setup = [line for line in COMMANDS if line in section("Set up and run on a fresh machine")]
    installs = [line for line in setup if line.startswith("pip install")]
    assert installs, "README's set-up section installs the package"
    for first, then in zip(installs[::2], installs[1::2]):
        assert first.startswith(CPU_TORCH) and words(then)[:3] == ["pip", "install", "-e"], (first, then)


@pytest.mark.parametrize("line", [line for line in COMMANDS if words(line)[:3] == ["pip", "install", "-e"]])
def test_the_package_install_lines_resolve(line):
    """Each documented `pip install -e ".[extra]"` names extras that pyproject.toml defines, and pip builds the
    package from it here, offline (--dry-run: nothing changes)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    target = words(line)[-1]
    extras = re.fullmatch(r"\.\[(.*)\]", target)
    defined = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras is None or set(extras.group(1).split(",")) <= set(defined), (target, sorted(defined))
    pytest.importorskip("setuptools")  # --no-build-isolation builds with this environment's setuptools
    args = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-index", "--no-build-isolation",
            *words(line)[2:]]
    process = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    assert "Would install bitfit-fast" in process.stdout


def test_the_installed_script_runs():
    script = Path(sys.executable).parent / "bitfit-fast"
    if not script.exists():
        pytest.skip("bitfit-fast is not installed as a script next to this Python (pip install -e .)")
    process = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert process.returncode == 0 and all(c in process.stdout for c in ("train", "eval", "predict", "bench"))
