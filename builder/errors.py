"""Errors the builder raises for bad input; the CLI prints them as one line and exits 2."""


class BuildInputError(ValueError):
    """The model spec, data, shape or options given to the builder are invalid."""


class GateError(RuntimeError):
    """No candidate passed the fidelity gate, so no bundle can be written."""
