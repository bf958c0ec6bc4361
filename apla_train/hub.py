"""``--pretrained``: a local diffusers folder, or a Hugging Face Hub repo id resolved in the cache.

``resolve_pretrained("runwayml/stable-diffusion-v1-5")`` returns the snapshot folder of the
repo in the Hugging Face cache, downloading only what SD 1.x training needs (the five
subfolders' configs, tokenizer files and safetensors weights, of the requested ``variant``)
when the Hub can be reached. The environment is read at each call, as huggingface_hub
documents it: ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``) never touches the network
and uses the cache only; the cache is ``HF_HUB_CACHE``, else ``HF_HOME/hub``, else
``~/.cache/huggingface/hub``. Anything that cannot be resolved is one ``InputError`` line
naming the cache that was looked in.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from apla_rt.errors import InputError

SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
VARIANT = re.compile(r"[A-Za-z0-9_]+")
_TRUE = {"1", "on", "yes", "true"}


def hub_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them at import)."""
    return any((os.environ.get(k) or "").strip().lower() in _TRUE
               for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_cache_dir() -> Path:
    """The Hub cache huggingface_hub uses, from the environment as it is now."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.path.expandvars(os.environ[key])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(xdg).expanduser() / "huggingface" / "hub"


def download_patterns(variant: str | None) -> tuple[list[str], list[str]]:
    """(allow, ignore) patterns: the SD 1.x subfolders' configs, tokenizer files and
    safetensors weights of ``variant`` (``unet/diffusion_pytorch_model.fp16.safetensors``),
    never the checkpoints, EMA copies or other frameworks' files that such repos also hold."""
    allow = ["model_index.json"]
    for sub in SUBFOLDERS:
        allow += [f"{sub}/*.json", f"{sub}/*.txt"]
        allow.append(f"{sub}/*.{variant}.safetensors" if variant else f"{sub}/*.safetensors")
    ignore = ["*non_ema*", "*.ckpt", "*.msgpack", "*.onnx", "*.pb", "*.h5"]
    if not variant:
        ignore.append("*.fp16.safetensors")
    return allow, ignore


def is_repo_id(name: str) -> bool:
    return bool(REPO_ID.fullmatch(name)) and ".." not in name


def resolve_pretrained(name: str | os.PathLike, variant: str | None = None) -> Path:
    """A local folder as it is; an ``ORG/NAME`` repo id -> its snapshot folder in the cache."""
    if variant is not None and not VARIANT.fullmatch(variant):
        raise InputError(f"--variant {variant!r} must be a weights variant name such as fp16")
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    text = str(name)
    if path.exists() or not is_repo_id(text):
        raise InputError(f"--pretrained {text} is not a folder, nor a Hugging Face repo id "
                         "(ORG/NAME, e.g. runwayml/stable-diffusion-v1-5)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()
    allow, ignore = download_patterns(variant)
    try:
        folder = snapshot_download(text, cache_dir=str(cache), local_files_only=offline,
                                   allow_patterns=allow, ignore_patterns=ignore)
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
        raise InputError(f"--pretrained {text}: not in the Hugging Face cache {cache} and {why}; "
                         "download it once online (or set HF_HOME / HF_HUB_CACHE to the cache "
                         "that holds it), or give a local folder") from None
    except (HfHubHTTPError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"--pretrained {text}: cannot get it from the Hugging Face Hub into the "
                         f"cache {cache} ({first})") from None
    return Path(folder)


def weights_variant(root: Path, variant: str | None) -> str | None:
    """``variant``, or "fp16" when the folder holds only fp16-variant UNet weights."""
    if variant is not None:
        return variant
    unet = root / "unet"
    plain = [p for p in unet.glob("diffusion_pytorch_model*") if p.suffixes[-2:-1] != [".fp16"]]
    if not plain and list(unet.glob("diffusion_pytorch_model.fp16.*")):
        return "fp16"
    return None
