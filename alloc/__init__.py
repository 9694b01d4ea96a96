"""bitalloc: mixed-precision bit allocation — probe how sensitive each layer is, choose widths under a
budget of true bits per weight, quantize, pack and run. See DESIGN.md for the flow."""
from .api import allocate, measure, prepare, solve
from .errors import BitallocError
from .ggml.checkpoint import save_gguf
from .options import QuantSpec
from .packed import apply
from .plan import BitPlan
from .service.client import Client
from .units import Unit

__all__ = ["allocate", "apply", "measure", "prepare", "solve", "save_gguf", "BitallocError", "QuantSpec", "BitPlan", "Unit",
           "Client"]
__version__ = "0.1.0"
