"""CDC-MMPG-style backpropagation-free on-device adaptation (arXiv 2406.01601, issue 8).

A cloud Fast Domain Adaptor (``models.FDA``, a hypernetwork) generates the device model's fusion and
head parameters from anchor frame features that the device's AnchorFrame Distribution Reasoner
(``adr``) selects from its own unlabeled frames; the device (``device``) runs forward passes only.
Only the paper's abstract is known: everything here follows the reference design of
``shared/specs/cdc.md`` section 5, which is inferred, hence "CDC-MMPG-style".
"""
