"""pytest configuration for the whole checkout: ``tests/`` and the package's doctests (``pyobc/``).

The torchvision wheel on the package index is a CUDA build that fails to import beside the CPU torch
(``operator torchvision::nms does not exist`` in ``torchvision/_meta_registrations.py``), and transformers
imports torchvision when it is installed. An empty stand-in for that one module makes the model
constructors importable; it is installed here, for test runs only (``tests/real_models.py`` does the same
for scripts that import it directly). pyobc itself never imports torchvision. See ``docs/models.md``.
"""
import sys
import types

sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
