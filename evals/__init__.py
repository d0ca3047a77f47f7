"""Representation evaluations over the uniform dual-network interface (see ccl_repr.models)."""
