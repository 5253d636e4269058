"""Tokenization-free on-device diffusion (arXiv 2411.06119): TFDiff over the shared DDPM trainer.

``mobile.model`` registers the ``tfdiff`` network, ``mobile.uvit`` the ``uvit`` baseline;
``mobile.method`` is found by ``config.method = "mobile"``. See WORKSPACE.md and mobile/RESULTS.md.
"""
