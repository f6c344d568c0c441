"""Bundle format: manifest, hashing, packing, safe extraction and verification.

A bundle is a directory with ``manifest.json`` at its root, shipped as a ``.tar`` of that
directory. The manifest lists every other file with its sha256; verification rejects a
bundle with a missing, changed or unlisted file. ``manifest.sha256`` beside it contains the
sha256 of the manifest's bytes, so a changed byte in the manifest itself is caught too.

NOTE: the digests detect corruption and accidental edits, not a deliberate forgery: whoever
can rewrite the manifest can rewrite its digest. Signing bundles is not implemented.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_DIGEST_NAME = "manifest.sha256"
# Files at the bundle root that the manifest's file list does not (and cannot) include.
UNLISTED_NAMES = (MANIFEST_NAME, MANIFEST_DIGEST_NAME)

# Extraction limits: a bundle of a large model with external data stays far below these,
# and a crafted archive cannot fill the board's storage or inode table.
MAX_EXTRACT_BYTES = 8 * 1024**3
MAX_EXTRACT_MEMBERS = 10_000


class BundleError(ValueError):
    """A bundle is malformed, fails verification or cannot be extracted safely."""


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, KServe datatype and shape (-1 marks a dynamic axis)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TensorSpec":
        return cls(name=data["name"], datatype=data["datatype"], shape=tuple(int(d) for d in data["shape"]))

    def describe(self) -> str:
        dims = ",".join("-1" if d < 0 else str(d) for d in self.shape)
        return f"{self.name}: {self.datatype}[{dims}]"


@dataclass(frozen=True)
class Artifact:
    """One model file in the bundle, with the runtimes of the device profile that suit it."""

    path: str
    sha256: str
    size: int
    format: str
    precision: str
    runtimes: tuple[str, ...] = ()
    candidate: str = ""
    validated_on_host: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["runtimes"] = list(self.runtimes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Artifact":
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["runtimes"] = tuple(known.get("runtimes", ()))
        return cls(**known)


@dataclass
class Manifest:
    """The parsed ``manifest.json``; ``raw`` keeps every key, including ones added later."""

    raw: dict[str, Any]
    inputs: list[TensorSpec] = field(default_factory=list)
    outputs: list[TensorSpec] = field(default_factory=list)
    artifacts: list[Artifact] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.raw["name"]

    @property
    def version(self) -> str:
        return str(self.raw.get("version", "1"))

    @property
    def device(self) -> str:
        return self.raw["device"]

    @property
    def selftest(self) -> dict[str, Any] | None:
        return self.raw.get("selftest")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Manifest":
        schema = raw.get("schema")
        if schema != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema {schema!r} is not supported; this edgeopt reads schema {SCHEMA_VERSION}: "
                "rebuild the bundle with a matching edgeopt version"
            )
        for key in ("name", "device", "inputs", "outputs", "artifacts", "files"):
            if key not in raw:
                raise BundleError(f"manifest is missing the required key {key!r}")
        try:
            return cls(
                raw=raw,
                inputs=[TensorSpec.from_dict(t) for t in raw["inputs"]],
                outputs=[TensorSpec.from_dict(t) for t in raw["outputs"]],
                artifacts=[Artifact.from_dict(a) for a in raw["artifacts"]],
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"manifest has a malformed tensor or artifact entry: {exc}") from exc


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _bundle_files(bundle_dir: Path) -> list[Path]:
    """Return every regular file under ``bundle_dir`` except the manifest, sorted."""
    files = []
    for path in sorted(bundle_dir.rglob("*")):
        if path.is_symlink():
            raise BundleError(f"bundle file {path.relative_to(bundle_dir)} is a symbolic link; bundles hold only regular files")
        if path.is_file() and path.relative_to(bundle_dir).as_posix() not in UNLISTED_NAMES:
            files.append(path)
    return files


def write_manifest(bundle_dir: Path, manifest: dict[str, Any]) -> Manifest:
    """Add the ``files`` list (sha256 and size of every file) and write ``manifest.json``."""
    bundle_dir = Path(bundle_dir)
    files = []
    for path in _bundle_files(bundle_dir):
        files.append({"path": path.relative_to(bundle_dir).as_posix(), "sha256": sha256_file(path), "size": path.stat().st_size})
    data = {"schema": SCHEMA_VERSION, **manifest, "files": files}
    parsed = Manifest.from_dict(data)
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    (bundle_dir / MANIFEST_NAME).write_text(text, encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    (bundle_dir / MANIFEST_DIGEST_NAME).write_text(f"{digest}  {MANIFEST_NAME}\n", encoding="utf-8")
    return parsed


def load_manifest(bundle_dir: Path) -> Manifest:
    path = Path(bundle_dir) / MANIFEST_NAME
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} not found: a bundle directory must contain {MANIFEST_NAME}") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise BundleError(f"{path} must contain a JSON object")
    return Manifest.from_dict(raw)


def _check_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BundleError(f"bundle path {name!r} escapes the bundle directory")
    return rel


def _verify_manifest_digest(bundle_dir: Path) -> None:
    """Compare the sha256 of ``manifest.json``'s bytes with the one in ``manifest.sha256``."""
    digest_path = bundle_dir / MANIFEST_DIGEST_NAME
    manifest_path = bundle_dir / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{manifest_path} not found: a bundle directory must contain {MANIFEST_NAME}")
    try:
        expected = digest_path.read_text(encoding="utf-8").split()[0]
    except (OSError, IndexError):
        raise BundleError(f"bundle file {MANIFEST_DIGEST_NAME} is missing or empty: rebuild the bundle") from None
    actual = sha256_file(manifest_path)
    if actual != expected:
        raise BundleError(f"bundle file {MANIFEST_NAME} does not match its sha256 in {MANIFEST_DIGEST_NAME} (expected {expected[:12]}…, got {actual[:12]}…)")


