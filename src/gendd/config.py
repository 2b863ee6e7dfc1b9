"""Typed dataclass configs: each field declares what it accepts; one validator checks them all.

A config class derives from :class:`Validated` and declares every field's constraint in its metadata::

    @dataclass
    class MGD3Config(DiTConfig):
        mode_guidance_scale: float = field(default=0.1, metadata=check(Real, ge=0))
        stop_step: int | None = field(default=None, metadata=check(Integral, ge=0, optional=True))
        guidance_form: str = field(default="auto", metadata=check(choices=("mean", "eps", "auto")))
        rrc_scale: tuple[float, float] = field(default=(0.5, 1.0),
                                                metadata=check(tuple, length=2, items=check(Real, gt=0, le=1)))

        def _check_fields(self) -> None:  # cross-field rules, after the per-field checks
            if self.guidance_form == "mean" and self.sampler == "ddim":
                raise ConfigError("guidance_form 'mean' ... use guidance_form eps or auto")

Construction runs :func:`validate` (``__post_init__``), so a config is checked the same way whether it is built
from the CLI (:func:`build_config`, which also turns ``--set`` strings into the declared type), a TOML grid or
Python, before any model is loaded or folder created. Every failure is one
``ConfigError("<what>: <option> must be <what it accepts>, got <value!r>")``.

Types: ``Real`` (int or float, never bool; finite unless ``finite=False``), ``Integral`` (never bool, never a
float), ``bool``, ``str``, ``tuple``/``list`` (with ``items``, an element check, and ``length``/``min_length``),
``dict`` (``items`` checks the values), or any class; several types as a tuple. ``choices`` restricts the value
to a set (a callable returning it is read when checked, for registries); ``test`` is an extra callable that
raises ConfigError (a registry's own lookup, whose message lists the names).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable, ClassVar, Iterable, TypeVar

from gendd.errors import ConfigError

T = TypeVar("T")

_KEY = "gendd_check"
_NOUNS = {Real: "a number", Integral: "an integer", bool: "true or false", str: "a string", tuple: "a list",
          list: "a list", dict: "a table", os.PathLike: "a path"}


_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def _fmt(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


@dataclass(frozen=True)
class Check:
    """What one field accepts (see the module docstring); built by :func:`check`."""

    types: tuple[type, ...] = ()
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    finite: bool = True
    optional: bool = False
    choices: tuple | Callable[[], Iterable] | None = None
    items: "Check | None" = None
    length: int | None = None
    min_length: int = 0
    test: Callable[[Any], Any] | None = None

    # ------------------------------------------------------------------ describing
    def _choices(self) -> tuple:
        return tuple(self.choices() if callable(self.choices) else self.choices)

    def range_text(self) -> str:
        lo = None if self.ge is None and self.gt is None else (self.ge, "[") if self.ge is not None else (self.gt, "(")
        hi = None if self.le is None and self.lt is None else (self.le, "]") if self.le is not None else (self.lt, ")")
        if lo and hi:
            return f"in {lo[1]}{_fmt(lo[0])}, {_fmt(hi[0])}{hi[1]}"
        if lo:
            return f"{'>=' if lo[1] == '[' else '>'} {_fmt(lo[0])}"
        if hi:
            return f"{'<=' if hi[1] == ']' else '<'} {_fmt(hi[0])}"
        return ""

    def accepts(self) -> str:
        """``"an integer >= 1 (or None)"``, ``"one of 'ddpm', 'ddim'"``, ..."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self._choices())
        else:
            nouns = [_NOUNS.get(t, f"a {t.__name__}") for t in self.types]
            if Real in self.types and self.finite:
                nouns = ["a finite number" if n == "a number" else n for n in nouns]
            text = " or ".join(dict.fromkeys(nouns)) or "a value"
            if self.length is not None:
                text += f" of {self.length} items"
            elif self.min_length == 1:
                text = "a non-empty " + text.split(" ", 1)[1]
            elif self.min_length:
                text += f" of at least {self.min_length} items"
            if self.items is not None:
                text += f", each {self.items.accepts()}"
            rng = self.range_text()
            if rng:
                text += f" {rng}"
        return text + (" (or None)" if self.optional else "")

    # ------------------------------------------------------------------ checking
    def normalize(self, value: Any) -> Any:
        """Lists to tuples for tuple fields (TOML and JSON give lists), also inside elements."""
        if isinstance(value, list) and tuple in self.types and list not in self.types:
            value = tuple(value)
        if isinstance(value, tuple) and self.items is not None:
            items = tuple(self.items.normalize(v) for v in value)
            value = items if any(a is not b for a, b in zip(items, value)) else value
        return value

    def _type_ok(self, value: Any) -> bool:
        if not self.types:
            return True
        for t in self.types:
            if t is bool:
                if isinstance(value, bool):
                    return True
            elif isinstance(value, bool):
                continue
            elif t is Integral or t is Real:
                if isinstance(value, t):
                    return True
            elif isinstance(value, t):
                return True
        return False

    def problem(self, value: Any, name: str) -> str | None:
        """The complaint about ``value`` of option ``name`` (None when it is accepted)."""
        if value is None:
            return None if self.optional else f"{name} must be {self.accepts()}, got None"
        if self.choices is not None:
            choices = self._choices()
            if not any(value == c and isinstance(value, bool) == isinstance(c, bool)
                       and isinstance(value, str) == isinstance(c, str) for c in choices):
                return f"{name} must be {self.accepts()}, got {value!r}"
            return None
        if not self._type_ok(value):
            return f"{name} must be {self.accepts()}, got {value!r}"
        if isinstance(value, Real) and not isinstance(value, bool):
            if self.finite and not math.isfinite(value):
                return f"{name} must be {self.accepts()}, got {value!r}"
            bad = ((self.ge is not None and not value >= self.ge) or (self.gt is not None and not value > self.gt)
                   or (self.le is not None and not value <= self.le) or (self.lt is not None and not value < self.lt))
            if bad:
                return f"{name} must be {self.range_text()}{' (or None)' if self.optional else ''}, got {value!r}"
        if isinstance(value, (tuple, list, dict, str)):
            if (self.length is not None and len(value) != self.length) or len(value) < self.min_length:
                return f"{name} must be {self.accepts()}, got {value!r}"
        if isinstance(value, (tuple, list, dict)):
            if self.items is not None:
                pairs = value.items() if isinstance(value, dict) else enumerate(value)
                for k, v in pairs:
                    inner = self.items.problem(v, f"{name}[{k!r}]")
                    if inner is not None:
                        return inner
        if self.test is not None:
            try:
                self.test(value)
            except ConfigError as err:
                return f"{name}={value!r}: {err}"
        return None

    def coerce(self, value: Any) -> Any:
        """A command-line string in the declared type ("50" -> 50, "nan" -> nan, "none" -> None, "true" -> True);
        a string that does not parse is returned as it is (and refused by :meth:`problem`)."""
        if not isinstance(value, str):
            return self.normalize(value)
        text = value.strip()
        if self.choices is not None:  # e.g. true / false / "random": a bool word is the bool if it is a choice
            choices = self._choices()
            if value not in choices and text.lower() in _BOOL_WORDS and any(isinstance(c, bool) for c in choices):
                return _BOOL_WORDS[text.lower()]
            return value
        if str in self.types:
            return value
        if self.optional and text.lower() in ("none", "null"):
            return None
        if bool in self.types and text.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[text.lower()]
        if Integral in self.types:
            try:
                return int(text)
            except ValueError:
                pass
        if Real in self.types:
            try:
                return float(text)
            except ValueError:
                pass
        return value


