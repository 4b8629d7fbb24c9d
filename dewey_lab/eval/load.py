"""Load any model to evaluate as an Embedder: a hub id, a local directory, or a training checkpoint.

* ``*.ckpt`` (a DistillModule checkpoint from ``dewey-lab fit``): the student, its pooling heads and
  its projection are rebuilt from the checkpoint (hyper-parameters, the heads' record, weights) and it
  pools with the whole-text head it trained unless ``pooling`` says otherwise; vectors live in the
  teacher's space, as trained. A run directory (``runs/<study>/<variant>``) means its
  ``checkpoints/last.ckpt``, the end of its training; an experiment's run folder (``runs/tiny``) its
  newest finished run's.
* ``untrained:<checkpoint or run directory>``: that run's student, heads and projection with freshly
  initialised weights (seed 0): the untrained reference of a study, same shape, same code path.
* a sentence-transformers directory or hub id: the transformer's weights, with the pooling
  (cls / mean / lasttoken), Dense head(s) and the query / document prompts its own config declares,
  so a baseline scores as it does in sentence-transformers. A module or pooling mode we cannot
  reproduce is a one-line error, never a silent substitute.
* a decoder embedder (E5-Mistral, Linq-Embed-Mistral, Qwen3-Embedding; any causal-LM backbone):
  last-token pooling over an appended EOS with right padding, an instruction on queries only,
  bf16 weights on CUDA, and the RoPE extensions (pi, ntk, yarn) on its layers.
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
from dewey_lab.model.pooling import PoolingHead
from dewey_lab.model.student import load_tokenizer, pick_attn_implementation
from dewey_lab.resolve import is_local, model_fingerprint, resolve_model

log = logging.getLogger(__name__)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(device)


def pick_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """``auto``: bf16 where the hardware has bf16 matrix units (a CUDA GPU with bf16; a CPU with AMX-BF16 or
    AVX-512 BF16: fp32 weights under bf16 autocast), fp32 elsewhere (``dewey_lab.precision``). Never fp16
    (Dewey: it overflows to NaN)."""
    if dtype == "auto":
        from dewey_lab.precision import auto_bf16

        return torch.bfloat16 if auto_bf16(device) else torch.float32
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
        pooling: a ``PoolingHead`` name (``PoolingHead.choices()``: cls, mean, cls_mean, last, attention, ...);
            default: a checkpoint's trained whole-text head, else the sentence-transformers config, else last
            for a decoder (E5-Mistral style: EOS appended, right padding) and mean for an encoder. A head with
            learned weights (attention) only where it was trained.
        max_length: tokens per passage; default: the model's window.
        query_prompt, passage_prompt: default: the prompts the model declares, else none (a decoder's
            queries get LongEmbed's E5-Mistral instruction, its passages nothing).
        device, dtype: auto picks CUDA when present, and bf16 where the device has bf16 matrix units (CUDA,
            or a CPU with AMX / AVX-512 BF16: bf16 autocast over fp32 weights), else fp32.
        revision: hub revision (a commit pins it).
        extension: a context-window extension (an Extension or a name like ``pi``); ``max_length``
            is then its target length.
        window: the model's original window L_o (default: its position table).
        kwargs: the rest of Embedder's arguments (chunk_size, chunk_overlap, token_budget, ...).
    """
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    untrained = model.startswith(UNTRAINED)
    ckpt = run_checkpoint(model.removeprefix(UNTRAINED))
    if ckpt is not None:
        e = _from_checkpoint(ckpt, dev, dt, pooling, query_prompt, passage_prompt, untrained=untrained, **kwargs)
        return extend(e, extension, max_length, window)
    if untrained:
        raise ValueError(f"{model}: untrained: takes a training checkpoint (.ckpt) or a run directory with "
                         "checkpoints/last.ckpt, e.g. untrained:runs/small/version_0")
    path = resolve_model(model)  # one-line FileNotFoundError for a path that does not exist
    local = is_local(model)
    st = _sentence_transformers_config(path, local, revision)
    config = AutoConfig.from_pretrained(path, local_files_only=local, revision=revision)
    tokenizer = load_tokenizer(model)
    decoder = is_decoder(config)
    load_kwargs = {}
    if decoder:
        if getattr(config, "sliding_window", None) is not None and config.model_type == "mistral":
            # LongEmbed's reference sets sliding_window = None for E5-Mistral: one full-attention pass
            log.info("%s: Mistral's %d-token sliding window is switched off, as LongEmbed's reference does",
                     model, config.sliding_window)
            config.sliding_window = None
        config.use_cache = False  # one forward pass per input: no KV cache (32k tokens of keys per layer)
        if dt == torch.bfloat16:  # a 7B decoder: bf16 weights, not fp32 ones under autocast
            load_kwargs["dtype"] = torch.bfloat16
    net = AutoModel.from_pretrained(path, config=config, local_files_only=local, revision=revision,
                                    attn_implementation=_attn_for(config), **load_kwargs).to(dev)
    prompts = st.get("prompts", {})
    head = st.get("head")
    default_pooling = st.get("pooling", "last" if decoder else "mean")
    e = Embedder(
        net, tokenizer, head=head.to(dev) if head is not None else None, pooling=pooling or default_pooling,
        mean_over=st.get("mean_over", "content"), max_length=st.get("max_length") or window_of(config, tokenizer),
        query_prompt=_query_prompt(prompts, decoder) if query_prompt is None else query_prompt,
        passage_prompt=(prompts.get("document", prompts.get("passage", "")) if passage_prompt is None
                        else passage_prompt),
        name=_display_name(model, path, local), fingerprint=model_fingerprint(model, revision),
        device=dev, dtype=dt, **kwargs)
    return extend(e, extension, max_length, window)


