"""The README and the guides in docs/ stay true to the code.

The module map: every path it names exists, and every module of dinotxt/ is named there (itself, its
folder, or a glob that covers it).

The command lines: every `dinotxt ...` command in a fenced code block of README.md or docs/*.md (also
after a `$ ` prompt, an environment assignment, `&&`, or as `python -m dinotxt.cli` under torchrun /
srun) is parsed by the real parser as `dinotxt` parses it (`dinotxt.cli.main`: -q / --debug anywhere,
key=value overrides after flags), and the config it describes is composed: the recipe it names
exists, and every key=value override is a real key with a valid value (`dinotxt.config.compose`). A
command followed in its block by a `dinotxt: error: ...` line must fail with that message.
Placeholders (RECIPE, CHECKPOINT, DIR, ...) are any string to the parser; where a recipe is a
placeholder, a shipped recipe of the same kind stands in for the composition.

The links: every relative link of these pages points at a file that exists, and every #anchor at a
heading of the page it names (GitHub's heading ids)."""
import contextlib
import functools
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _module_map() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What is implemented")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


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


# ---------------------------------------------------------------------------------------------------
# the command lines


def fenced_blocks(text: str):
    """``(language, [(line number, line), ...])`` of every fenced code block of a markdown text."""
    block, lang = None, None
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if block is None:
                block, lang = [], stripped[3:].strip()
            else:
                yield lang, block
                block = None
        elif block is not None:
            block.append((number, line))


def _dinotxt_args(tokens):
    """The arguments of a dinotxt invocation in one shell command, or None when it runs something else."""
    while tokens and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", tokens[0]):  # WANDB_MODE=offline dinotxt ...
        tokens = tokens[1:]
    if not tokens:
        return None
    if tokens[0] == "dinotxt" or tokens[0].endswith("/dinotxt"):
        return tokens[1:]
    if tokens[0] in ("python", "python3", "torchrun", "srun") or tokens[0].endswith(("/python", "/python3")):
        for i, tok in enumerate(tokens):
            if tok == "dinotxt.cli" and i and tokens[i - 1] == "-m":  # python -m dinotxt.cli, torchrun -m dinotxt.cli
                return tokens[i + 1:]
            if tok.endswith("/dinotxt") or (tok == "dinotxt" and not tokens[i - 1].startswith("-")):  # srun .venv/bin/dinotxt
                return tokens[i + 1:]
    return None


SHELL = ("", "bash", "sh", "shell", "console")


def documented_commands(text: str):
    """``(line number, the command as written, its dinotxt arguments, the documented error or None)``, from the
    shell blocks (```bash, ```sh) and the `$ ` lines of ```console blocks and of blocks without a language
    (the rest of those is output: a table whose rows start with "dinotxt" is not a command)."""
    for lang, block in fenced_blocks(text):
        if lang not in SHELL:
            continue
        prompted = lang in ("", "console")  # output (a table, an error) but for the `$ ` lines
        joined, start = [], None
        logical = []  # (line number, text), continuation lines joined
        for number, line in block:
            start = number if start is None else start
            if line.rstrip().endswith("\\"):
                joined.append(line.rstrip()[:-1])
                continue
            joined.append(line)
            logical.append((start, " ".join(joined)))
            joined, start = [], None
        for i, (number, line) in enumerate(logical):
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            elif prompted:
                continue
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError as e:  # an unbalanced quote
                if re.match(r"^(\S+=\S+ )*\S*dinotxt\b", line):
                    yield number, line, None, f"shell syntax: {e}"
                continue
            following = logical[i + 1][1].strip() if i + 1 < len(logical) else ""
            error = following[len("dinotxt: error: "):] if following.startswith("dinotxt: error: ") else None
            commands, current = [], []
            for tok in tokens:
                if tok in ("&&", "||", ";", "|"):
                    commands.append(current)
                    current = []
                else:
                    current.append(tok)
            commands.append(current)
            for tokens in commands:
                args = _dinotxt_args(tokens)
                if args is not None:
                    yield number, line, args, error


def all_commands():
    found = []
    for page in PAGES:
        for number, line, args, error in documented_commands(page.read_text()):
            found.append((f"{page.relative_to(ROOT)}:{number}", line, args, error))
    return found


PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")  # RECIPE, CHECKPOINT, DIR, IMAGE_FOLDER, C, ...
# a shipped recipe of the kind a command takes, composed where the page writes a placeholder
STAND_IN = {"train": "demo", "cache": "demo", "curate": "curation/debug", "suite": "eval/demo_suite"}


def parse(args):
    """``dinotxt ARGS`` through the real parser, as ``dinotxt.cli.main`` parses a command line."""
    from dinotxt.cli import parse_command_line

    return parse_command_line(list(args))


def compose_config(ns):
    """The config a parsed command composes before it does any work (recipe, registry entry, overrides)."""
    from curation.config import CurationConfig, load_curation_config
    from dinotxt.config import compose, find_recipe, load_train_config
    from dinotxt.evaluation.suite import load_suite_config

    def recipe(kind):
        name = STAND_IN[kind] if PLACEHOLDER.match(ns.recipe) else ns.recipe
        find_recipe(name)  # the shipped recipe or file the page names exists
        return name

    if ns.command in ("train", "cache"):
        load_train_config(recipe(ns.command), list(ns.overrides))
    elif ns.command == "curate":
        load_curation_config(recipe("curate"), list(ns.overrides))
    elif ns.command == "eval" and ns.task == "suite":
        load_suite_config(recipe("suite"), list(ns.overrides))
    elif ns.command == "demo" and ns.curation:  # its overrides edit recipes/curation/demo.yaml (the pool is the demo's)
        compose(CurationConfig, "curation/demo", list(ns.overrides))
    elif ns.command == "demo":
        load_train_config("demo", list(ns.overrides))


