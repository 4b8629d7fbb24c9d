"""Load any model to evaluate as an Embedder: a hub id, a local directory, or a training checkpoint.

* ``*.ckpt`` (a DistillModule checkpoint from ``dewey-lab fit``): the student and its projection
  head are rebuilt from the saved hyper-parameters; vectors live in the teacher's space, as trained.
* a sentence-transformers directory or hub id: the transformer's weights, with the pooling
  (cls / mean) and the query / document prompts its own config declares, so a baseline scores as
  it does in sentence-transformers.
* any other transformers encoder (directory or hub id): mean pooling unless told otherwise.

The window (``max_length``) is the model's position table, capped by the tokenizer's limit: 512
for BERT-style models such as all-MiniLM-L6-v2 (LongEmbed evaluates them at 512 too, although
sentence-transformers caps that model at 256).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel

from dewey_lab.eval.embedder import Embedder, check_length, window_of
from dewey_lab.resolve import is_local, model_fingerprint, resolve_model
from dewey_lab.student import load_tokenizer, pick_attn_implementation

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """bf16 on a GPU that has it (Dewey: fp16 overflows to NaN), fp32 elsewhere."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be auto, float32 or bfloat16 (fp16 gives NaNs at length), got {dtype!r}")
    return getattr(torch, dtype)


