"""ComfyUI integration of Guidance Lab: model patches, samplers and guiders built on `kernels/`."""
