"""Text-to-image pipeline folders (SD 1.x / 2.x, SDXL, SD3, Flux) with a prompt set and guidance, as denoisers.

`folder` reads what a pipeline folder holds, `prompts` embeds a prompt set once with the pipeline's own encoder,
`guided` builds the guided denoiser the rest of the tool works on (docs/models.md, "Text-to-image pipelines").
"""
