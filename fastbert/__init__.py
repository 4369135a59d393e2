"""fastbert: BERT encoders from hand-written kernels, a drop-in for ``transformers``.

    from fastbert import BertModel          # instead of: from transformers import BertModel
    model = BertModel.from_pretrained(path)
"""

from .modeling_bert import BertModel

__version__ = "0.1.0"
__all__ = ["BertModel", "__version__"]
