"""Evaluate distilled sets: students, DSA augmentation, protocols and the training loop."""

from gendd.evaluate.augment import AUGMENT_GROUPS, DEFAULT_STRATEGY, DSAParams, DSAugment
from gendd.evaluate.protocols import PROFILES, DSAProtocol, get_profile
from gendd.evaluate.students import STUDENTS, ConvNet, build_student, register_student
from gendd.evaluate.train import (
    accuracy,
    evaluate_distilled,
    format_result,
    normalize,
    prepare_test,
    train_student,
)

__all__ = [
    "AUGMENT_GROUPS", "DEFAULT_STRATEGY", "DSAParams", "DSAugment",
    "PROFILES", "DSAProtocol", "get_profile",
    "STUDENTS", "ConvNet", "build_student", "register_student",
    "accuracy", "evaluate_distilled", "format_result", "normalize", "prepare_test",
    "train_student",
]
