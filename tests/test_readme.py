"""The README's module map matches the tree: every path it names exists, and every module of dinotxt/ is
named there (itself, its folder, or a glob that covers it)."""
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _module_map() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What is implemented")
    return text[start:text.index("\n## ", start + 1)]


def _named_paths():
    return re.findall(r"`((?:dinotxt|curation|bench)/[^`]*)`", _module_map())


def test_every_path_the_module_map_names_exists():
    missing = [p for p in _named_paths() if not (list(ROOT.glob(p)) if "*" in p else (ROOT / p).exists())]
    assert not missing, f"the README's module map names paths that are not in the tree: {missing}"


def test_every_module_is_in_the_module_map():
    named = _named_paths()

    def covered(path: Path) -> bool:
        rel = path.relative_to(ROOT).as_posix()
        return any(rel == p or (p.endswith("/") and rel.startswith(p)) or ("*" in p and path.match(p))
                   for p in named)

    modules = [p for p in sorted((ROOT / "dinotxt").rglob("*.py")) if p.name != "__init__.py"]
    absent = [p.relative_to(ROOT).as_posix() for p in modules if not covered(p)]
    assert not absent, f"modules the README's module map does not name: {absent}"


def test_the_package_root_holds_folders_only_beside_the_cli():
    """A folder per layer: `ls dinotxt` shows the floors, not one-file concepts side by side."""
    files = sorted(p.name for p in (ROOT / "dinotxt").glob("*.py"))
    assert files == ["__init__.py", "cli.py"], files
