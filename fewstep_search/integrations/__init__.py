"""Where a result meets the samplers people already run: a diffusers scheduler class and k-diffusion samplers.

Each module imports its client lazily (diffusers only in `diffusers_scheduler`), so `import fewstep_search` stays
cheap. The ComfyUI node lives outside the package, in the repository's `integrations/comfyui/` folder, because
ComfyUI loads custom nodes from a folder of their own.
"""