def check(*types: type, ge: float | None = None, gt: float | None = None, le: float | None = None,
          lt: float | None = None, finite: bool = True, optional: bool = False,
          choices: tuple | Callable[[], Iterable] | None = None, items: "dict | Check | None" = None,
          length: int | None = None, min_length: int = 0, test: Callable[[Any], Any] | None = None) -> dict:
    """Field metadata declaring what the field accepts: ``field(default=1, metadata=check(Integral, ge=1))``.
    ``items`` (an element check, itself ``check(...)``) applies to each element of a tuple/list, each value
    of a dict."""
    if isinstance(items, dict):
        items = items[_KEY]
    return {_KEY: Check(tuple(types), ge, gt, le, lt, finite, optional, choices, items, length, min_length, test)}


def field_check(f: dataclasses.Field) -> Check | None:
    """The :class:`Check` a dataclass field declares (None if it declares none)."""
    return f.metadata.get(_KEY)


def config_error(what: str, detail: str) -> ConfigError:
    """``ConfigError("<what>: <detail>")`` that remembers ``detail`` (so :func:`build_config` can name the
    config as its caller does)."""
    err = ConfigError(f"{what}: {detail}")
    err.config_detail = detail  # type: ignore[attr-defined]  # lets build_config relabel the error
    return err


def validate(config: Any, what: str | None = None) -> None:
    """Run every field's declared check, then the config's ``_check_fields`` hook (cross-field rules).

    Raises one ConfigError ``"<what>: <option> must be ..., got ..."``; ``what`` defaults to the config's
    :meth:`Validated._config_what`. Lists given for tuple fields are stored as tuples.
    """
    what = what or (config._config_what() if hasattr(config, "_config_what") else type(config).__name__)
    for f in dataclasses.fields(config):
        chk = field_check(f)
        if chk is None:
            continue
        value = getattr(config, f.name)
        norm = chk.normalize(value)
        if norm is not value:
            object.__setattr__(config, f.name, norm)  # frozen configs too
        detail = chk.problem(norm, f.name)
        if detail is not None:
            raise config_error(what, detail)
    hook = getattr(config, "_check_fields", None)
    if hook is not None:
        try:
            hook()
        except ConfigError as err:
            raise config_error(what, str(err)) from None


class Validated:
    """Mixin of every config dataclass: construction (and ``dataclasses.replace``) runs :func:`validate`.

    Subclasses set ``config_what`` (how errors name the config) and may override :meth:`_check_fields`
    (cross-field rules; raise ConfigError, which is prefixed with the config's name)."""

    config_what: ClassVar[str] = ""

    def __post_init__(self) -> None:
        validate(self)

    def _config_what(self) -> str:
        return self.config_what or type(self).__name__

    def _check_fields(self) -> None:
        pass


def build_config(cls: type[T], options: dict[str, Any], what: str) -> T:
    """``cls(**options)`` from user options (CLI ``--set``, JSON, TOML), validated, errors naming ``what``.

    An unknown option raises one ConfigError that lists the known ones; strings are coerced to the declared
    type (:meth:`Check.coerce`: ``"fifty"`` stays a string and is refused as not an integer).
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    bad = sorted(set(options) - set(fields))
    if bad:
        raise ConfigError(f"{what} has no option(s) {', '.join(bad)}; options: {', '.join(sorted(fields))}")
    opts = {}
    for name, value in options.items():
        chk = field_check(fields[name])
        if chk is not None:
            value = chk.coerce(value)
            detail = chk.problem(value, name)
            if detail is not None:
                raise config_error(what, detail)
        opts[name] = value
    try:
        return cls(**opts)
    except ConfigError as err:
        detail = getattr(err, "config_detail", None)
        if detail is None:
            raise
        raise config_error(what, detail) from None