DECODER_INSTRUCTION = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "
"""The query instruction LongEmbed's reference gives E5-Mistral on every task (its "Needles" task definition)."""


def is_decoder(config) -> bool:
    """A causal LM backbone (Mistral, Llama, Qwen, ...): in transformers' causal-LM table and not an
    encoder with a masked-LM head too (BERT and ModernBERT are in both)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", "")
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _query_prompt(prompts: dict, decoder: bool) -> str:
    """The declared query prompt (``query``; E5-Mistral's files name it ``web_search_query``); a decoder
    that declares none gets LongEmbed's instruction. Passages of decoders take no prompt."""
    if "query" in prompts:
        return prompts["query"]
    if decoder:
        return prompts.get("web_search_query", DECODER_INSTRUCTION)
    return ""


def extend(embedder: Embedder, extension=None, max_length: int | None = None, window: int | None = None) -> Embedder:
    """A copy of ``embedder`` that reads ``max_length`` tokens, through ``extension`` if given.

    Without an extension, ``max_length`` may not exceed a learned position table (one-line error);
    with one, the extension is bound to the model (window L_o -> max_length) and says whether it fits.
    """
    from dewey_lab.eval.extension.methods import parse_extension

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


ST_MODULES = ("Transformer", "Pooling", "Dense", "Normalize", "WordWeights")
"""sentence-transformers module types ``dewey-lab eval`` reproduces; any other is refused, never skipped."""


def st_poolings() -> dict[tuple[str, ...], str]:
    """sentence-transformers pooling modes -> our head names, as each head declares them
    (``PoolingHead.sentence_transformers_modes``; ``cls`` + ``mean`` is what ``dewey-lab export`` writes)."""
    out: dict[tuple[str, ...], str] = {}
    for name, head in PoolingHead.choices().items():
        modes = head().sentence_transformers_modes()
        if modes:
            out.setdefault(tuple(modes), name)
    return out

DENSE_ACTIVATIONS = ("Identity", "Tanh", "ReLU", "GELU", "Sigmoid")


def _sentence_transformers_config(path: str, local: bool, revision: str | None) -> dict:
    """Pooling mode, prompts and Dense head from a sentence-transformers layout; {} when it is not one.

    Every module is accounted for: a module type or pooling mode we cannot reproduce is a one-line
    ValueError naming what is supported, so a model is never scored as something it is not.
    """
    def fetch(name: str) -> Path | None:
        if local:
            f = Path(path) / name
            return f if f.exists() else None
        from transformers.utils import cached_file

        try:
            f = cached_file(path, name, revision=revision, _raise_exceptions_for_missing_entries=False)
        except OSError:
            return None
        return Path(f) if f else None

    def read(name: str) -> dict | None:
        f = fetch(name)
        return json.loads(f.read_text()) if f else None

    modules = read("modules.json")
    if not modules:
        return {}
    out: dict = {"prompts": (read("config_sentence_transformers.json") or {}).get("prompts", {}),
                 "mean_over": "all"}
    denses = []
    for mod in modules:
        full = mod.get("type", "")
        kind = full.rsplit(".", 1)[-1]
        if kind == "Pooling":
            pool = read(f"{mod['path']}/config.json") or {}
            modes = pool.get("pooling_mode")  # sentence-transformers >= 5; older files name each mode
            modes = [modes] if isinstance(modes, str) else list(modes or [])
            if not modes:
                flags = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens",
                         "max": "pooling_mode_max_tokens", "mean_sqrt_len_tokens": "pooling_mode_mean_sqrt_len_tokens",
                         "weightedmean": "pooling_mode_weightedmean_tokens", "lasttoken": "pooling_mode_lasttoken"}
                modes = [m for m, flag in flags.items() if pool.get(flag)]
            known = st_poolings()
            if tuple(modes) not in known:
                raise ValueError(f"{path}: sentence-transformers pooling {'+'.join(modes) or '(none)'} is not supported "
                                 f"by dewey-lab eval; supported: {', '.join('+'.join(k) for k in known)}")
            out["pooling"], out["pooling_parts"] = known[tuple(modes)], len(modes)
        elif kind == "WordWeights":  # dewey-lab export: special tokens weigh 0 -> text tokens only
            out["mean_over"] = "content"
        elif kind == "Dense":
            denses.append(mod["path"])
        elif kind not in ("Transformer", "Normalize"):  # Normalize: we always normalise (cosine scoring)
            raise ValueError(f"{path}: sentence-transformers module {full or '(no type)'} is not supported by "
                             f"dewey-lab eval, which would score a different model; supported: {', '.join(ST_MODULES)}")
    exported = read("dewey_lab.json")  # dewey-lab export records the max length it was built for
    if exported:
        out["max_length"] = exported["max_length"]
    if denses:
        layers = [_dense_layers(fetch, d, parts=out.get("pooling_parts", 1) if i == 0 else 1)
                  for i, d in enumerate(denses)]
        flat = [m for layer in layers for m in layer]
        out["head"] = flat[0] if len(flat) == 1 else torch.nn.Sequential(*flat)
    return out


