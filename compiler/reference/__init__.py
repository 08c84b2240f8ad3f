"""The oracles: float and fixed-point interpreters, the in-memory simulation of generated programs,
and the cross-check behind ``fssc compile --verify``."""
