"""RadiomicGAN core: CT I/O, kernel simulation, harmonization models and radiomic reproducibility.

Imports nothing from 3D Slicer; the Slicer modules are thin layers on this package.
"""

__version__ = "0.1.0"
