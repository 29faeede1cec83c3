from steps.fingerprint import code_fingerprint, module_closure


def names(module):
    return {p.stem for p in module_closure(module)}


def modules(stage):
    """The `steps` modules (a package by its directory) in a stage's fingerprint."""
    return {p.stem if p.parent.name == "steps" else p.parent.name for p in module_closure(stage)}


def test_closure_follows_steps_imports():
    # steps/prune/ is a package: all its files, and the modules they import (losses through importance.py)
    assert {"surgery", "importance", "shape", "artifacts", "prepared", "cli", "losses", "models", "fingerprint"} <= names("prune")
    assert "recover" not in names("prune")
    # stages read prepared data through steps/prepared.py: the data stage's code is in no other stage's fingerprint
    assert not any("data" in modules(stage) for stage in ("base", "distill", "prune", "recover", "quantize", "evaluate"))
    assert "data" in modules("tokenizer")  # it renders records as prepare does
    assert "training" in names("distill") and "training" in names("recover")


def test_fingerprint_changes_with_an_imported_module(tmp_path, monkeypatch):
    import steps.fingerprint as fp

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.py").write_text("")
    (tmp_path / "a.py").write_text("from steps.b import x\n")
    monkeypatch.setattr(fp, "PACKAGE_DIR", tmp_path)
    before_a, before_c = code_fingerprint("a"), code_fingerprint("c")
    (tmp_path / "b.py").write_text("x = 1\n")
    assert code_fingerprint("a") != before_a  # a imports b
    assert code_fingerprint("c") == before_c  # c does not


def test_a_stage_package_counts_as_one_module(tmp_path, monkeypatch):
    """steps/quantize/ is a package: editing any of its files changes its fingerprint and its importers'."""
    import steps.fingerprint as fp

    (tmp_path / "stage").mkdir()
    (tmp_path / "stage" / "__init__.py").write_text("from steps.stage import method\n")
    (tmp_path / "stage" / "method.py").write_text("from steps.shared import y\n")
    (tmp_path / "shared.py").write_text("")
    (tmp_path / "user.py").write_text("from steps.stage import run\n")
    monkeypatch.setattr(fp, "PACKAGE_DIR", tmp_path)
    assert {p.relative_to(tmp_path).as_posix() for p in module_closure("user")} == {
        "user.py", "stage/__init__.py", "stage/method.py", "shared.py"
    }
    before_stage, before_user = code_fingerprint("stage"), code_fingerprint("user")
    (tmp_path / "stage" / "method.py").write_text("from steps.shared import y\nz = 2\n")
    assert code_fingerprint("stage") != before_stage and code_fingerprint("user") != before_user


def test_quantize_fingerprint_covers_its_method_modules():
    assert {"__init__", "__main__", "bnb", "gguf", "gptq", "models", "artifacts"} <= names("quantize")
