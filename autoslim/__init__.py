"""autoslim: AutoML compression search for PyTorch vision models.

Every candidate is compressed (structural pruning, low-rank, mixed-precision quantization),
recovered by distillation, exported to the ONNX file a user would deploy, and measured on that
file. Public API::

    import autoslim
    data = autoslim.load_dataset("fashion-mnist")
    teacher = autoslim.get_teacher("resnet18", data)
    cfg = autoslim.CompressionConfig.uniform(prune=0.5, weight_bits=8, groups=[...])
    c = autoslim.compress(teacher.model, cfg, data=data)
    autoslim.export(c, "model.onnx", check=data.val)
"""

from .config import CompressionConfig, DistillConfig, LayerConfig
from .data import DataSplits, Split, list_datasets, load_dataset
from .errors import AutoslimError, ConfigError, DataError, ExportError, ModelError, UsageError
from .models import build_model, list_models
from .passes.distill import Recovery
from .passes.prune import list_groups
from .pipeline import Compressed, compress, export
from .teacher import Teacher, TeacherRecipe, get_teacher, train_teacher

__version__ = "0.1.0"

__all__ = [
    "AutoslimError",
    "Compressed",
    "CompressionConfig",
    "ConfigError",
    "DataError",
    "DataSplits",
    "DistillConfig",
    "ExportError",
    "LayerConfig",
    "ModelError",
    "Recovery",
    "Split",
    "Teacher",
    "TeacherRecipe",
    "UsageError",
    "build_model",
    "compress",
    "export",
    "get_teacher",
    "list_datasets",
    "list_groups",
    "list_models",
    "load_dataset",
    "train_teacher",
]
