"""Stage 1, load: read the user's model file into a `torch.export` program or an `nn.Module`.

Accepted inputs:

* a ``torch.export`` archive (``.pt`` / ``.pt2`` written by :func:`torch.export.save`);
* a Hugging Face model folder (``config.json`` + ``*.safetensors``), loaded offline;
* a pickled ``nn.Module`` written by :func:`torch.save`, only with ``trust_pickle=True``: unpickling
  runs arbitrary code, so it is never done without the explicit flag.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dtr_compile.errors import InputError


@dataclass
class LoadedModel:
    """A model as read from disk.

    Exactly one of ``program`` (a ``torch.export`` program) and ``module`` (an eager module that
    still has to be captured with example inputs) is set.
    """

    source: str
    format: str  # "torch.export" | "huggingface" | "pickle"
    program: torch.export.ExportedProgram | None = None
    module: torch.nn.Module | None = None


def _is_pickled_module_zip(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith("data.pkl") for n in zf.namelist())
    except zipfile.BadZipFile:
        return False


_PICKLED_PREFIXES = ("custom_obj_", "opaque_obj_")  # torch.export's non-tensor constants


#: The members of a legacy (pre-pt2) ``torch.export.save`` zip that :func:`torch.export.load`
#: unpickles, by its fallback path, when the pt2 reader fails with a RuntimeError.
_LEGACY_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt",
                   "serialized_example_inputs.pt")


def _weights_only(data: bytes) -> bool:
    """Whether ``data`` loads with ``torch.load(weights_only=True)`` (tensors and containers)."""
    import io

    try:
        torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception:  # noqa: BLE001 - anything but plain tensors and containers
        return False
    return True


def _ambiguous_names(names: list[str]) -> list[str]:
    """Names in ``names`` that another member's name equals but for ASCII case (or exactly):
    torch's zip reader (miniz) looks members up case-insensitively and takes the first of
    two equal names, Python's :mod:`zipfile` the last; such a pair is read differently by the
    two."""
    seen: dict[str, str] = {}
    clashes = []
    for name in names:
        key = name.encode("utf-8", "surrogateescape").lower().decode("utf-8", "surrogateescape")
        if key in seen:
            clashes.append(name)
        seen.setdefault(key, name)
    return clashes


def _torch_records(path: Path) -> tuple[list[str], Any] | None:
    """The member names torch's pt2 reader lists (relative to the archive folder) and the reader
    (its ``get_record`` returns the bytes torch reads); None when the reader cannot open or list
    the file (:func:`torch.export.load` then fails, or falls back to its legacy path)."""
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        return list(reader.get_all_records()), reader
    except Exception:  # noqa: BLE001 - torch's reader refuses the file
        return None


def check_archive_pickles(path: Path) -> None:
    """Refuse a ``torch.export`` archive whose loading would unpickle (and so run) code.

    :func:`torch.export.load` calls ``torch.load(weights_only=False)`` or ``pickle.loads`` on:
    weights and constants marked ``use_pickle: true`` in ``data/{weights,constants}/
    *_config.json`` (tensor subclasses), ``custom_obj_*`` / ``opaque_obj_*`` constants (script
    and opaque objects), legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt``
    files, the sample inputs when a weights-only load of them fails, and, when its pt2 reader
    fails, the ``serialized_*.pt`` members of the legacy zip format. A plain exported model has
    none of these; this reads the configs (nothing unpickled) and loads the sample inputs and
    legacy members weights-only first.

    Members are judged as torch reads them: listed and read through torch's own zip reader
    (``torch._C.PyTorchFileReader``, miniz), and an archive where two members' names are equal
    but for case is refused (miniz finds either for both; Python's zipfile the last).

    Raises:
        InputError: such an entry exists (names it), member names are ambiguous, the file is
            not a readable zip, or a config is not valid JSON.
    """
    def refuse(what: str) -> InputError:
        return InputError(f"{path}: {what}; loading it runs code from the file (unpickling). "
                          "Re-export it from plain tensors, or pass --trust-pickle if you trust "
                          "the file")

    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            clashes = _ambiguous_names(names)
            if clashes:
                raise InputError(
                    f"{path}: the archive's member names are ambiguous ({clashes[0]!r} appears "
                    "twice, or twice but for case): torch and a zip tool would read different "
                    "files under that name, so what is checked need not be what is loaded. "
                    "Re-save it with torch.export.save")
            # the legacy path reads with Python's zipfile; it runs when the pt2 reader fails
            if "version" in names:
                for name in _LEGACY_PICKLES:
                    if name in names and not _weights_only(zf.read(name)):
                        raise refuse(f"it holds a legacy-format member {name} that is not "
                                     "plain tensors")
    except zipfile.BadZipFile as exc:
        raise InputError(f"{path}: not a readable zip archive ({exc})") from None

    listed = _torch_records(path)
    if listed is None:  # torch.export.load fails on it, or takes the legacy path checked above
        return
    records, reader = listed
    clashes = _ambiguous_names(records)
    if clashes:  # torch's own listing (it may parse the zip differently)
        raise InputError(f"{path}: the archive's member names are ambiguous ({clashes[0]!r} "
                         "appears twice, or twice but for case); re-save it with "
                         "torch.export.save")
    for name in records:
        rel = name.lower()  # torch's lookups ignore case
        if rel.startswith("data/aotinductor/"):
            raise refuse(f"the archive holds compiled AOTInductor code ({name})")
        for folder in ("data/weights/", "data/constants/"):
            if not rel.startswith(folder):
                continue
            if rel.endswith(".pt"):
                raise refuse(f"the archive holds a legacy pickled {folder[5:-1]} file ({name})")
            if rel.endswith("_config.json"):
                try:
                    config = json.loads(bytes(reader.get_record(name))).get("config", {})
                except (ValueError, AttributeError) as exc:
                    raise InputError(f"{path}: {name} is not a valid payload config ({exc})") \
                        from None
                for fqn, meta in (config.items() if isinstance(config, dict) else []):
                    meta = meta if isinstance(meta, dict) else {}
                    if meta.get("use_pickle"):
                        raise refuse(f"{folder[5:-1]} entry {fqn!r} is stored as a pickle "
                                     "(use_pickle: true)")
                    if str(meta.get("path_name", "")).startswith(_PICKLED_PREFIXES):
                        raise refuse(f"constant {fqn!r} is a pickled custom or opaque object")
        # torch.export.load retries a failed weights-only load with full unpickling
        if rel.startswith("data/sample_inputs/") and not _weights_only(
                bytes(reader.get_record(name))):
            raise refuse(f"its sample inputs ({name}) are not plain tensors")


_TYPE_RE = re.compile(r'\\"type\\": \\"([A-Za-z_][\w.]*)\\"')


def _pytree_types(path: Path) -> set[str]:
    """Serialized pytree type names in the archive's input/output specs (e.g.
    ``transformers.modeling_outputs.SequenceClassifierOutput``)."""
    found: set[str] = set()
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            rel = name.split("/", 1)[1] if "/" in name else name
            if rel.startswith("models/") and rel.endswith(".json"):
                found |= set(_TYPE_RE.findall(zf.read(name).decode("utf-8", "replace")))
    return found


def register_output_types(path: Path) -> list[str]:
    """Import the ``transformers`` modules that define the archive's input/output pytree types.

    A Hugging Face model exported with ``torch.export`` returns a ``ModelOutput`` dataclass;
    ``torch.export.load`` can rebuild the output spec only if that class is registered as a
    pytree node, which happens when its module is imported. Only modules under
    ``transformers.`` are imported (installed code, never code from the file).

    Returns:
        The pytree type names that remain unregistered (for the error message).
    """
    import importlib

    from torch.utils import _pytree

    missing = []
    for type_name in sorted(_pytree_types(path)):
        if type_name in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            continue
        module = type_name.rpartition(".")[0]
        if module.startswith("transformers."):
            with contextlib.suppress(Exception):
                importlib.import_module(module)
        if type_name not in _pytree.SERIALIZED_TYPE_TO_PYTHON_TYPE:
            missing.append(type_name)
    return missing
#: Buffers a checkpoint may lack: they are computed at construction, not learned.
_DERIVED_BUFFERS = ("position_ids", "token_type_ids", "inv_freq", "original_inv_freq",
                    "masked_bias", "attn.bias", "causal_mask")


def _read_hf_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder as a dict.

    Raises:
        InputError: unreadable, not JSON, or not a JSON object.
    """
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not a readable JSON config ({type(exc).__name__}: {exc}); "
                         "it should be the config.json written by save_pretrained") from exc
    if not isinstance(config, dict):
        raise InputError(f"{path}: expected a JSON object (the model's config), got "
                         f"{type(config).__name__}")
    return config


