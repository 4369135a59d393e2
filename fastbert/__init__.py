"""fastbert: BERT encoders from hand-written kernels, a drop-in for ``transformers``.

    from fastbert import BertModel          # instead of: from transformers import BertModel
    model = BertModel.from_pretrained(path)
"""

from .modeling_bert import BertModel
from .optimize import optimize

__version__ = "0.1.0"
__all__ = ["BertModel", "optimize", "__version__"]
