"""fewstep-search: search sampling schedules that make diffusion models sample well in 3-10 steps."""
__version__ = "0.1.0"
