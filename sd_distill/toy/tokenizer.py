"""SD's CLIP tokenizer for the toy teacher: built from open_clip's BPE file, stored compactly."""

from __future__ import annotations

import argparse
import gzip
import json
import zipfile
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte -> printable-character table (as in openai/CLIP and open_clip)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_clip_tokenizer_files(bpe_path: Path, folder: Path) -> None:
    """Write ``vocab.json``/``merges.txt`` of SD's CLIP tokenizer from open_clip's BPE file."""
    if bpe_path.suffix == ".whl":
        with zipfile.ZipFile(bpe_path) as whl:
            raw = whl.read("open_clip/bpe_simple_vocab_16e6.txt.gz")
    else:
        raw = bpe_path.read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # the slice open_clip's SimpleTokenizer uses
    base = _bytes_to_unicode()
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def load_tokenizer(args: argparse.Namespace):
    from transformers import CLIPTokenizer

    if args.tokenizer_dir:
        folder = Path(args.tokenizer_dir)
    elif args.clip_bpe:
        folder = Path(args.work_dir) / "tokenizer_src"
        write_clip_tokenizer_files(Path(args.clip_bpe), folder)
    else:
        raise SystemExit("give --clip_bpe (open_clip wheel or .gz) or --tokenizer_dir")
    # transformers 5: the constructor ignores file paths; from_pretrained on a folder reads them.
    tok = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    assert len(tok) == 49408, f"expected SD's 49,408-token CLIP vocabulary, got {len(tok)}"
    return tok


def compact_tokenizer(folder: Path) -> None:
    """Replace ``tokenizer.json`` (3.6 MB) by the same BPE as ``vocab.json`` + ``merges.txt`` (1.5 MB),
    which ``CLIPTokenizer.from_pretrained`` reads to the same ids; it keeps the model folder < 20 MB."""
    fast = folder / "tokenizer.json"
    model = json.loads(fast.read_text())["model"]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False))
    merges = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    fast.unlink()
