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

    result = autoslim.search(autoslim.load_study_spec(budget="2MB"))   # an Optuna study
    view = autoslim.load_study("default")          # view.trials: a pandas DataFrame
    row = autoslim.pick(view, max_size=2_000_000, min_accuracy=0.91, prefer="latency")
    autoslim.export_trial(view, int(row.trial), "model.onnx")   # verified against the record
    autoslim.refine(view, int(row.trial), "final.onnx")         # longer KD + QAT, stored beside
"""

import importlib
from typing import TYPE_CHECKING, Any

# Public names load their module on first use (PEP 562): ``import autoslim.measure`` or
# ``autoslim agent`` on a device pulls in neither torch nor optuna.
_LAZY = {
    "AutoslimError": ".errors",
    "Compressed": ".pipeline",
    "CompressionConfig": ".config",
    "ConfigError": ".errors",
    "DataError": ".errors",
    "DataSplits": ".data",
    "DistillConfig": ".config",
    "ExportError": ".errors",
    "LayerConfig": ".config",
    "ModelError": ".errors",
    "NothingQualifies": ".results.selection",
    "Recovery": ".passes.distill",
    "RefineRecipe": ".results.refinement",
    "SearchResult": ".workflow",
    "Split": ".data",
    "StudySpec": ".study.spec",
    "StudyView": ".results.view",
    "Teacher": ".teacher",
    "TeacherRecipe": ".teacher",
    "UsageError": ".errors",
    "build_model": ".models",
    "compress": ".pipeline",
    "export": ".pipeline",
    "export_trial": ".results.export",
    "get_teacher": ".teacher",
    "list_datasets": ".data",
    "list_groups": ".passes.prune",
    "list_models": ".models",
    "load_dataset": ".data",
    "load_study": ".results.view",
    "load_study_spec": ".study.spec",
    "pick": ".results.selection",
    "refine": ".results.refinement",
    "search": ".workflow",
    "train_teacher": ".teacher",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'autoslim' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .config import CompressionConfig, DistillConfig, LayerConfig
    from .data import DataSplits, Split, list_datasets, load_dataset
    from .errors import AutoslimError, ConfigError, DataError, ExportError, ModelError, UsageError
    from .models import build_model, list_models
    from .passes.distill import Recovery
    from .passes.prune import list_groups
    from .pipeline import Compressed, compress, export
    from .results.export import export_trial
    from .results.refinement import RefineRecipe, refine
    from .results.selection import NothingQualifies, pick
    from .results.view import StudyView, load_study
    from .study.spec import StudySpec, load_study_spec
    from .teacher import Teacher, TeacherRecipe, get_teacher, train_teacher
    from .workflow import SearchResult, search

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
    "NothingQualifies",
    "Recovery",
    "RefineRecipe",
    "SearchResult",
    "Split",
    "StudySpec",
    "StudyView",
    "Teacher",
    "TeacherRecipe",
    "UsageError",
    "build_model",
    "compress",
    "export",
    "export_trial",
    "get_teacher",
    "list_datasets",
    "list_groups",
    "list_models",
    "load_dataset",
    "load_study",
    "load_study_spec",
    "pick",
    "refine",
    "search",
    "train_teacher",
]
