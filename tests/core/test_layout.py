"""The package's shape, checked: no import cycle (function-level imports included), no module that shadows a
public function, no comment pointing outside the repository, a core that imports no framework, and load
options refused for the wrong format before any framework loads."""

import ast
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import bnrepair
from bnrepair import frameworks
from bnrepair.errors import InputError
from bnrepair.options import LoadOptions
from fixtures import REPO

PACKAGE = Path(bnrepair.__file__).parent
MODULES = {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
           for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path) -> set[str]:
    """The bnrepair modules ``name`` imports anywhere in its code (parent packages implied by a dotted name are
    not edges: Python has them initialised already)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names}
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle():
    edges = {name: imports(name, path) for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


def test_no_submodule_shadows_a_public_function():
    for name, path in MODULES.items():
        if path.name != "__init__.py":
            continue
        defined = {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}
        exported = set(getattr(sys.modules.get(name) or __import__(name, fromlist=["_"]), "__all__", ()))
        for public in (defined | exported):
            assert f"{name}.{public}" not in MODULES, f"module {name}.{public} shadows the function {public}"


def test_no_comment_points_outside_the_repository():
    for folder in ("bnrepair", "tests", "fixtures", "bench"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            assert "DESIGN" + ".md" not in text and "../" + "shared" not in text, path


def test_the_core_imports_no_framework():
    code = ("import sys, bnrepair, bnrepair.cli, bnrepair.deploy, bnrepair.frameworks.keras, "
            "bnrepair.frameworks.torch, bnrepair.frameworks.savedmodel; "
            "print(sorted(m for m in ('torch', 'tensorflow', 'keras', 'onnx', 'onnxruntime') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_options_of_another_format_are_refused_before_loading(tmp_path):
    h5 = tmp_path / "model.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(1)
    assert frameworks.detect(h5) == "keras"
    with pytest.raises(InputError, match=r"--arch applies to PyTorch checkpoints; .*model.h5 is a Keras file"):
        frameworks.load(h5, LoadOptions(arch="net.py:build"))
    with pytest.raises(InputError, match="--signature applies to TensorFlow SavedModels"):
        bnrepair.inspect(h5, signature="other")
    with pytest.raises(TypeError, match="unexpected keyword argument"):
        bnrepair.inspect(h5, archh="net.py:build")


def test_a_file_named_like_a_format_it_is_not_is_told_so(tmp_path):
    for name, said in (("m.pt", "not a PyTorch checkpoint (neither a zip archive nor a pickle)"),
                       ("m.h5", "not a Keras file (neither HDF5 nor a zip archive)"),
                       ("m.bin.txt", "unrecognised checkpoint format (expected")):
        (tmp_path / name).write_text("just text\n")
        with pytest.raises(InputError, match=f"{name}: " + said.replace("(", r"\(").replace(")", r"\)")):
            frameworks.detect(tmp_path / name)


def test_formats_are_told_apart_by_contents(tmp_path):
    (tmp_path / "sm").mkdir()
    (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
    (tmp_path / "legacy.bin").write_bytes(b"\x80\x02rest")
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    assert [frameworks.detect(tmp_path / n) for n in ("sm", "legacy.bin", "m.onnx")] == ["savedmodel", "torch", "onnx"]
    for name, message in (("missing.h5", "no such file"), ("m.onnx", "fails onnx.checker")):
        with pytest.raises(InputError, match=message):
            frameworks.load(tmp_path / name, LoadOptions())


def test_the_cli_refuses_an_option_of_another_format_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from bnrepair.cli import app

    h5 = tmp_path / "model.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(1)
    done = CliRunner().invoke(app, ["inspect", str(h5), "--arch", "net.py:build"])
    assert done.exit_code == 2
    assert done.output.strip().splitlines() == [f"error: --arch applies to PyTorch checkpoints; {h5} is a Keras file"]


def test_names_from_files_reach_the_terminal_escaped(tmp_path):
    from typer.testing import CliRunner

    from bnrepair.cli import app

    hostile = tmp_path / "m\x1b]0;owned\x07\x1b[2J[bold].h5"
    done = CliRunner().invoke(app, ["inspect", str(hostile)])
    assert done.exit_code == 2
    assert "\x1b" not in done.output and "\x07" not in done.output
    assert "m\\x1b]0;owned\\x07\\x1b[2J[bold].h5: no such file" in done.output


def test_test_files_have_unique_names():
    """pytest imports test modules by basename (no __init__.py in the framework folders): twins collide."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def test_a_missing_optional_dependency_is_named_before_any_work(tmp_path, monkeypatch):
    import importlib.util

    from typer.testing import CliRunner

    from bnrepair.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("onnx", "matplotlib")
                        else real(name, *a))
    h5 = tmp_path / "model.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = np.zeros(1)
    for args, hint in ((["export", str(h5), "-o", str(tmp_path / "m.onnx")], "ONNX export needs onnx"),
                       (["diagnose", str(h5), "--data", str(tmp_path), "--plot", str(tmp_path / "p.png")],
                        "--plot needs matplotlib")):
        done = CliRunner().invoke(app, args)
        assert done.exit_code == 2, done.output
        assert hint in done.output and "pip install '.[" in done.output and len(done.output.splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.h5"]


def test_the_onnx_extra_takes_the_cpu_runtime_and_the_gpu_extra_the_cuda_one():
    """A CPU machine gets the CPU onnxruntime (not 340 MB of CUDA build); the gpu extra takes the CUDA build where
    one is published (Linux and Windows on x86-64; nowhere else)."""
    tomllib = pytest.importorskip("tomllib")
    markers = pytest.importorskip("packaging.requirements")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for system, machine, gpu in [("Linux", "x86_64", True), ("Windows", "AMD64", True), ("Darwin", "arm64", False),
                                 ("Darwin", "x86_64", False), ("Linux", "aarch64", False)]:
        platform = {"platform_system": system, "platform_machine": machine}
        for extra, runtime in (("onnx", "onnxruntime"), ("gpu", "onnxruntime-gpu" if gpu else None)):
            chosen = {r.name for r in map(markers.Requirement, extras[extra])
                      if r.marker is None or r.marker.evaluate(platform)}
            assert chosen == {"onnx", "tf2onnx"} | ({runtime} if runtime else set()), (system, machine, extra)


def test_options_travel_by_name():
    """A call with more than six positional arguments is a list of options whose order every caller must keep."""
    crowded = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and sum(not isinstance(a, ast.Starred) for a in node.args) > 6:
                crowded.append(f"{name}:{node.lineno} {ast.unparse(node.func)}")
    assert not crowded, crowded


def test_modules_stay_small_and_wings_alike():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert max(sizes.values()) <= 550, sorted(sizes.items(), key=lambda item: -item[1])[:3]
    for name in frameworks.WINGS:
        wing = PACKAGE / "frameworks" / name
        assert (wing / "runner.py").is_file() and (wing / "files.py").is_file(), name
        facts = frameworks.wing(name)
        assert all(hasattr(facts, attr) for attr in ("TITLE", "FORMATS", "READS", "FOLDS_TO", "sniff", "load")), name