def load_embedder(model: str, *, pooling: str | None = None, max_length: int | None = None,
                  query_prompt: str | None = None, passage_prompt: str | None = None, device: str = "auto",
                  dtype: str = "auto", revision: str | None = None, extension=None, window: int | None = None,
                  **kwargs) -> Embedder:
    """An Embedder for ``model``; ``None`` arguments take the model's own defaults.

    Args:
        model: hub id, local directory, ``pkg://`` packaged model, or a ``.ckpt`` from training.
        pooling: cls, mean or cls_mean; default: the sentence-transformers config, else mean.
        max_length: tokens per passage; default: the model's window.
        query_prompt, passage_prompt: default: the prompts the model declares, else none.
        device, dtype: auto picks CUDA + bf16 when present, else CPU + fp32.
        revision: hub revision (a commit pins it).
        extension: a context-window extension (an Extension or a name like ``pi``); ``max_length``
            is then its target length.
        window: the model's original window L_o (default: its position table).
        kwargs: the rest of Embedder's arguments (chunk_size, chunk_overlap, token_budget, ...).
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    if model.endswith(".ckpt"):
        e = _from_checkpoint(model, dev, dt, pooling, query_prompt, passage_prompt, **kwargs)
        return extend(e, extension, max_length, window)
    path = resolve_model(model)  # one-line FileNotFoundError for a path that does not exist
    local = is_local(model)
    st = _sentence_transformers_config(path, local, revision)
    config = AutoConfig.from_pretrained(path, local_files_only=local, revision=revision)
    tokenizer = load_tokenizer(model)
    net = AutoModel.from_pretrained(path, config=config, local_files_only=local, revision=revision,
                                    attn_implementation=_attn_for(config)).to(dev)
    prompts = st.get("prompts", {})
    head = st.get("head")
    e = Embedder(
        net, tokenizer, head=head.to(dev) if head is not None else None, pooling=pooling or st.get("pooling", "mean"),
        mean_over=st.get("mean_over", "content"), max_length=st.get("max_length") or window_of(config, tokenizer),
        query_prompt=prompts.get("query", "") if query_prompt is None else query_prompt,
        passage_prompt=(prompts.get("document", prompts.get("passage", "")) if passage_prompt is None
                        else passage_prompt),
        name=_display_name(model, path, local), fingerprint=model_fingerprint(model, revision),
        device=dev, dtype=dt, **kwargs)
    return extend(e, extension, max_length, window)


def extend(embedder: Embedder, extension=None, max_length: int | None = None, window: int | None = None) -> Embedder:
    """A copy of ``embedder`` that reads ``max_length`` tokens, through ``extension`` if given.

    Without an extension, ``max_length`` may not exceed a learned position table (one-line error);
    with one, the extension is bound to the model (window L_o -> max_length) and says whether it fits.
    """
    from dewey_lab.eval.extension import parse_extension

    e = copy.copy(embedder)
    e.window = window or embedder.window
    ext = parse_extension(extension)
    if ext is None:
        e.extension = None
        e.max_length = check_length(e.model.config, e.window, max_length)
        return e
    e.extension = copy.deepcopy(ext).bind(e.model, e.window, max_length or e.window)
    e.max_length = e.extension.target
    return e


def _display_name(model: str, path: str, local: bool) -> str:
    if model.startswith("pkg://"):
        return model.removeprefix("pkg://")
    if not local:
        return model
    p = Path(path)
    return f"{p.parent.name}/{p.name}" if p.name in ("model", "export", "final", "best") else p.name


def _attn_for(config) -> str:
    # flash-attn where it runs for ModernBERT; sdpa for the rest (every recent encoder has it)
    return pick_attn_implementation("auto") if config.model_type == "modernbert" else "sdpa"


def _sentence_transformers_config(path: str, local: bool, revision: str | None) -> dict:
    """Pooling mode and prompts from a sentence-transformers layout; {} when it is not one."""
    def read(name: str) -> dict | None:
        if local:
            f = Path(path) / name
            return json.loads(f.read_text()) if f.exists() else None
        from transformers.utils import cached_file

        try:
            f = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        return json.loads(Path(f).read_text()) if f else None

    modules = read("modules.json")
    if not modules:
        return {}
    out: dict = {"prompts": (read("config_sentence_transformers.json") or {}).get("prompts", {}),
                 "mean_over": "all"}
    for mod in modules:
        kind = mod.get("type", "")
        if kind.endswith("Pooling"):
            pool = read(f"{mod['path']}/config.json") or {}
            modes = pool.get("pooling_mode")  # sentence-transformers >= 5; older files name each mode
            modes = [modes] if isinstance(modes, str) else list(modes or [])
            if not modes:
                modes = [m for m in ("cls", "mean") if pool.get(f"pooling_mode_{m}_token" if m == "cls"
                                                             else f"pooling_mode_{m}_tokens")]
            out["pooling"] = "cls_mean" if modes == ["cls", "mean"] else "cls" if modes == ["cls"] else "mean"
        elif kind.endswith("WordWeights"):  # dewey-lab export: special tokens weigh 0 -> text tokens only
            out["mean_over"] = "content"
        elif kind.endswith("Dense"):
            out["dense"] = mod["path"]
    exported = read("dewey_lab.json")  # dewey-lab export records the max length it was built for
    if exported:
        out["max_length"] = exported["max_length"]
    if out.get("dense") and local:
        out["head"] = _dense_head(Path(path) / out["dense"], halves=out.get("pooling") == "cls_mean")
    return out


def _dense_head(folder: Path, halves: bool) -> torch.nn.Linear:
    """A sentence-transformers Dense (identity activation, as dewey-lab export writes) as a Linear."""
    cfg = json.loads((folder / "config.json").read_text())
    act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity"))
    if not act.endswith("Identity"):
        raise ValueError(f"{folder}: Dense with activation {act} is not supported; only identity (dewey-lab export)")
    weights = folder / "model.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        state = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    w, b = state["linear.weight"], state.get("linear.bias")
    if halves:  # [cls, mean] -> 0.5 W (cls + mean): the Embedder pools cls_mean first, then W
        w = 2 * w[:, : w.shape[1] // 2]
    head = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        head.weight.copy_(w)
        if b is not None:
            head.bias.copy_(b)
    return head


def load_checkpoint(path: str):
    """The DistillModule of a ``dewey-lab fit`` checkpoint, on CPU, in eval mode."""
    from dewey_lab.module import DistillModule
    from dewey_lab.student import StudentConfig

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; runs keep them under "
                                "runs/<experiment>/<version>/checkpoints/")
    with torch.serialization.safe_globals([StudentConfig]):  # our hparams dataclass; weights-only load
        module = DistillModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if module.projection is None:
        raise ValueError(f"{path} has no projection head (trained before teacher_dim was saved); retrain it")
    return module.eval()


def _from_checkpoint(path: str, dev, dt, pooling, query_prompt, passage_prompt, **kwargs) -> Embedder:
    module = load_checkpoint(path).to(dev)
    tokenizer = load_tokenizer(module.spec.tokenizer_name)
    return Embedder(module.student, tokenizer, head=module.projection, pooling=pooling or "mean",
                    max_length=module.student.config.max_position_embeddings, query_prompt=query_prompt or "", passage_prompt=passage_prompt or "",
                    name=Path(path).parent.parent.name + "/" + Path(path).stem,
                    fingerprint=model_fingerprint(path), device=dev, dtype=dt, **kwargs)
