from steps.fingerprint import code_fingerprint, module_closure


def names(module):
    return {p.stem for p in module_closure(module)}


def test_closure_follows_steps_imports():
    assert {"prune", "artifacts", "data", "losses", "models", "fingerprint"} <= names("prune")
    assert "recover" not in names("prune")
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
