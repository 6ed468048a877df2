"""Subcommands of the `fewstep-search` CLI, one module each (`add_parser`, `run`)."""
