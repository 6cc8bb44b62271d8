"""Slicer-side layer of RadiomicGAN shared by its modules: MRML in and out, no qt, so it runs (and is
tested) against the real MRML classes without the Slicer application."""
