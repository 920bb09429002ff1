"""Glue to third-party libraries. Each submodule imports its library only when used, so it stays optional."""
