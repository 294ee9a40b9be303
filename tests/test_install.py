"""What `pip install .` gives a user: every package folder and the shipped recipes inside the
wheel, every imported distribution declared, and the CLI working from another folder on the
installed (not editable) package. `make check-install` repeats the last check in a fresh venv
with every dependency installed from the registry."""
import ast
import os
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders():
    return sorted(".".join(p.parent.relative_to(ROOT).parts) for base in ("dinotxt", "curation")
                  for p in (ROOT / base).rglob("__init__.py"))


def test_every_package_folder_is_listed_for_the_wheel():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    assert set(_package_folders()) <= listed, sorted(set(_package_folders()) - listed)
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["dinotxt.recipes"] == "recipes"


def _imported_modules():
    """Top-level names imported anywhere in dinotxt/ and curation/ (inside functions too)."""
    names = set()
    for base in ("dinotxt", "curation"):
        for path in (ROOT / base).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"dinotxt", "curation"}


def _requirement_name(req: str) -> str:
    for sep in "<>=!~[;( ":
        req = req.split(sep)[0]
    return req.strip().lower().replace("_", "-")


def test_every_imported_distribution_is_declared():
    project = PYPROJECT["project"]
    declared = {_requirement_name(r) for r in project["dependencies"]}
    for extra in project.get("optional-dependencies", {}).values():
        declared |= {_requirement_name(r) for r in extra}
    dists = packages_distributions()
    missing = {}
    for module in sorted(_imported_modules()):
        candidates = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
        # faiss is declared as faiss-cpu / faiss-gpu-cu12 (either distribution provides the module)
        if module == "faiss":
            candidates |= {"faiss-cpu", "faiss-gpu-cu12"}
        if not candidates & declared:
            missing[module] = sorted(candidates)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel `pip install .` builds, installed without its dependencies (they are in this venv)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"  # a copy: building in place would leave build/ in the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                 "__pycache__", ".pytest_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(work / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    wheel = next((work / "dist").glob("dinotxt-*.whl"))
    target = work / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return target


@pytest.mark.slow
def test_installed_cli_runs_a_shipped_recipe_by_name_from_another_folder(installed, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(installed), PYTHONWARNINGS="ignore")

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)

    where = run("-c", "import dinotxt; print(dinotxt.__file__)")
    assert where.stdout.strip().startswith(str(installed)), where.stdout + where.stderr  # not the source tree
    assert (installed / "dinotxt" / "recipes" / "demo.yaml").is_file()
    assert run("-m", "dinotxt.cli", "demo", "--help").returncode == 0
    models = run("-m", "dinotxt.cli", "models")
    assert models.returncode == 0 and "dinotxt_vitl14_reg4" in models.stdout
    trained = run("-m", "dinotxt.cli", "train", "debug", "optim.max_steps=2", "trainer.val_every_n_steps=0",
                  "trainer.checkpoint_every_n_steps=0", "data.world.num_train=32", "data.world.num_eval=0",
                  "data.world.samples_per_shard=32", "data.num_workers=0", "eval.zeroshot_dir=null")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "runs" / "debug" / "checkpoint" / "model.safetensors").is_file()


BLOCK_EXTRAS = '''
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    """As if only the core were installed: the [train] / [curate] packages cannot be imported."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("lightning", "pytorch_lightning", "faiss", "matplotlib", "pyarrow", "tensorboard"):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, Absent())
'''


@pytest.mark.slow
def test_the_core_install_loads_classifies_and_segments_without_lightning_or_faiss(tmp_path):
    """`pip install .` without extras: a checkpoint loads and serves inference; a training command says
    which extra it needs in one line."""
    import dinotxt
    from test_checkpoint import CAPTIONS, hand_built

    tok = dinotxt.train_tokenizer(CAPTIONS * 4, vocab_size=64, context_length=16)
    dinotxt.save_checkpoint(tmp_path / "ckpt", hand_built(tok), tok)
    code = BLOCK_EXTRAS + f'''
import torch, dinotxt
from PIL import Image
model, transform, tok = dinotxt.load({str(tmp_path / "ckpt")!r})
clf = dinotxt.zero_shot_classifier(model, tok, ["red circle", "blue star"], ["a photo of a {{}}."])
probs = (model.encode_image(transform(Image.new("RGB", (64, 64), (200, 20, 20)))[None], normalize=True) @ clf.t())
seg = dinotxt.segment(model, tok, Image.new("RGB", (60, 44)), ["cat", "sky"], templates="simple", short_side=56)
bad = [m for m in ("lightning", "faiss", "matplotlib", "pyarrow") if m in sys.modules]
print(tuple(probs.shape), tuple(seg.labels.shape), bad)
from dinotxt.cli import main
sys.exit(main(["train", "debug"]))
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert "(1, 2) (44, 60) []" in out.stdout, out.stdout + out.stderr
    assert out.returncode == 2 and out.stderr.strip() == ("dinotxt: error: dinotxt train needs the [train] extra "
                                                          "(missing: lightning, tensorboard, matplotlib): "
                                                          "pip install 'dinotxt[train]'"), out.stderr


def test_the_command_line_answers_help_without_importing_torch():
    code = ("import sys, time; t = time.perf_counter(); from dinotxt.cli import build_parser; build_parser(); "
            "print(round(time.perf_counter() - t, 3), [m for m in ('torch', 'timm', 'omegaconf') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    seconds, loaded = out.stdout.split(" ", 1)
    assert loaded.strip() == "[]", out.stdout + out.stderr
    assert float(seconds) < 0.5  # a whole interpreter starts in ~0.05 s; torch alone takes seconds
