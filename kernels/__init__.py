"""Pure torch math of Guidance Lab: paper equations, no ComfyUI import.

Conventions: x0-predictions ("denoised") have shape [B, C, *spatial]; every reduction is per sample over all
non-batch dims; functions never modify their arguments.
"""
