"""Named models: one dict, and where each one's files are.

A registry name is the shortest way to say "this model": ``load_model("tiny")``.
An entry points either at a directory inside this package (the embedded tiny models,
built by ``make train-tiny``) or at a Hugging Face hub id. Resolving a packaged entry never
touches the network.

Torch-free on purpose, so the CLI can list models without importing a model stack.
Adding a model is one line in ``MODELS``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


class ModelLoadError(ValueError):
    """A model could not be loaded; the message says what to do about it."""


@dataclass(frozen=True)
class RegistryEntry:
    """One named model: exactly one of ``package_path`` (relative to the package) or ``hub_id``."""

    description: str
    package_path: str | None = None
    hub_id: str | None = None
    build_hint: str | None = None  # how to create a missing packaged directory
    world: str | None = None  # a synthetic world whose prompts the model expects ("tiny")

    def __post_init__(self) -> None:
        if (self.package_path is None) == (self.hub_id is None):
            raise ValueError("a registry entry needs exactly one of package_path or hub_id")


MODELS: dict[str, RegistryEntry] = {
    "tiny": RegistryEntry(
        description="the embedded default: a tiny Llama trained on a synthetic retrieval language",
        package_path="tiny/weights/default",
        build_hint="run `make train-tiny`",
        world="tiny",
    ),
    "tiny-short": RegistryEntry(
        description="the embedded tiny Llama trained on short contexts only",
        package_path="tiny/weights/short",
        build_hint="run `make train-tiny`",
        world="tiny",
    ),
}


def names() -> list[str]:
    """The registered model names, sorted."""
    return sorted(MODELS)


def lookup(name: str) -> RegistryEntry | None:
    """The entry for ``name``, or None when ``name`` is not a registry name."""
    return MODELS.get(name)


def resolve(name: str) -> str | Path:
    """Where a registry name's model lives: a local ``Path`` or a hub id string.

    Raises ``KeyError`` for an unknown name and ``ModelLoadError`` when a packaged model's
    directory has not been built yet.
    """
    entry = MODELS.get(name)
    if entry is None:
        raise KeyError(f"unknown model name {name!r}; known names: {', '.join(names())}")
    if entry.hub_id is not None:
        return entry.hub_id
    assert entry.package_path is not None
    path = PACKAGE_DIR / entry.package_path
    if not (path / "config.json").is_file():
        hint = entry.build_hint or "reinstall the package"
        raise ModelLoadError(f"model {name!r} is not built yet (no {path}): {hint}")
    return path
