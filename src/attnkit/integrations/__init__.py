"""Bridges to other libraries (each imported lazily; see the submodules)."""
