"""bnkit in other tools: TorchScript, quantization (eager and FX), torch.func and Lightning.

``import bnkit`` imports this package, which registers what torch's own entry
points need (``__prepare_scriptable__`` for ``torch.jit.script``, fuser
methods and module mappings for ``torch.ao.quantization``). The Lightning
plugin lives in :mod:`bnkit.integrations.lightning`, imported on demand (it
needs the optional ``lightning`` extra).
"""

from . import func, quantization, torchscript

torchscript.install()
quantization.install()

__all__ = ["func", "quantization", "torchscript"]
