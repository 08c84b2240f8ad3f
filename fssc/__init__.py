"""fssc: compile ONNX graphs into secure two-party programs (function secret sharing).

The code lives in top-level folders mapped into this namespace:
``fssc.compiler`` (compiler/), ``fssc.passes`` (passes/), ``fssc.runtime``
(runtime/) and ``fssc.models`` (models/).
"""

__version__ = "0.1.0"
