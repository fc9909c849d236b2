"""Generate the Python stubs for protos/wicore/v1 into shared/v1 (wicore.v1).

python scripts/gen_protos.py           # write the stubs
python scripts/gen_protos.py --check   # exit 1 if the committed stubs are stale
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
STUB_DIR = ROOT / "shared" / "v1"


def generate(out: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / "wicore" / "v1").glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *[str(p.relative_to(PROTO_ROOT)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    return sorted((out / "wicore" / "v1").iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        if args.check:
            stale = [
                p.name
                for p in fresh
                if not (STUB_DIR / p.name).exists() or not filecmp.cmp(p, STUB_DIR / p.name, shallow=False)
            ]
            if stale:
                print("stale generated stubs: " + ", ".join(stale) + " (run: make protos)")
                return 1
            print("generated stubs are up to date")
            return 0
        for p in fresh:
            shutil.copyfile(p, STUB_DIR / p.name)
        (STUB_DIR / "__init__.py").write_text(
            '"""Generated protobuf and gRPC stubs (package wicore.v1)."""\n'
        )
        print(f"wrote {len(fresh)} files to {STUB_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
