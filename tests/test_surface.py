"""The public surface: what each package exports, and settings that keep secrets out of sight."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from shared.settings import Settings


@pytest.mark.parametrize("package", ["shared", "shared.store", "producer", "worker", "simulator"])
def test_all_lists_exactly_the_public_names(package: str) -> None:
    module = importlib.import_module(package)
    public = {name for name in vars(module) if not name.startswith("_")}
    submodules = {name for name in public if type(getattr(module, name)).__name__ == "module"}
    assert set(module.__all__) == public - submodules


def test_worker_and_producer_never_import_each_other() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for package, forbidden in (
        ("worker", "producer"),
        ("producer", "worker"),
        ("shared", "worker"),
        ("shared", "producer"),
    ):
        for path in (root / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                assert not any(n == forbidden or n.startswith(forbidden + ".") for n in names), path


ARQ_PUBLIC = {"arq.worker": {"func", "Retry"}}
"""What of arq a module outside the data model may import: its documented API, nothing of its internals."""


def _strings_outside_docstrings(tree: ast.AST) -> list[str]:
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_only_the_data_model_speaks_to_redis() -> None:
    """``shared.store`` alone spells keys, imports redis-py and touches arq's internals; every other
    module of the product calls it."""
    root = Path(__file__).resolve().parent.parent
    for package in ("shared", "worker", "producer", "simulator"):
        for path in (root / package).rglob("*.py"):
            if path.is_relative_to(root / "shared" / "store"):
                continue
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = {alias.name: set() for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = {node.module: {alias.name for alias in node.names}}
                else:
                    continue
                for module, names in modules.items():
                    where = f"{path.relative_to(root)}:{node.lineno}"
                    assert module.split(".")[0] != "redis", f"{where} imports {module}: use shared.store"
                    if module.split(".")[0] == "arq":
                        assert names and names <= ARQ_PUBLIC.get(module, set()), f"{where}: arq's {names or module}"
                    assert module not in ("shared.store.keys", "shared.store.codec"), f"{where}: {module}'s insides"
            for text in _strings_outside_docstrings(tree):
                assert "sf:" not in text and "arq:" not in text, f"{path.relative_to(root)} spells a key: {text!r}"


def test_settings_read_the_contract_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://fallback/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fallback")
    monkeypatch.setenv("STREAMFLEET_GATEWAY_API_KEYS", "k1, k2,,")
    monkeypatch.delenv("STREAMFLEET_REDIS_URL", raising=False)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.upstream_base_url == "http://fallback/v1"
    assert settings.uses_embedded_redis
    assert [key.get_secret_value() for key in settings.gateway_api_keys] == ["k1", "k2"]
    assert "sk-fallback" not in repr(settings) and "k1" not in repr(settings)
    monkeypatch.setenv("STREAMFLEET_UPSTREAM_BASE_URL", "http://primary/v1")
    monkeypatch.setenv("STREAMFLEET_UPSTREAM_API_KEY", "sk-primary")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.upstream_base_url == "http://primary/v1"
    assert settings.upstream_api_key is not None and settings.upstream_api_key.get_secret_value() == "sk-primary"
    assert settings.stream_ttl_seconds == 3600
