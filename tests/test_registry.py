"""One registry style (gendd.registry): the same lookup error, listing and registration for every registry."""

from __future__ import annotations

import pytest

from gendd.errors import ConfigError
from gendd.registry import Registry


def _registries():
    from gendd.blocks.memory import EVICTION_POLICIES
    from gendd.blocks.modes import MODE_METHODS
    from gendd.data import DATASETS
    from gendd.evaluate.protocols import PROFILES
    from gendd.evaluate.students import STUDENTS
    from gendd.methods.base import METHODS

    return {"method": METHODS, "student": STUDENTS, "evaluation profile": PROFILES, "dataset": DATASETS,
            "mode method": MODE_METHODS, "memory eviction": EVICTION_POLICIES}


def test_builtins_are_loaded_on_first_use_only():
    calls = []
    reg = Registry("thing", lambda: calls.append(1) or {"b": 2, "a": 1})
    assert calls == []
    assert reg.get("a") == 1 and reg["b"] == 2 and reg.names() == ["a", "b"] and list(reg) == ["a", "b"]
    assert "a" in reg and "z" not in reg and len(reg) == 2 and reg.items() == [("a", 1), ("b", 2)]
    assert calls == [1]


def test_register_adds_and_refuses_a_taken_name():
    reg = Registry("thing", lambda: {"a": 1})
    assert reg.register("c", 3) == 3 and reg.get("c") == 3
    with pytest.raises(ConfigError, match="thing 'a' is registered already"):
        reg.register("a", 9)
    with pytest.raises(ConfigError, match="non-empty name"):
        reg.register("", 9)


@pytest.mark.parametrize("kind", ["method", "student", "evaluation profile", "dataset", "mode method",
                                  "memory eviction"])
def test_every_registry_refuses_an_unknown_name_the_same_way(kind):
    reg = _registries()[kind]
    assert reg.kind == kind and len(reg.names()) >= 3 and reg.names() == sorted(reg.names())
    with pytest.raises(ConfigError) as err:
        reg.get("no-such-name")
    assert str(err.value) == f"unknown {kind} 'no-such-name'; choose one of: {', '.join(reg.names())}"


def test_user_student_registers_at_run_time():
    from gendd.evaluate.students import STUDENTS, build_student, register_student

    @register_student("tiny-linear-test")
    def _tiny(channels, num_classes, image_size):
        import torch

        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(channels * image_size ** 2, num_classes))

    try:
        assert build_student("tiny-linear-test", 1, 3, 4)(__import__("torch").zeros(2, 1, 4, 4)).shape == (2, 3)
        with pytest.raises(ConfigError, match="registered already"):
            register_student("convnet3")(_tiny)
    finally:
        STUDENTS._all().pop("tiny-linear-test")
