"""Method protocol and registry.

A method distils one class at a time: :meth:`Method.distill_class` receives a :class:`ClassContext`
(the class, IPC, the dataset, the backbone, the latent cache, a seeded generator) and returns a
:class:`ClassResult` (latents to decode, or real images). The export stage handles everything else
(decoding, files, manifest, resume), so a method module holds only its algorithm.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any, Callable, ClassVar

import torch

from gendd.config import Validated, check
from gendd.data.base import ImageDataset
from gendd.errors import ConfigError
from gendd.registry import Registry


@dataclass
class MethodConfig(Validated):
    """Options every method has. ``seed`` fixes all randomness (one generator per class)."""

    config_what: ClassVar[str] = "method"

    seed: int = field(default=0, metadata=check(Integral))

    def conditioning(self, backbone) -> dict:
        """Prompt options for a text-to-image backbone (sampling methods have them; others take its defaults)."""
        return {}


@dataclass
class ClassContext:
    """Everything a method may use to distil class ``label`` (local index) into ``ipc`` items."""

    label: int
    name: str
    model_label: int
    ipc: int
    dataset: ImageDataset
    generator: torch.Generator
    backbone: Any = None
    cache: Any = None  # gendd.cache.LatentCache or None
    progress: bool = False

    @classmethod
    def create(cls, dataset: ImageDataset, label: int, ipc: int, seed: int, *, backbone: Any = None,
               cache: Any = None, progress: bool = False) -> "ClassContext":
        """The context of class ``label``, with its generator seeded by :func:`seed_for` (``seed``, label)."""
        return cls(label=label, name=dataset.classes[label], model_label=int(dataset.model_labels[label]), ipc=ipc,
                   dataset=dataset, generator=torch.Generator().manual_seed(seed_for(seed, label)),
                   backbone=backbone, cache=cache, progress=progress)

    def class_latents(self) -> torch.Tensor:
        """Cached latents of this class; raises if the method needs a cache that was not built."""
        if self.cache is None:
            raise ConfigError("this method needs the latent cache; run it with a backbone")
        return self.cache.latents(self.label)


@dataclass
class ClassResult:
    """Distilled items of one class: ``latents`` (decoded by the pipeline) and/or uint8 ``images``."""

    latents: torch.Tensor | None = None
    images: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # small JSON-able facts for the manifest
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # saved beside the latents


def seed_for(seed: int, label: int) -> int:
    """The generator seed of class ``label``: distinct per class, stable across runs and resumes."""
    return (int(seed) * 1_000_003 + int(label)) % (2**63)


class Method:
    """Base class. Subclasses set ``name``, ``config_class``, the ``needs_*``/``selects_real`` flags
    and implement :meth:`distill_class`."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    needs_backbone: ClassVar[bool] = False
    needs_cache: ClassVar[bool] = False
    selects_real: ClassVar[bool] = False  # returns real images, so IPC may not exceed a class
    summary: ClassVar[str] = ""

    def __init__(self, config: MethodConfig | None = None, **kwargs: Any) -> None:
        if config is None:
            config = self.config_class(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if not isinstance(config, self.config_class):
            raise ConfigError(f"{self.name} expects a {self.config_class.__name__}")
        self.config = config

    def encode_spec(self):
        """How the latent cache this method reads is encoded (``gendd.cache.EncodeSpec``)."""
        from gendd.cache import EncodeSpec

        return EncodeSpec()

    def condition(self, dataset: ImageDataset, backbone: Any) -> Any:
        """The backbone bound to ``dataset`` (a text backbone encodes one prompt per class from the config's
        prompt options; a class-conditional backbone is returned as is)."""
        return backbone.for_dataset(dataset, **self.config.conditioning(backbone))

    def prepare(self, dataset: ImageDataset, backbone: Any, *, cache_dir: Any = None, work_dir: Any = None,
                progress: bool = True) -> Any:
        """Per-dataset work done once before the class loop (e.g. fine-tuning the backbone);
        returns the backbone the classes are distilled with."""
        return backbone

    def distill_class(self, ctx: ClassContext) -> ClassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def distill_classes(self, ctxs: list[ClassContext]) -> list[ClassResult]:
        """Several classes at once (``gendd distill --class-batch``): a sampling method denoises them in one
        request, each class with its own generator, so a class's result equals its :meth:`distill_class` up
        to float rounding of the larger batch; others go one class at a time."""
        return [self.distill_class(ctx) for ctx in ctxs]


def _builtin_methods() -> dict[str, type[Method]]:
    """Every :class:`Method` subclass that sets its own ``name`` in a module of ``gendd.methods``."""
    import importlib
    import inspect
    import pkgutil
    from pathlib import Path

    found: dict[str, type[Method]] = {}
    for info in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if info.name == "base" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"gendd.methods.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, Method) and cls.__module__ == module.__name__ and cls.__dict__.get("name"):
                found[cls.name] = cls
    return found


#: method name -> class (:class:`gendd.registry.Registry`).
METHODS: Registry[type[Method]] = Registry("method", _builtin_methods)


def register_method(cls: type[Method]) -> type[Method]:
    """Make a user's own :class:`Method` subclass available under ``cls.name`` (a class decorator)."""
    return METHODS.register(cls.name, cls)


def available_methods() -> list[str]:
    return METHODS.names()


def get_method(name: str) -> type[Method]:
    return METHODS.get(name)


def build_method(name: str, **options: Any) -> Method:
    """``build_method("dit", cfg_scale=3.0)``: unknown options raise ConfigError."""
    from gendd.config import build_config

    cls = get_method(name)
    return cls(build_config(cls.config_class, options, f"method {name!r}"))


Factory = Callable[..., Method]
