"""Dependencies point one way: kernels <- model <- formats <- trainer, service (see README)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kernels", "model", "formats", "trainer", "service")
# package -> project packages it may import
ALLOWED = {
    "kernels": set(),
    "model": {"kernels"},
    "formats": {"kernels", "model"},
    "trainer": {"kernels", "model", "formats"},
    # trainer.evaluate: `coordtok roundtrip` (service/cli.py) scores a clip as the model card does;
    # trainer.encode_dataset: `coordtok encode-dataset` tokenizes a folder of videos
    "service": {"kernels", "model", "formats", "trainer.evaluate", "trainer.encode_dataset"},
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def allowed(package: str, module: str) -> bool:
    if not module.startswith("coordtok."):
        return True
    module = module.removeprefix("coordtok.")
    top = module.split(".")[0]
    if top not in PACKAGES or top == package:
        return True
    return any(module == a or module.startswith(a + ".") or a == top for a in ALLOWED[package])


def test_imports_respect_the_layering():
    violations = [
        f"{path.relative_to(ROOT)} imports {module}"
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        for module in imported_modules(path)
        if not allowed(package, module)
    ]
    assert violations == []


def test_project_modules_are_imported_through_the_coordtok_namespace():
    """A bare `import model` would load a second copy of the package next to coordtok.model."""
    files = [p for p in ROOT.rglob("*.py") if ".venv" not in p.parts and "build" not in p.parts]
    bare = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in files
        for module in imported_modules(path)
        if module.split(".")[0] in PACKAGES
    ]
    assert bare == []


MAX_SERVICE_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def project_files() -> list[Path]:
    """The project's Python files, tests excluded."""
    return [p for p in ROOT.rglob("*.py")
            if not {".venv", "build", "tests"} & set(p.relative_to(ROOT).parts)]


def test_no_service_file_is_over_400_lines():
    long = {str(path.relative_to(ROOT)): lines for path in (ROOT / "service").rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > MAX_SERVICE_FILE_LINES}
    assert long == {}


def test_no_function_outside_tests_is_over_60_lines():
    """Nested functions count on their own (a closure inside a long function is also measured)."""
    long = {
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}": node.end_lineno - node.lineno + 1
        for path in project_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    }
    assert long == {}