def _dense_layers(fetch, folder: str, parts: int = 1) -> list[torch.nn.Module]:
    """A sentence-transformers Dense as [Linear] or [Linear, activation]; one-line error for the rest. Over
    ``parts`` concatenated pooling modes it reads the first block, scaled: the Embedder's head averages them."""
    cfg_file = fetch(f"{folder}/config.json")
    if cfg_file is None:
        raise ValueError(f"Dense module {folder}/ has no config.json; the model files are incomplete")
    cfg = json.loads(cfg_file.read_text())
    act = str(cfg.get("activation_function", "torch.nn.modules.linear.Identity")).rsplit(".", 1)[-1]
    if act not in DENSE_ACTIVATIONS:
        raise ValueError(f"{folder}: Dense activation {act} is not supported by dewey-lab eval; "
                         f"supported: {', '.join(DENSE_ACTIVATIONS)}")
    weights = fetch(f"{folder}/model.safetensors")
    if weights is not None:
        from safetensors.torch import load_file

        state = load_file(str(weights))
    else:
        legacy = fetch(f"{folder}/pytorch_model.bin")
        if legacy is None:
            raise ValueError(f"Dense module {folder}/ has no model.safetensors or pytorch_model.bin")
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    w, b = state["linear.weight"], state.get("linear.bias")
    if parts > 1:  # [cls, mean] -> 0.5 W (cls + mean): the Embedder pools cls_mean first, then W
        w = parts * w[:, : w.shape[1] // parts]
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    return [linear] if act == "Identity" else [linear, getattr(torch.nn, act)()]


UNTRAINED = "untrained:"
"""Model prefix: the named run's architecture with freshly initialised weights."""


def run_kind(model: str) -> str | None:
    """What ``model`` names of a training run: ``"ckpt"`` (a checkpoint file), ``"run"`` (a fit run directory),
    ``"folder"`` (an experiment's run folder: run directories below it), or None (a hub id, a model directory)."""
    if model.endswith(".ckpt"):
        return "ckpt"
    path = Path(model)
    if (path / "run_info.json").is_file():
        return "run"
    if path.is_dir() and any(path.glob("*/run_info.json")):
        return "folder"
    return None


def is_student(model: str) -> bool:
    """Whether an eval run's model spec names a training run's student: a ``.ckpt``, a run directory, an
    experiment's run folder or ``untrained:<run>``; anything else (a hub id, a model directory, ``bm25``, the
    controls ``length`` and ``bow``) is a reference model."""
    return model.startswith(UNTRAINED) or run_kind(model) is not None


def run_checkpoint(model: str) -> str | None:
    """The checkpoint file ``model`` names: a ``.ckpt`` itself, a run directory's ``checkpoints/last.ckpt`` (the end
    of its training), or an experiment's run folder's newest finished run's; None for anything else (a hub id, a
    model directory)."""
    kind = run_kind(model)
    if kind == "ckpt":
        return model
    if kind == "run":
        last = Path(model) / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(f"run {model} has no checkpoints/last.ckpt; finish (or resume) its training "
                                    "first, or name one of its checkpoints")
        return str(last)
    if kind == "folder":  # its newest finished run
        from dewey_lab.runs.checkpoint import start_checkpoint

        return str(start_checkpoint(model))
    return None


def reinitialise(module, seed: int = 0):
    """``module`` (a DistillModule) with every weight drawn afresh under ``seed``: the student built from its
    config right after seeding (a pretrained student: its pretrained weights), the projection drawn as
    DistillModule draws it (from the seed itself), learned pooling heads at their initial values. The values
    of a module built right after seeding; a fit run's student may differ where the run drew random numbers
    before building it: same distribution, not the same draw."""
    from dewey_lab.model.student import build_student

    torch.manual_seed(seed)
    fresh = build_student(module.spec)
    module.student.load_state_dict(fresh.state_dict())
    if hasattr(module.projection, "reset_parameters"):  # a Linear; "none" projects nothing
        torch.manual_seed(seed)  # DistillModule seeds its projection from the run's seed, apart from the student
        module.projection.reset_parameters()
    hidden = module.student.config.hidden_size
    module.whole_pooling = PoolingHead.from_config(module.whole_pooling.config(), hidden)  # learned heads start anew
    module.chunk_pooling = PoolingHead.from_config(module.chunk_pooling.config(), hidden)
    return module


def load_checkpoint(path: str):
    """The DistillModule of a ``dewey-lab fit`` checkpoint, on CPU, in eval mode, with the pooling heads it
    trained (``DistillModule.on_load_checkpoint`` rebuilds them from ``checkpoint["dewey_heads"]``; an older
    checkpoint without that record keeps the defaults, CLS and chunk mean)."""
    from dewey_lab.model.module import DistillModule
    from dewey_lab.model.student import StudentConfig, weights_follow

    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; runs keep them under "
                                "runs/<experiment>/<version>/checkpoints/")
    with torch.serialization.safe_globals([StudentConfig]), weights_follow():  # weights-only load
        module = DistillModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    if module.projection is None:
        raise ValueError(f"{path} has no projection head (trained before teacher_dim was saved); retrain it")
    return module.eval()


def _from_checkpoint(path: str, dev, dt, pooling, query_prompt, passage_prompt, untrained: bool = False,
                     **kwargs) -> Embedder:
    module = load_checkpoint(path)
    name, fingerprint = Path(path).parent.parent.name + "/" + Path(path).stem, model_fingerprint(path)
    if untrained:
        module = reinitialise(module)
        name, fingerprint = f"untrained ({Path(path).parent.parent.name})", f"untrained:seed0:{module.spec!r}"
    module = module.to(dev)
    tokenizer = load_tokenizer(module.spec.tokenizer_name)
    whole = PoolingHead.pick(pooling, module.whole_pooling, module.student.config.hidden_size)  # None: the trained one
    return Embedder(module.student, tokenizer, head=module.projection, pooling=whole, chunk_pooling=module.chunk_pooling,
                    max_length=module.student.config.max_position_embeddings, query_prompt=query_prompt or "",
                    passage_prompt=passage_prompt or "", name=name, fingerprint=fingerprint, device=dev, dtype=dt,
                    **kwargs)
