"""User tools built on the library: the model zoo (:mod:`kfc_compile.tools.zoo`), the demo
(:mod:`kfc_compile.tools.demo`) and the ``kfc-compile`` command (:mod:`kfc_compile.tools.cli`).

The core (``import kfc_compile``) never imports this package.
"""
