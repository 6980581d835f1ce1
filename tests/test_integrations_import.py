"""The package imports neither framework: only importing an integration does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