def check(args):
    """None when ``dinotxt ARGS`` parses and composes, else the one line dinotxt would print."""
    return _check(tuple(args))


@functools.lru_cache(maxsize=None)
def _check(args):
    args = list(args)
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            ns = parse(args)
    except SystemExit:
        return stderr.getvalue().strip().splitlines()[-1]
    try:
        compose_config(ns)
    except Exception as e:  # ConfigError, or what omegaconf / yaml raise on a value they cannot read
        return f"dinotxt: error: {e}"
    return None


def test_the_pages_show_commands():
    """The collection itself works: the pages hold many commands, of every kind the README promises."""
    commands = all_commands()
    assert len(commands) > 60, len(commands)
    used = {args[0] for _, _, args, _ in commands if args}
    assert {"train", "cache", "curate", "demo", "eval", "segment", "tokenizer", "export", "embed", "push-to-hub",
            "analyze", "group", "models", "recipes"} <= used, used
    readme = [args for where, _, args, _ in commands if where.startswith("README.md")]
    assert any("--backbone-weights" in args for args in readme), "the README shows --backbone-weights"
    assert any(args[:2] == ["tokenizer", "train"] for args in readme), "the README shows dinotxt tokenizer train"


def test_every_documented_command_line_parses_and_composes():
    failures = []
    for where, line, args, error in all_commands():
        if args is None:
            failures.append(f"{where}: {line}\n    {error}")
            continue
        got = check(args)
        if error is None and got is not None:
            failures.append(f"{where}: {line}\n    {got}")
        elif error is not None and (got is None or error not in got):
            failures.append(f"{where}: {line}\n    documented: dinotxt: error: {error}\n    got: {got}")
    assert not failures, "command lines in the README / docs that dinotxt does not accept:\n" + "\n".join(failures)


@pytest.mark.parametrize("typo, expected", [
    (("--backbone-weights", "--backbone-wieghts"), "unrecognized arguments: --backbone-wieghts"),
    (("--checkpoint", "--checkpiont"), "the following arguments are required: --checkpoint"),
    (("data.train=", "data.trian="), "unknown config key 'data.trian'"),
    (("effnet_lite0", "effnet_lite"), "recipe not found: effnet_lite"),
    (("--vocab-size", "--vocab_size"), "unrecognized arguments: --vocab_size"),
])
def test_a_misspelled_flag_key_or_recipe_fails(typo, expected):
    """The check is not vacuous: a copy of a documented line with one typo is rejected."""
    old, new = typo
    lines = [args for _, _, args, error in all_commands() if args and error is None and any(old in a for a in args)]
    assert lines, f"no documented command uses {old}"
    args = lines[0]
    assert check(args) is None
    bad = [a.replace(old, new, 1) for a in args]
    got = check(bad)
    assert got is not None and expected in got, (bad, got)


def test_the_python_examples_name_the_public_api():
    """``dinotxt.NAME`` in a ```python block of the pages is part of ``dinotxt``'s public API."""
    import dinotxt

    unknown = []
    for page in PAGES:
        for lang, block in fenced_blocks(page.read_text()):
            if lang != "python":
                continue
            for number, line in block:
                for name in re.findall(r"(?<![\w.])dinotxt\.(\w+)", line.split("#")[0]):
                    if name not in dinotxt.__all__ and name != "evaluation":
                        unknown.append(f"{page.relative_to(ROOT)}:{number}: dinotxt.{name}")
    assert not unknown, "names the examples use that dinotxt does not export:\n" + "\n".join(unknown)


# ---------------------------------------------------------------------------------------------------
# the links


def heading_ids(text: str):
    """GitHub's ids of a page's headings: lower case, punctuation dropped, spaces to '-', '-N' for repeats."""
    ids, seen = set(), {}
    in_block = False
    for line in text.split("\n"):
        if line.strip().startswith("```"):
            in_block = not in_block
            continue
        m = None if in_block else re.match(r"^#{1,6} (.*)$", line)
        if not m:
            continue
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1).strip())  # a link's text
        slug = re.sub(r"[^\w\- ]", "", title.replace("`", "").lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def test_every_relative_link_and_anchor_resolves():
    broken = []
    for page in PAGES:
        text = page.read_text()
        code_lines = {n for _, block in fenced_blocks(text) for n, _ in block}
        for number, line in enumerate(text.split("\n"), 1):
            if number in code_lines:
                continue
            for target in re.findall(r"\]\(([^)\s]+)\)", line):
                if re.match(r"^[a-z]+:", target):  # https:, mailto:
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{page.relative_to(ROOT)}:{number}: {target}"
                if not dest.exists():
                    broken.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in heading_ids(dest.read_text()):
                    broken.append(f"{where} (no such heading)")
    assert not broken, "broken links in the README / docs:\n" + "\n".join(broken)


def test_the_readme_links_every_guide():
    readme = (ROOT / "README.md").read_text()
    unlinked = [p.name for p in PAGES[1:] if f"](docs/{p.name}" not in readme]
    assert not unlinked, f"guides in docs/ the README does not link: {unlinked}"
