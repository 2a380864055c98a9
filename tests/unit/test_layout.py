"""The shape of `worker/`: subpackages by role, imported in one direction only, and a
client that imports without the service's dependencies."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = ROOT / "worker"

#: what each part of `worker/` may import (docs/ARCHITECTURE.md draws the same layers);
#: `_environ` is the leaf that reads `LHV_*` variables
ALLOWED = {
    "_environ": set(),
    "wire": {"_environ"},
    "telemetry": set(),
    "kafka": {"_environ", "telemetry", "wire"},
    "storage": {"_environ"},
    "client": {"kafka", "wire"},
    "service": {"_environ", "kafka", "storage", "telemetry", "wire"},
    "ops": {"_environ", "kafka", "service", "storage", "telemetry", "wire"},
    "dev": {"_environ", "client", "kafka", "storage", "telemetry", "wire"},
    "cli": {"client", "dev", "kafka", "ops", "service", "storage", "telemetry", "wire"},
}

#: the service's dependencies (the `worker` extra): a client install has none of them
WORKER_ONLY = (
    "hnswlib",
    "annoy",
    "aioboto3",
    "aiobotocore",
    "botocore",
    "boto3",
    "prometheus_client",
    "fastjsonschema",
    "cramjam",
)


def _part(path: Path) -> str:
    rel = path.relative_to(WORKER)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports() -> dict[str, set[str]]:
    """part -> the other parts it imports, at module level or inside functions."""
    graph: dict[str, set[str]] = defaultdict(set)
    for path in WORKER.rglob("*.py"):
        part = _part(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = node.module.split(".")
            elif isinstance(node, ast.Import):
                names = node.names[0].name.split(".")
            else:
                continue
            if names[0] != "worker":
                continue
            targets = names[1:2] or [a.name for a in node.names]  # `from worker import x`
            graph[part].update(t for t in targets if t != part)
    return graph


def test_every_part_of_worker_imports_only_the_layers_below_it() -> None:
    graph = _imports()
    for part, targets in graph.items():
        if part == "__init__":
            assert not targets
            continue
        assert part in ALLOWED, f"worker/{part} is not placed in a layer (ALLOWED)"
        extra = targets - ALLOWED[part]
        assert not extra, f"worker/{part} imports {sorted(extra)}: not a layer below it"


def test_the_parts_of_worker_import_each_other_without_cycles() -> None:
    graph = _imports()
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, f"import cycle: {' -> '.join([*path, nxt])}"
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def _without_worker_deps(code: str) -> subprocess.CompletedProcess[str]:
    block = "; ".join(f"sys.modules[{m!r}] = None" for m in WORKER_ONLY)
    return subprocess.run(
        [sys.executable, "-c", f"import sys; {block}\n{code}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    "module", ["worker.client", "worker.cli", "worker.wire.topics", "lhv_index.errors"]
)
def test_the_client_imports_without_the_services_dependencies(module: str) -> None:
    done = _without_worker_deps(f"import {module}")
    assert done.returncode == 0, done.stderr


def test_lhv_help_works_without_the_services_dependencies() -> None:
    done = _without_worker_deps("from worker import cli; sys.exit(cli.main(['--help']))")
    assert done.returncode == 0, done.stderr
    assert "search" in done.stdout and "worker" in done.stdout


def test_an_hnsw_index_without_hnswlib_says_which_extra_to_install() -> None:
    code = (
        "from lhv_index import Index, IndexParams\n"
        "from lhv_index.errors import EngineError\n"
        "try:\n"
        "    Index('a', IndexParams(dim=2))\n"
        "except EngineError as exc:\n"
        "    print(exc)\n"
    )
    done = _without_worker_deps(code)
    assert done.returncode == 0, done.stderr
    assert "pip install 'lhv[worker]'" in done.stdout


def test_no_part_of_the_service_imports_the_worker_facade() -> None:
    """The parts of `service/` get narrow ports (service/ports.py), never the `Worker`:
    only `worker.py` itself and the package's lazy re-export name it, not even under
    `TYPE_CHECKING`."""
    service = WORKER / "service"
    offenders = []
    for path in sorted(service.glob("*.py")):
        if path.name in ("worker.py", "__init__.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = {a.name for a in node.names}
                if node.module == "worker.service.worker" or (
                    node.module == "worker.service" and ("worker" in names or "Worker" in names)
                ):
                    offenders.append(path.name)
            elif isinstance(node, ast.Import) and any(
                a.name == "worker.service.worker" for a in node.names
            ):
                offenders.append(path.name)
    assert not offenders, f"these modules of service/ import the Worker: {offenders}"


def test_paths_into_the_checkout_name_files_that_exist() -> None:
    """The local stack resolves Kafka's jars with `compose/kafka/pom.xml`, `lhv bench`
    runs `bench/bench_e2e.py`, and the schemas fall back to `schemas/`: each module finds
    them from where it sits, however deep in `worker/`."""
    from worker import cli
    from worker.dev import stack
    from worker.wire import schemas

    assert stack._POM.is_file(), stack._POM
    assert cli._BENCH_SCRIPT.is_file(), cli._BENCH_SCRIPT
    assert (schemas._CHECKOUT_SCHEMAS / "add.schema.json").is_file(), schemas._CHECKOUT_SCHEMAS


@pytest.mark.parametrize("argv", [["worker"], ["snapshot", "ls"], ["replay", "--verify"]])
def test_a_service_command_on_a_client_install_says_which_extra_to_install(
    argv: list[str],
) -> None:
    done = _without_worker_deps(f"from worker import cli; sys.exit(cli.main({argv!r}))")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().endswith("pip install 'lhv[worker]'"), done.stderr
