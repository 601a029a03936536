"""Every dependency pyproject.toml declares is imported by the package or its recipes (no declared dependency
without a use), and every third-party module they import is declared."""

import ast
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# distribution name -> the module it provides, where the two differ
MODULE_OF = {"pillow": "PIL", "huggingface_hub": "huggingface_hub", "scikit-learn": "sklearn"}
# used without an import statement of ours, and why
USED_THROUGH = {"safetensors": "save_pretrained(safe_serialization=True) in recipes/finetune.py writes model.safetensors"}


def _imported_modules(paths) -> set[str]:
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def _declared() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {}
    for requirement in project["dependencies"]:
        name = requirement.split(";")[0].strip()
        for sep in "<>=!~[ ":
            name = name.split(sep)[0]
        names[name] = MODULE_OF.get(name.lower(), name.replace("-", "_"))
    return names


def test_every_declared_dependency_is_used():
    used = _imported_modules([*(ROOT / "hf_tokenpool").rglob("*.py"), *(ROOT / "recipes").glob("*.py")])
    unused = {name for name, module in _declared().items() if module not in used and name not in USED_THROUGH}
    assert not unused, f"declared in pyproject.toml but imported nowhere in hf_tokenpool/ or recipes/: {unused}"


def test_every_imported_third_party_module_of_the_package_is_declared():
    used = _imported_modules((ROOT / "hf_tokenpool").rglob("*.py"))
    third_party = used - set(sys.stdlib_module_names) - {"hf_tokenpool"}
    assert third_party <= set(_declared().values()), third_party - set(_declared().values())
