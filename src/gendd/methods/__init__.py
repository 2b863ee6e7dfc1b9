"""Distillation methods, registered by name (``gendd methods`` lists them)."""

from gendd.methods.base import (ClassContext, ClassResult, Method, MethodConfig, available_methods, build_method,
                                get_method, seed_for)

__all__ = ["ClassContext", "ClassResult", "Method", "MethodConfig", "available_methods", "build_method",
           "get_method", "register_method", "seed_for"]
