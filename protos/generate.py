"""Generate the agent's Python gRPC modules from the .proto files in this folder.

Usage: ``python protos/generate.py`` writes ``agent/protos/*_pb2.py`` and ``*_pb2_grpc.py``;
``python protos/generate.py --check`` exits 1 when the committed modules are stale.

Needs grpcio-tools 1.81.x: later releases generate code that requires protobuf 7, while
tritonclient 2.73 requires protobuf below 7, and both must work in one environment.

Two rewrites follow protoc:

* imports become package imports (``from edgeopt.agent.protos import inference_pb2``);
* the messages register in a private descriptor pool (``POOL``), not protobuf's default pool.
  tritonclient registers its own ``inference.*`` messages in the default pool, and a second
  file defining the same symbols there fails with "duplicate symbol", so the agent and the
  client could not share a process. Server reflection is given ``POOL`` explicitly.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
OUTPUT_DIR = PROTO_DIR.parent / "agent" / "protos"
PACKAGE = "edgeopt.agent.protos"
PROTO_FILES = ("inference.proto",)


def _rewrite(text: str) -> str:
    modules = [Path(name).stem + "_pb2" for name in PROTO_FILES]
    for module in modules:
        text = re.sub(rf"^import {module} as ", f"from {PACKAGE} import {module} as ", text, flags=re.MULTILINE)
    return text.replace(
        "DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(",
        "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(",
    )


def generate(output_dir: Path) -> list[Path]:
    """Run protoc on every proto file, rewrite the output and write it to ``output_dir``."""
    from grpc_tools import protoc

    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in PROTO_FILES:
            status = protoc.main(
                ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"--python_out={scratch}", f"--grpc_python_out={scratch}", str(PROTO_DIR / name)]
            )
            if status != 0:
                raise RuntimeError(f"protoc failed on {name} with exit status {status}")

        for path in sorted(Path(scratch).glob("*.py")):
            target = output_dir / path.name
            target.write_text(_rewrite(path.read_text(encoding="utf-8")), encoding="utf-8")
            written.append(target)
    return written


def stale_files(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Return the names of generated modules in ``output_dir`` that differ from a fresh run."""
    with tempfile.TemporaryDirectory() as scratch:
        stale = []
        for fresh in generate(Path(scratch)):
            committed = output_dir / fresh.name
            if not committed.is_file() or committed.read_text(encoding="utf-8") != fresh.read_text(encoding="utf-8"):
                stale.append(fresh.name)
        return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale modules; exit 1 if any")
    args = parser.parse_args()

    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"{OUTPUT_DIR / name} is stale: run python protos/generate.py")
        return 1 if stale else 0

    for path in generate(OUTPUT_DIR):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
