"""The package's layers (jaxpar.LAYERS) hold: every import inside jaxpar/ points down or inside its own
package, and the RL stack never loads the language model."""

import ast
import pathlib
import subprocess
import sys

import jaxpar

ROOT = pathlib.Path(jaxpar.__file__).parent
LAYER_OF = {package: level for level, packages in enumerate(jaxpar.LAYERS) for package in packages}


def _package(module: str) -> str:
    """'jaxpar.parallel.rules' -> 'parallel'."""
    return module.split(".")[1]


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, module) of every jaxpar import in a file, function-level imports included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "jaxpar":  # from jaxpar import machine
                found += [(node.lineno, f"jaxpar.{alias.name}") for alias in node.names]
            else:
                found.append((node.lineno, node.module))
    return [(line, module) for line, module in found if module.startswith("jaxpar.")]


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts != ("__init__",):
            yield path, "jaxpar." + ".".join(parts)


def test_every_package_has_a_layer():
    packages = {_package(module) for _, module in _modules()}
    assert packages <= set(LAYER_OF), f"add {sorted(packages - set(LAYER_OF))} to jaxpar.LAYERS"


def test_imports_point_down():
    upward = []
    for path, module in _modules():
        mine = _package(module)
        for line, imported in _imports(path):
            theirs = _package(imported)
            if theirs != mine and LAYER_OF[theirs] >= LAYER_OF[mine]:
                upward.append(
                    f"{path.relative_to(ROOT.parent)}:{line} ({mine}) imports {imported} ({theirs})"
                )
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The walk finds imports in any position (so the test above can fail)."""
    source = tmp_path / "probe.py"
    source.write_text("import jaxpar.train.step\n\ndef f():\n    from jaxpar.models import llama\n")
    assert [m for _, m in _imports(source)] == ["jaxpar.train.step", "jaxpar.models"]


def test_rl_does_not_load_the_language_model():
    code = (
        "import sys, jaxpar.rl.loop; "
        "print(sorted(m for m in sys.modules if m.startswith(('jaxpar.models', 'jaxpar.train.build'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_training_run_does_not_import_torch():
    """torch is installed for the tests' references; tensorboardX would import it at every run's start
    (seconds) unless the metrics writer hides it."""
    for script in ("train_lm", "train_marl"):
        code = f"import sys, experiments.{script}; print('torch' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent
        ).stdout
        assert out.strip() == "False", script