def verify_bundle(bundle_dir: Path) -> Manifest:
    """Check every file against the manifest; raise BundleError naming the first mismatch."""
    bundle_dir = Path(bundle_dir)
    _verify_manifest_digest(bundle_dir)
    manifest = load_manifest(bundle_dir)

    listed: dict[str, dict[str, Any]] = {}
    for entry in manifest.raw["files"]:
        _check_relative(entry["path"])
        listed[entry["path"]] = entry

    for rel, entry in listed.items():
        path = bundle_dir / rel
        if not path.is_file():
            raise BundleError(f"bundle file {rel} is missing")
        if path.stat().st_size != entry["size"]:
            raise BundleError(f"bundle file {rel} has size {path.stat().st_size}, expected {entry['size']} from the manifest")
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            raise BundleError(f"bundle file {rel} does not match its sha256 (expected {entry['sha256'][:12]}…, got {actual[:12]}…)")

    present = {p.relative_to(bundle_dir).as_posix() for p in _bundle_files(bundle_dir)}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(f"bundle file {unlisted[0]} is not listed in the manifest")

    for artifact in manifest.artifacts:
        entry = listed.get(artifact.path)
        if entry is None:
            raise BundleError(f"artifact {artifact.path} is not listed in the manifest's files")
        if entry["sha256"] != artifact.sha256:
            raise BundleError(f"artifact {artifact.path} sha256 differs from its files entry")
    return manifest


def pack_bundle(bundle_dir: Path, tar_path: Path) -> None:
    """Write ``bundle_dir`` as a tar with the directory as its single top-level entry."""
    bundle_dir = Path(bundle_dir)
    with tarfile.open(tar_path, "w") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)


def _safe_members(tar: tarfile.TarFile, max_bytes: int, max_members: int) -> list[tarfile.TarInfo]:
    members = tar.getmembers()
    if len(members) > max_members:
        raise BundleError(f"archive has {len(members)} entries, more than the limit of {max_members}")
    total = 0
    for member in members:
        _check_relative(member.name)
        if not (member.isfile() or member.isdir()):
            raise BundleError(f"archive entry {member.name} is a link or special file; bundles hold only regular files")
        total += member.size
        if total > max_bytes:
            raise BundleError(f"archive unpacks to more than {max_bytes} bytes, the extraction limit")
    return members


def extract_bundle(tar_path: Path, target_root: Path, max_bytes: int = MAX_EXTRACT_BYTES, max_members: int = MAX_EXTRACT_MEMBERS) -> Path:
    """Extract a bundle tar under ``target_root`` and return the bundle directory.

    Extraction goes to a temporary directory first, so a rejected archive leaves nothing.
    """
    tar_path = Path(tar_path)
    target_root = Path(target_root)
    target_root.mkdir(parents=True, exist_ok=True)
    try:
        tar = tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, OSError) as exc:
        reason = str(exc).splitlines()[0].rstrip(":")
        raise BundleError(f"{tar_path} is not a readable tar archive ({reason}): copy the bundle again") from None

    staging = Path(tempfile.mkdtemp(prefix=".extract-", dir=target_root))
    try:
        with tar:
            members = _safe_members(tar, max_bytes, max_members)
            # The "data" filter (Python 3.11.4+) also rejects absolute paths, links out of the
            # target and device files; the checks above give clearer messages first.
            tar.extractall(staging, members=members, filter="data")

        roots = [p for p in staging.iterdir()]
        if (staging / MANIFEST_NAME).is_file():
            bundle_dir = staging
        elif len(roots) == 1 and (roots[0] / MANIFEST_NAME).is_file():
            bundle_dir = roots[0]
        else:
            raise BundleError(f"{tar_path} has no {MANIFEST_NAME} at its root or in a single top-level directory")

        digest = sha256_file(tar_path)[:12]
        final = target_root / f"{bundle_dir.name if bundle_dir is not staging else tar_path.stem}-{digest}"
        if final.exists():
            shutil.rmtree(final)
        os.replace(bundle_dir, final)
        return final
    except tarfile.TarError as exc:
        raise BundleError(f"{tar_path} could not be extracted: {exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def open_bundle(path: Path, extract_root: Path | None = None) -> tuple[Path, Manifest]:
    """Return the verified bundle directory and manifest for a bundle directory or tar."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"bundle {path} not found")
    if path.is_dir():
        return path, verify_bundle(path)

    root = Path(extract_root) if extract_root else Path(tempfile.gettempdir()) / "edgeopt-bundles"
    bundle_dir = extract_bundle(path, root)
    log.info("extracted bundle %s to %s", path, bundle_dir)
    return bundle_dir, verify_bundle(bundle_dir)
