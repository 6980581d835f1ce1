"""The optional extras: which one installs a missing module, and the error that says so."""

from __future__ import annotations

__all__ = ["EXTRAS", "missing_extra"]

# extra -> the top-level modules it installs (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "transformers": ("transformers", "accelerate"),
    "lightning": ("lightning",),
    "plot": ("matplotlib",),
    "demo": ("sklearn", "tqdm", "matplotlib"),
}


def missing_extra(error: ImportError, extra: str, what: str) -> ImportError:
    """An ``ImportError`` for ``what`` (e.g. ``"adaptive_data.integrations.lightning"``) whose
    message names the extra that installs the missing module, from a release or a clone.
    ``error`` is returned unchanged when the module it misses is not one of ``extra``'s."""
    if extra not in EXTRAS:
        raise ValueError(f"extra should be one of {sorted(EXTRAS)}, but got {extra!r}")
    name = (error.name or "").partition(".")[0]
    if isinstance(error, ModuleNotFoundError) and name not in EXTRAS[extra]:
        return error  # another module is missing: its own message says which
    needs = f"{name!r}" if name else "a package it imports"
    return ModuleNotFoundError(
        f"{what} needs {needs}, which the [{extra}] extra installs: "
        f"pip install 'adaptive-data[{extra}]' (from a clone: pip install -e '.[{extra}]'; "
        f"from git: pip install 'adaptive-data[{extra}] @ git+<repository URL>'). "
        f"The import failed with: {error}",
        name=error.name,
    )
