"""Evaluate distilled sets: students, DSA augmentation, protocols and the training loop."""

from gendd.evaluate.augment import AUGMENT_GROUPS, DEFAULT_STRATEGY, DSAParams, DSAugment
from gendd.evaluate.protocols import (
    PROFILES,
    DSAProtocol,
    IDCHardProtocol,
    Protocol,
    SoftLabelProtocol,
    get_profile,
    ipc_epochs,
    soft_batch_size,
)
from gendd.evaluate.students import STUDENTS, ConvNet, ResNet, build_student, register_student
from gendd.evaluate.teacher import (Teacher, TeacherConfig, load_teacher, teacher_features, teacher_logits,
                                    train_teacher)
from gendd.evaluate.data import accuracy, format_result, normalize, prepare_test
from gendd.evaluate.fit import StudentRun, fit_student
from gendd.evaluate.train import evaluate_distilled, train_student

__all__ = [
    "AUGMENT_GROUPS", "DEFAULT_STRATEGY", "DSAParams", "DSAugment",
    "PROFILES", "DSAProtocol", "IDCHardProtocol", "Protocol", "SoftLabelProtocol", "get_profile",
    "ipc_epochs", "soft_batch_size",
    "STUDENTS", "ConvNet", "ResNet", "build_student", "register_student",
    "Teacher", "TeacherConfig", "load_teacher", "teacher_features", "teacher_logits", "train_teacher",
    "accuracy", "evaluate_distilled", "format_result", "normalize", "prepare_test",
    "train_student", "StudentRun", "fit_student",
]
