"""The package's layers import one way (docs/architecture.md, "Layers"): a module imports its own
layer and the layers below it, never a layer above nor a sibling of the same rank."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ncdpo_rllib"
RANK = {"errors": 0, "integrity": 0, "policy_file": 0, "diffusion": 1, "data": 1, "rl": 2, "tasks": 2, "experiment": 3, "cli": 4}
"""errors, integrity, policy_file <- diffusion, data <- rl, tasks <- experiment <- cli (the package's __init__ imports
only ``load_policy`` from policy_file, which imports nothing of the package: no Ray for a deployed policy)."""


def layer_of(module: str) -> str | None:
    """'ncdpo_rllib.rl.learner' -> 'rl'; None outside the package or for the package itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "ncdpo_rllib" and len(parts) > 1 else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, function-level ones included."""
    here = ["ncdpo_rllib", *path.relative_to(PACKAGE).with_suffix("").parts]
    package = here[:-1]  # the package a relative import starts from (for __init__.py: its own)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            out.append((node.lineno, name))
    return out


def test_every_module_of_the_package_is_in_a_layer():
    top = {p.stem for p in PACKAGE.iterdir() if (p.suffix == ".py" or p.is_dir()) and not p.name.startswith("__")}
    assert top == set(RANK), f"add the new layer to RANK and to docs/architecture.md: {sorted(top ^ set(RANK))}"


def test_imports_go_one_way():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for line, module in imported_modules(path):
            other = layer_of(module)
            if other is None or other == own:
                continue
            if RANK[other] >= RANK[own]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}) imports {module} ({other})")
    assert not upward, "imports against the layer order:\n" + "\n".join(upward)


def test_the_check_sees_relative_and_function_level_imports():
    """The parser itself: a relative import two levels up and one inside a function are both found."""
    probe = PACKAGE / "tasks" / "envs.py"
    found = {m for _, m in imported_modules(probe)}
    assert "ncdpo_rllib.errors" in found and "ncdpo_rllib.data" in found  # the second one is inside make_env
    init = {m for _, m in imported_modules(PACKAGE / "experiment" / "__init__.py")}
    assert "ncdpo_rllib.experiment.config" in init


def test_one_line_turns_a_library_error_into_one_short_line():
    from ncdpo_rllib.errors import one_line

    assert one_line(ValueError("\n  bad   value\nTraceback ...")) == "bad value"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(OSError("x" * 300)).endswith("...") and len(one_line(OSError("x" * 300))) == 200
    assert one_line(OSError("gone"), with_type=True) == "OSError: gone"