def _check_loaded_weights(path: Path, module: torch.nn.Module, info: dict[str, Any]) -> None:
    """Refuse a checkpoint that does not hold every weight of the model (transformers would
    initialise the missing ones at random and the compile would optimise a partly random
    model), or holds weights the model has no place for (transformers would drop them: a
    truncated model).

    Missing or extra non-persistent or derived buffers (``position_ids``, rotary ``inv_freq``)
    are fine.

    Raises:
        InputError: listing a few of the missing, shape-mismatched or unexpected tensors and
            their count.
    """
    buffers = {name for name, _ in module.named_buffers()}
    missing = sorted(k for k in info.get("missing_keys") or ()
                     if not (k in buffers and k.endswith(_DERIVED_BUFFERS)))
    mismatched = [str(k[0]) if isinstance(k, (tuple, list)) else str(k)
                  for k in info.get("mismatched_keys") or ()]
    for what, keys in (("lacks", missing), ("has wrongly shaped", mismatched)):
        if keys:
            total = len(list(module.state_dict()))
            shown = ", ".join(keys[:5]) + (", …" if len(keys) > 5 else "")
            raise InputError(f"{path}: the checkpoint {what} {len(keys)} of the model's {total} "
                             f"tensors ({shown}); transformers would fill them with random "
                             "values. Save the complete model with save_pretrained")
    # tensors the model built from config.json has no place for: transformers drops them, and
    # the compile would optimise a truncated model (a 3-layer checkpoint under a 2-layer config)
    unexpected = sorted(k for k in info.get("unexpected_keys") or ()
                        if not k.endswith(_DERIVED_BUFFERS))
    if unexpected:
        shown = ", ".join(unexpected[:5]) + (", …" if len(unexpected) > 5 else "")
        arch = type(module).__name__
        raise InputError(f"{path}: the checkpoint holds {len(unexpected)} tensors the model "
                         f"built from its config.json ({arch}) has no place for ({shown}); "
                         "transformers would drop them and the compile would optimise another "
                         "model than the checkpoint's. Check config.json (layer counts, "
                         "sizes, architectures) against the weights, or save the model again "
                         "with save_pretrained")


