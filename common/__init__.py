"""Shared diffusion core. Imports no method package, ever."""
