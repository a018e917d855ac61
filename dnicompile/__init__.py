"""dnicompile: compile PyTorch models into decoupled stages trained with synthetic gradients."""

from .errors import DNIError, ModelError, PartitionError, SpecError
from .program import Cut, DecoupledProgram, Stage, compile_decoupled
from .spec import CutSpec, Spec, load_spec
from .train.api import fit

__all__ = [
    "Cut",
    "CutSpec",
    "DNIError",
    "DecoupledProgram",
    "ModelError",
    "PartitionError",
    "Spec",
    "SpecError",
    "Stage",
    "compile_decoupled",
    "fit",
    "load_spec",
]
__version__ = "0.1.0"
