"""Layer sites, shared by the fx pass and the dynamo backend.

The kinds of conv/linear calls KFC covers (``kinds``), their geometry (``geometry``), and the one place that decides
which weights become KFC layers (``coverage``).
"""
