"""The package imports neither framework: only importing an integration does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _loaded(statement: str) -> set[str]:
    code = (
        f"import sys; {statement}; "
        "print(' '.join(m for m in ('transformers', 'lightning', 'pytorch_lightning', "
        "'accelerate', 'torchvision') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    return set(done.stdout.split())


def test_the_package_imports_no_framework():
    assert _loaded("import adaptive_data, adaptive_data.integrations") == set()


def test_torchvision_is_imported_on_first_use_of_the_transform():
    """transforms.v2 takes seconds to import: `import adaptive_data` leaves it for the first
    use of GARTransform or apply_op, which then work as usual."""
    assert _loaded("import adaptive_data") == set()
    got = _loaded("import adaptive_data as ad; ad.GARTransform(['Identity'])")
    assert got == {"torchvision"}
    got = _loaded("from adaptive_data import apply_op, GARTransform, GARSampler")
    assert got == {"torchvision"}


def _import_without(module: str, statement: str) -> subprocess.CompletedProcess[str]:
    """Run ``statement`` with ``module`` missing (None in sys.modules: its import fails)."""
    code = f"import sys; sys.modules[{module!r}] = None; {statement}"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_an_integration_without_its_extra_names_the_extra_to_install():
    done = _import_without("lightning", "import adaptive_data.integrations.lightning")
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ModuleNotFoundError: adaptive_data.integrations.lightning needs ")
    assert "'lightning', which the [lightning] extra installs: " in last
    assert "pip install 'adaptive-data[lightning]'" in last
    done = _import_without("transformers", "import adaptive_data.integrations.transformers")
    last = done.stderr.strip().splitlines()[-1]
    assert "needs 'transformers', which the [transformers] extra installs" in last
    assert "pip install 'adaptive-data[transformers]'" in last


def test_another_missing_module_keeps_its_own_message():
    from adaptive_data._extras import missing_extra

    other = ModuleNotFoundError("No module named 'yaml'", name="yaml")
    assert missing_extra(other, "lightning", "x") is other
    with pytest.raises(ValueError, match=r"extra should be one of .* got 'lighting'"):
        missing_extra(other, "lighting", "x")
