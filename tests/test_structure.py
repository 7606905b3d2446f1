"""The package's layers (README's architecture table): each module imports only from the layers
below it, so library code never depends on a command, the data layer never loads models, and
sampling never reaches into evaluation."""

import ast
import re
from pathlib import Path

from helpers import ROOT

# Lowest first. A module may import modules of lower layers only; commands may also use each
# other's functions (the demo runs the trainer and the memorisation report).
LAYERS = [
    {"errors", "files", "durable", "text", "lora_formats", "compile"},
    {"objectives", "images", "outputs"},
    {"step", "data", "sampling", "models", "checkpointing", "hub", "optimizers", "evaluation.report",
     "evaluation.similarity", "tiny"},
    {"cache", "heldout", "pipelines", "toy", "validation", "evaluation.features"},
    {"config"},
    {"train", "corrupt", "generate", "demo", "cli", "push", "evaluation.memorization", "evaluation.quality"},
]
COMMANDS = LAYERS[-1]


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT / "sdxl_ambient").with_suffix("").parts)
    return name.removesuffix(".__init__").removesuffix("__init__")


def imported(path: Path) -> set[str]:
    """Every sdxl_ambient module the file imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdxl_ambient"):
            if node.module == "sdxl_ambient":
                out.update(alias.name for alias in node.names)
            else:
                out.add(node.module.removeprefix("sdxl_ambient."))
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("sdxl_ambient.") for a in node.names if a.name.startswith("sdxl_ambient."))
    return out


def layer_of(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"sdxl_ambient/{name.replace('.', '/')}.py is in no layer of tests/test_structure.py")


def test_modules_import_only_from_lower_layers():
    wrong = []
    for path in sorted((ROOT / "sdxl_ambient").rglob("*.py")):
        name = module_name(path)
        if name in ("", "evaluation"):
            continue
        for dep in imported(path) - {"evaluation"}:
            ok = layer_of(dep) < layer_of(name) or (name in COMMANDS and dep in COMMANDS)
            if not ok:
                wrong.append(f"{name} imports {dep}")
    assert wrong == []


def readme_layers() -> list[set[str]]:
    """The modules of each layer of README's architecture table, lowest first."""
    text = (ROOT / "README.md").read_text().split("## Architecture", 1)[1].split("\n\n")
    rows = next(block for block in text if block.startswith("| layer | module |")).splitlines()[2:]
    layers: list[set[str]] = []
    for row in rows:
        name, modules = row.split("|")[1].strip(), row.split("|")[2]
        if name:
            layers.insert(0, set())
        layers[0] |= {m.removesuffix(".py").replace("/", ".") for m in re.findall(r"`([\w/]+\.py)`", modules)}
    return layers


def test_readmes_architecture_table_lists_these_layers():
    assert readme_layers() == LAYERS


def test_the_layer_rule_catches_a_wrong_import(tmp_path):
    """The check itself: a library module importing a command is found."""
    bad = tmp_path / "sampling.py"
    bad.write_text("def f():\n    from sdxl_ambient.generate import run\n")
    assert imported(bad) == {"generate"} and layer_of("generate") > layer_of("sampling")


def test_benchmarks_and_the_package_never_import_tests():
    for path in [*(ROOT / "sdxl_ambient").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")]:
        text = path.read_text()
        assert "sys.path.insert(0, str(Path(__file__).resolve().parents[1] / \"tests\"))" not in text, path
        tree = ast.parse(text)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"conftest", "helpers", "toy", "trainrun"}, path
