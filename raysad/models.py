"""Models and tokenizers: load any local HF causal LM, build tiny ones offline (students cut from a teacher:
raysad.students).

Everything here produces ordinary Hugging Face artifacts (`save_pretrained` directories), so the same model
loads with AutoModelForCausalLM / AutoTokenizer, in Ray Train workers and in vLLM.

  load_model / load_tokenizer     a local HF directory (never the hub)
  train_tokenizer                 byte-level BPE trained on the environments' text
  build_tiny_model, init_model_dir  Llama-style models of ~1M / 5M / 20M parameters
  check_same_tokenizer            may these two models be distilled with logits? (clear error if not)

A GGUF file becomes an HF directory with raysad.convert (`raysad convert`).
"""
from __future__ import annotations

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


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bfloat16 matmuls in hardware (AMX tiles or AVX512-BF16)? Where it does not, bf16 is
    emulated and slower than float32."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private but stable since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


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


def without_weight_init():
    """A context that skips random weight init, for a model whose every weight is then copied in (from a teacher,
    or from a dequantised GGUF)."""
    import contextlib

    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:  # pragma: no cover
            return contextlib.nullcontext()
    return no_init_weights()


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