def _check_auto_map(path: Path, config: dict[str, Any], ignore_auto_map: bool) -> None:
    """A folder whose config.json names its own model code (``auto_map``, run by transformers
    only with ``trust_remote_code``): refused unless ``ignore_auto_map``, which loads it with
    transformers' built-in class for its ``model_type``. The folder's code is never run, and
    transformers never asks (its interactive prompt would let a keypress run it).

    Raises:
        InputError: ``auto_map`` is set and not ignored, naming its entries.
    """
    auto_map = config.get("auto_map")
    if not auto_map or ignore_auto_map:
        return
    entries = ", ".join(f"{k} → {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) \
        else repr(auto_map)
    raise InputError(f"{path}: config.json names the folder's own model code (auto_map: "
                     f"{entries[:200]}); dtr-compile never runs code from a model folder. Pass "
                     f"--ignore-auto-map to load it with transformers' built-in class for "
                     f"model_type {config.get('model_type')!r} instead (when transformers has "
                     "one), or save the model with a built-in architecture")


def _architecture_class(path: Path, config: dict[str, Any], fallback: bool = False) -> Any:
    """The ``transformers`` class to load a folder with: the first of the config's
    ``architectures`` that ``transformers`` defines (``GPT2LMHeadModel`` keeps its LM head,
    ``BertForSequenceClassification`` its classifier), or ``AutoModel`` when the config names
    none, or with ``fallback`` (``--ignore-auto-map``) when it names only classes
    ``transformers`` does not define (custom code: the built-in class of its ``model_type``).
    The class is looked up by name in the installed ``transformers``; code shipped with the
    folder (``auto_map``, remote code) is never imported.

    Raises:
        InputError: ``architectures`` is not a list of names, names only classes ``transformers``
            does not define (custom code) and ``fallback`` is off, or a class of another
            ``model_type`` than the config.
    """
    import transformers

    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InputError(f"{path / 'config.json'}: 'architectures' should be a list of class "
                         f"names, got {archs!r}")
    if not archs:
        return transformers.AutoModel
    for name in archs:
        cls = getattr(transformers, name, None) if name.isidentifier() else None
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            wanted = getattr(getattr(cls, "config_class", None), "model_type", "") or ""
            found = config.get("model_type")
            if wanted and found and wanted != found:
                raise InputError(f"{path / 'config.json'}: architectures names {name} (model_type "
                                 f"{wanted!r}) but model_type is {found!r}; fix config.json")
            return cls
    if fallback:
        return transformers.AutoModel
    raise InputError(
        f"{path / 'config.json'}: architectures {', '.join(archs)} is not a transformers class "
        f"(transformers {transformers.__version__}); custom model code shipped with a folder is "
        "never run. Save the model as a transformers class, or export it with torch.export.save "
        "and compile the .pt2")


def _load_hf_folder(path: Path, ignore_auto_map: bool = False) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers  # noqa: F401 - a clear error before anything else
    except ImportError as exc:  # pragma: no cover - transformers is a dependency
        raise InputError("loading a Hugging Face folder needs `transformers` installed") from exc
    if not list(path.glob("*.safetensors")):
        raise InputError(
            f"{path}: a Hugging Face folder needs config.json and *.safetensors weights "
            "(pickled pytorch_model.bin is not loaded)"
        )
    config = _read_hf_config(path / "config.json")
    _check_auto_map(path, config, ignore_auto_map)
    model_class = _architecture_class(path, config, fallback=ignore_auto_map)
    try:
        module, info = model_class.from_pretrained(
            str(path), local_files_only=True, dtype=torch.float32,
            output_loading_info=True, trust_remote_code=False)
        if getattr(module.config, "use_cache", None):
            module.config.use_cache = False  # a KV cache object cannot be captured
    except Exception as exc:  # noqa: BLE001 - any loader failure is an input problem
        raise InputError(f"{path}: could not load as a Hugging Face model: {exc}") from exc
    _check_loaded_weights(path, module, info)
    module.eval()
    return LoadedModel(source=str(path), format="huggingface", module=module)


def check_model_path(path: str | os.PathLike[str]) -> Path:
    """The checks that need no loading: the path exists and has a known format.

    Raises:
        InputError: missing path, a folder without config.json, an unknown suffix, or a file
            that is not a zip archive (corrupt or wrong file).
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"model not found: {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise InputError(
                f"{p} is a folder without config.json; expected a torch.export archive "
                "(.pt/.pt2) or a Hugging Face model folder"
            )
        return p
    if p.suffix not in (".pt", ".pt2"):
        raise InputError(
            f"unknown model format {p.suffix or '(no suffix)'!r} for {p}; expected a torch.export "
            "archive (.pt/.pt2, from torch.export.save) or a Hugging Face model folder"
        )
    if not zipfile.is_zipfile(p):
        raise InputError(
            f"{p} is not a torch.export archive (not a zip file; corrupt or wrong file). "
            "Write it with torch.export.save(torch.export.export(model, example_args), path)"
        )
    return p


def load_model(path: str | os.PathLike[str], *, trust_pickle: bool = False,
               ignore_auto_map: bool = False) -> LoadedModel:
    """Load ``path`` as described in the module docstring. A Hugging Face folder whose
    config.json has an ``auto_map`` (its own model code) is refused unless ``ignore_auto_map``;
    its code is never run.

    Raises:
        InputError: the path is missing, of an unknown format, corrupt, a pickle without
            ``trust_pickle``, or a folder with ``auto_map`` without ``ignore_auto_map``.
    """
    p = check_model_path(path)
    if p.is_dir():
        return _load_hf_folder(p, ignore_auto_map)
    if _is_pickled_module_zip(p):
        if not trust_pickle:
            raise InputError(
                f"{p} is a pickled torch.save file, not a torch.export archive. Unpickling runs "
                "arbitrary code: re-save it with torch.export.save, or pass --trust-pickle if you "
                "trust the file"
            )
        try:
            obj = torch.load(p, weights_only=False, map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
            raise InputError(f"{p}: could not unpickle ({type(exc).__name__}: {exc})") from exc
        if not isinstance(obj, torch.nn.Module):
            raise InputError(f"{p} unpickled to {type(obj).__name__}, not a torch.nn.Module")
        obj.eval()
        return LoadedModel(source=str(p), format="pickle", module=obj)
    if not trust_pickle:
        check_archive_pickles(p)
    try:
        missing = register_output_types(p)
    except (zipfile.BadZipFile, OSError):
        missing = []
    try:
        # torch warns about any suffix but .pt2; .pt is ours to accept (the demo writes model.pt)
        logging.getLogger("torch.export.pt2_archive._package").setLevel(logging.ERROR)
        program = torch.export.load(p)
    except Exception as exc:  # noqa: BLE001 - any deserialisation failure means a bad file
        if missing:
            raise InputError(
                f"{p}: its inputs/outputs use the pytree type(s) {', '.join(missing)}, which "
                "are not registered in this Python: install the package that defines them (for "
                "transformers outputs, `transformers`), or export a model that returns tensors "
                "or tuples") from exc
        raise InputError(f"{p}: not a readable torch.export archive ({type(exc).__name__}: {exc})") from exc
    return LoadedModel(source=str(p), format="torch.export", program=program)
