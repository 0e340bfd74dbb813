"""Adapters to other libraries; each submodule imports its library (an optional extra)."""
