"""User tools built on the library: the model zoo, the demo and the ``kfc-compile`` command.

Modules: :mod:`kfc_compile.tools.zoo`, :mod:`kfc_compile.tools.demo` and :mod:`kfc_compile.tools.cli`.

The core (``import kfc_compile``) never imports this package.
"""
