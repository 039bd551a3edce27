"""Front ends: turning a model into graphs with capture taps.

``fx`` is ``kc.transform``'s torch.fx pass; ``dynamo`` is the ``kfc`` torch.compile backend. Both recognise layers
through ``kfc_compile.sites``.
"""
