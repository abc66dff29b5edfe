"""Students cut from a teacher: keep some of its decoder layers (every k-th, or the first A and the last B),
optionally narrow their MLPs, and save an ordinary HF folder with the teacher's tokenizer.

  derive_student(teacher, keep_every=2 | first=A, last=B, width_factor=F)   the cut model (weights copied)
  derive_student_dir(teacher_dir, out_dir, spec)                           the same, saved atomically
  student_dir(spec, teacher, out)                                          a stage's student: a folder as given,
                                                                           or a `derive:` spec cut once into
                                                                           <out>/derived-student
  parse_derive_spec / derive_name                                          `derive:keep_every=K[,width_factor=F]`
                                                                           / `derive:first=A,last=B` specs
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from raysad.atomic_dir import write_atomically
from raysad.models import load_model, load_tokenizer, save_tokenizer, without_weight_init


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
    if not 0 < width_factor <= 1:
        raise ValueError(f"width_factor must be in (0, 1], got {width_factor}")
    if isinstance(teacher, (str, Path)):
        teacher = load_model(teacher, device="cpu")
    where = _where(teacher)
    _refuse_quantised(teacher, where)
    stack_name, layers = _layer_stack(teacher)
    n = len(layers)
    ends = first is not None or last is not None
    kept = kept_layers(n, None if ends else keep_every, first, last)
    config = _cut_config(copy.deepcopy(teacher.config), kept, n, where)
    prefix = stack_name + "."
    new_state = _kept_layer_state(teacher.state_dict(), prefix, kept)
    if width_factor < 1:
        _narrow_mlps(new_state, config, prefix, kept, width_factor, teacher, where)
    student = _student_from_state(teacher, config, new_state, kept, where)
    _check_runs(student, kept, n, where)
    return student


def _refuse_quantised(teacher, where: str) -> None:
    quant = getattr(teacher.config, "quantization_config", None)
    if quant is not None or getattr(teacher, "is_quantized", False):
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        raise DeriveError(f"{where}: quantised weights ({method}) cannot be cut into a student; derive from a "
                          "full-precision folder (a GGUF: `raysad convert gguf FILE --out DIR` first)")


def _kept_layer_state(state: dict, prefix: str, kept: list[int]) -> dict:
    """The teacher's state dict with only the kept layers, renumbered 0, 1, ... (other weights as they are)."""
    new_state = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            new_state[key] = value
            continue
        index, tail = key[len(prefix):].split(".", 1)
        if int(index) in kept:
            new_state[f"{prefix}{kept.index(int(index))}.{tail}"] = value
    return new_state


def _narrow_mlps(new_state: dict, config, prefix: str, kept: list[int], width_factor: float, teacher,
                 where: str) -> None:
    """Keep the width_factor share of each kept layer's MLP channels with the largest weight norms (in place),
    and set config.intermediate_size to match."""
    import torch

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


def _student_from_state(teacher, config, new_state: dict, kept: list[int], where: str):
    """A model of the teacher's class, dtype and device from `config`, holding exactly `new_state`, in eval mode."""
    dtype, device = next(teacher.parameters()).dtype, next(teacher.parameters()).device
    try:
        with without_weight_init():  # every weight is copied below (a missing one is an error): skip random init
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
    return student.to(device).eval()


def _check_runs(student, kept: list[int], n: int, where: str) -> None:
    """One forward pass: a cut that leaves an inconsistent model (e.g. no full-attention layer left) fails
    here, not later."""
    import torch

    in_emb = student.get_input_embeddings()
    vocab = in_emb.num_embeddings if in_emb is not None else 4
    device = next(student.parameters()).device
    try:
        with torch.no_grad():
            student(torch.arange(min(4, vocab), device=device)[None])
    except Exception as err:  # noqa: BLE001 - any failure means this cut is unsupported
        raise DeriveError(f"{where}: the derived student (layers {kept} of {n}) does not run: "
                          f"{_first_line(err)}") from err


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

    return write_atomically(out_dir, write, replace=True)  # a model folder there before: replaced whole


def student_dir(spec: str, teacher: str | None, out: str | Path) -> str:
    """The student a stage trains: `spec` itself (a folder, a tiny size name), or, for a `derive:` spec, the
    student cut from `teacher` once into <out>/derived-student (a rerun reuses it)."""
    if not is_derive_spec(spec):
        return spec
    if not teacher:
        raise ValueError(f"--student {spec}: a derived student is cut from --teacher DIR; give it")
    parse_derive_spec(spec)  # a bad spec fails here, in one line
    folder = Path(out) / "derived-student"
    if not (folder / "config.json").is_file():
        derive_student_dir(teacher, folder, spec)
    return str(folder)
