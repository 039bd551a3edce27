"""The torch.fx front end (``kc.transform``).

Tracing with a leaf policy and black boxes (``trace``), finding sites and other parameter uses (``scan``), plans
for opaque calls (``plans``), inserting the taps (``rewrite``).
"""
