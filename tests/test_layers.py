"""One direction of dependencies: core <- services <- deployment.

The core library (`memlong`, its gRPC plumbing `memlong.rpc` and generated code included) never imports
a service or the deployment; a service never imports the deployment. Checked on the source with `ast`,
so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# Deployment: assembles and runs the services; may import anything.
DEPLOYMENT = ("memlong.deploy", "memlong.cli", "memlong.client_cli", "memlong.demo")
# Old names kept as aliases of moved modules while other work lands; the rename step deletes them.
ALIASES: set[str] = set()  # old import paths kept as re-exports (none now)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, name: str = "") -> set[str]:
    """Absolute names of every module `path` (module `name`, default: from its path) imports, relative
    imports resolved."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def sources(top: str) -> list[Path]:
    return sorted(p for p in (REPO / top).rglob("*.py") if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def test_the_core_imports_no_service_and_no_deployment() -> None:
    bad = {}
    for path in sources("memlong"):
        name = module_name(path)
        if within(name, DEPLOYMENT):
            continue
        wrong = sorted(i for i in imports(path) if within(i, ("services", *DEPLOYMENT)))
        if wrong:
            bad[name] = wrong
    assert not bad, f"core modules importing services or deployment: {bad}"


def test_services_import_no_deployment() -> None:
    bad = {}
    for path in sources("services"):
        name = module_name(path)
        if name in ALIASES:
            continue
        wrong = sorted(i for i in imports(path) if within(i, DEPLOYMENT))
        if wrong:
            bad[name] = wrong
    assert not bad, f"services importing the deployment: {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """A function-level import of a service from a core module is caught (the walk is not vacuous)."""
    core = tmp_path / "probe.py"
    core.write_text("def f():\n    from services.retmem import server\n    from .deploy import stack\n")
    found = imports(core, "memlong.probe")
    assert {"services.retmem", "memlong.deploy", "memlong.deploy.stack"} <= found
    assert any(within(i, ("services", *DEPLOYMENT)) for i in found)
