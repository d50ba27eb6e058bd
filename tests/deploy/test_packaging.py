"""The wheel carries what the installed program needs: built from the sources at test time (offline,
no build isolation), unpacked away from the checkout, and used from there."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[2]

# Run by the unpacked wheel's interpreter path only: nothing may come from the checkout.
CHECK = """
import sys
from pathlib import Path
site = Path(sys.argv[1]).resolve()
sys.path.insert(0, str(site))
import memlong.packages, memlong.train
import memlong.services.retmem.server, memlong.services.gateway.server, memlong.deploy.stack
assert Path(memlong.services.retmem.server.__file__).resolve().is_relative_to(site)
from memlong.eval.icl import ICLSettings, load_task
assert Path(memlong.train.__file__).resolve().is_relative_to(site), memlong.train.__file__
assert (memlong.train.DEFAULT_ADAPTER / "adapter.safetensors").is_file()
assert memlong.train.resolve_adapter("smollm2-135m-lora-no-memory").is_relative_to(site)
settings = ICLSettings()
assert Path(settings.data_dir).is_relative_to(site)
for task in ("sst-2", "mr", "sst-5", "subj"):
    pool, test = load_task(Path(settings.data_dir), task, settings)
    assert len(test) == settings.test_examples and len(pool) > settings.local_demos + settings.memory_demos
print("ok")
"""


def test_an_installed_wheel_finds_the_shipped_adapters_and_icl_data(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    for package in ("memlong", "services"):
        shutil.copytree(REPO / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", ".", "-w", "out"],
        cwd=src,
        check=True,
        capture_output=True,
    )
    (wheel,) = (src / "out").glob("memlong-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for adapter in ("smollm2-135m-memlong", "smollm2-135m-lora-no-memory"):
        for name in ("adapter.json", "adapter.safetensors"):
            assert f"memlong/adapters/{adapter}/{name}" in names
    assert "memlong/eval/icl_data/sst-2/dev.tsv.gz" in names
    assert "memlong/services/retmem/server.py" in names
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"memlong"}
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    run = subprocess.run(
        [sys.executable, "-c", CHECK, str(site)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-2000:]


def test_the_package_list_covers_the_tree() -> None:
    """pyproject lists the packages by hand (the services folder installs as `memlong.services`)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = set()
    for top, installed in (("memlong", "memlong"), ("services", "memlong.services")):
        for init in (REPO / top).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / top).parts
            tree.add(".".join((installed, *rel)))
    assert listed == tree
