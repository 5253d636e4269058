"""CollaFuse (arXiv 2406.14429): split training of a diffusion model between a shared server
(noisy steps, t > cut_point) and private clients (the last cut_point steps, private data).

Modules are named after the paper's parts: ``protocol`` (the one function data crosses the
client/server boundary through), ``client`` (the client's loss and the cut image), ``server`` (the
server's loss and its half of sampling), ``method`` (the pieces wired into the shared loop).
"""
