"""Distributed knowledge distillation on Ray: a teacher cache from Ray Data, students from Ray Train."""

__version__ = "0.1.0"
