from __future__ import annotations

import subprocess
import sys
import types

import ckptguard


def test_all_is_exact_and_importable() -> None:
    public = {
        n
        for n in dir(ckptguard)
        if not n.startswith("_") and not isinstance(getattr(ckptguard, n), types.ModuleType)
    }
    assert set(ckptguard.__all__) - {"__version__"} == public
    for name in ckptguard.__all__:
        assert hasattr(ckptguard, name)
    assert sorted(ckptguard.__all__) == list(ckptguard.__all__)


def test_core_imports_and_saves_without_torch(tmp_path: object) -> None:
    code = f"""
import sys
sys.modules["torch"] = None  # any "import torch" now raises ImportError
import ckptguard
from ckptguard.testing import FaultyStorage  # the fault toolkit is torch-free too
with ckptguard.atomic_checkpoint(
    {str(tmp_path)!r} + "/checkpoint-1", storage=FaultyStorage()
) as d:
    (d / "x").write_bytes(b"1")
assert ckptguard.verify({str(tmp_path)!r} + "/checkpoint-1").ok
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_import_has_no_side_effects(tmp_path: object) -> None:
    code = "import os, ckptguard; print(sorted(os.listdir('.')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert out.stdout.strip() == "[]"


def test_only_the_documented_submodules_are_public() -> None:
    """Every layer is a private package; users get ``ckptguard`` plus these two."""
    import pkgutil

    public = {m.name for m in pkgutil.iter_modules(ckptguard.__path__) if m.name[0] != "_"}
    assert public == {"integrations", "testing"}
    layers = {m.name for m in pkgutil.iter_modules(ckptguard.__path__) if m.ispkg}
    assert {"_storage", "_format", "_protocol", "_coordination", "_state", "_manager"} <= layers
