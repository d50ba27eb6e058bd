"""One direction of dependencies: core <- services <- deployment.

The core library (`memlong`, its gRPC plumbing `memlong.rpc` and generated code `memlong.api` included)
never imports a service or the deployment; a service never imports the deployment. The services live in
the `services/` folder and install as `memlong.services` (pyproject's package-dir): nothing imports a
top-level `services`. Checked on the source with `ast`, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SERVICES = ("memlong.services",)
# Deployment: assembles and runs the services; may import anything.
DEPLOYMENT = ("memlong.deploy", "memlong.cli", "memlong.client_cli", "memlong.demo")


def module_name(path: Path) -> str:
    """The installed name of the module at `path` (`services/x.py` installs as `memlong.services.x`)."""
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[0] == "services":
        parts = ("memlong", *parts)
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
        wrong = sorted(i for i in imports(path) if within(i, (*SERVICES, *DEPLOYMENT)))
        if wrong:
            bad[name] = wrong
    assert not bad, f"core modules importing services or deployment: {bad}"


def test_services_import_no_deployment() -> None:
    bad = {}
    for path in sources("services"):
        name = module_name(path)
        wrong = sorted(i for i in imports(path) if within(i, DEPLOYMENT))
        if wrong:
            bad[name] = wrong
    assert not bad, f"services importing the deployment: {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """A function-level import of a service from a core module is caught (the walk is not vacuous)."""
    core = tmp_path / "probe.py"
    core.write_text(
        "def f():\n    from memlong.services.retmem import server\n    from .deploy import stack\n"
    )
    found = imports(core, "memlong.probe")
    assert {"memlong.services.retmem", "memlong.deploy", "memlong.deploy.stack"} <= found
    assert any(within(i, (*SERVICES, *DEPLOYMENT)) for i in found)


def test_nothing_imports_a_top_level_services_package() -> None:
    """`services` is not an installed name; importing it from a checkout would load every service module
    a second time under another name."""
    bad = {}
    for top in ("memlong", "services", "tests", "bench"):
        for path in sources(top):
            wrong = sorted(i for i in imports(path, module_name(path)) if within(i, ("services",)))
            if wrong:
                bad[str(path.relative_to(REPO))] = wrong
    assert not bad, bad


def readme_architecture() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## Architecture")
    return text[start : text.index("\n## ", start)]


def test_the_readme_architecture_matches_the_tree() -> None:
    """Every path the README's architecture section names exists, and every package directly under
    memlong/ and services/ has a row of its table (itself or, for memlong/api, its generated packages)."""
    section = readme_architecture()
    diagram = section[section.index("```text") : section.index("```", section.index("```text") + 3)]
    named = set(re.findall(r"\b((?:memlong|services|proto)/[\w/.]*)", diagram))
    rows = []
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if re.fullmatch(r"memlong(\.\w+)+", name):  # an installed module name, not a path
                continue
            if "/" not in name and not (REPO / name).exists():  # a file beside the previous path's
                name = folder + name
            heads, _, tail = name.partition("{")
            names = [heads + part + tail.partition("}")[2] for part in tail.partition("}")[0].split(",")]
            rows += names if tail else [name]
            folder = name.rpartition("/")[0] + "/"
    named.update(rows)
    missing = sorted(n for n in named if not (REPO / n).exists())
    assert not missing, f"README architecture names paths that do not exist: {missing}"
    packages = [
        f"{top}/{d.name}/"
        for top in ("memlong", "services")
        for d in sorted((REPO / top).iterdir())
        if (d / "__init__.py").is_file()
    ]
    unlisted = [p for p in packages if not any(r.rstrip("/") + "/" == p or r.startswith(p) for r in rows)]
    assert not unlisted, f"packages with no row in the README's architecture table: {unlisted}"
