"""Build CLIP tokenizer files (``vocab.json`` + ``merges.txt``) from the BPE merge list.

OpenAI CLIP's byte-level BPE vocabulary ships (MIT licence) as
``bpe_simple_vocab_16e6.txt.gz`` inside the ``open_clip_torch`` wheel on PyPI.
This script turns it into the two files :class:`transformers.CLIPTokenizer`
reads, with the same token ids as OpenAI CLIP (49408 tokens,
``<|startoftext|>`` = 49406, ``<|endoftext|>`` = 49407).  No model hub access::

    pip download --no-deps -d /tmp/oc open_clip_torch
    python -m rlr_backend.models.build_tokenizer --wheel /tmp/oc/open_clip_torch-*.whl --out DIR

The embedded default model's ``tokenizer/`` folder was made this way (see
:mod:`rlr_backend.models.pretrain_default`).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import logging
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

BPE_NAME = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer
VOCAB_SIZE = 49408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from bytes to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def read_bpe_from_wheel(wheel: str | Path) -> bytes:
    """The gzipped BPE file from an open_clip_torch wheel (a zip archive)."""
    with zipfile.ZipFile(wheel) as zf:
        names = [n for n in zf.namelist() if n.endswith("/" + BPE_NAME)]
        if not names:
            raise FileNotFoundError(f"{BPE_NAME} not found in {wheel}")
        return zf.read(names[0])


def vocab_and_merges(bpe_gz: bytes) -> tuple[dict[str, int], list[str]]:
    """CLIP's vocabulary (token -> id) and merge list from the gzipped BPE file."""
    lines = gzip.decompress(bpe_gz).decode("utf-8").split("\n")
    merges = lines[1 : N_MERGES + 1]
    if len(merges) != N_MERGES:
        raise ValueError(f"expected {N_MERGES} merges, found {len(merges)}")
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    if len(tokens) != VOCAB_SIZE:
        raise ValueError(f"expected {VOCAB_SIZE} tokens, built {len(tokens)}")
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(bpe_gz: bytes, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` (with the ``#version: 0.2`` header) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges(bpe_gz)
    vpath, mpath = out / "vocab.json", out / "merges.txt"
    vpath.write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    mpath.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    logger.info("wrote %s (%d tokens) and %s (%d merges)", vpath, len(vocab), mpath, len(merges))
    return vpath, mpath


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--wheel", help="path (or glob) of an open_clip_torch wheel")
    src.add_argument("--bpe", help=f"path of {BPE_NAME}")
    ap.add_argument("--out", required=True, help="output folder for vocab.json and merges.txt")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.wheel:
        hits = sorted(glob.glob(args.wheel))
        if not hits:
            raise SystemExit(f"no wheel matches {args.wheel!r}; run: pip download --no-deps -d DIR open_clip_torch")
        data = read_bpe_from_wheel(hits[-1])
    else:
        data = Path(args.bpe).read_bytes()
    write_tokenizer_files(data, args.out)


if __name__ == "__main__":
    main()
