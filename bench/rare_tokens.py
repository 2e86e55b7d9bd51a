"""How many rare tokens ``engine.rare_tokens`` finds in a real CLIP vocabulary, and how many the
bot keeps (``bot.core.tokens.usable_vocabulary_tokens``).

SOURCE is a folder holding a CLIP tokenizer (``vocab.json`` + ``merges.txt``, such as an SD 1.x
or SDXL model's ``tokenizer/``), or openai/CLIP's ``clip/bpe_simple_vocab_16e6.txt.gz``, which
is rebuilt into a temporary folder the way CLIP's ``simple_tokenizer.py`` builds its vocabulary
(the tokenizer SD 1.x and SDXL use: 49,408 entries). Nothing is downloaded; the CLIP files are
never copied into this repository. For example:

    git clone --depth 1 https://github.com/openai/CLIP ../CLIP
    python bench/rare_tokens.py ../CLIP/clip/bpe_simple_vocab_16e6.txt.gz \\
        --source-label "openai/CLIP@<commit>"
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's engine/bot

from transformers import CLIPTokenizer

from bench.machine import library_versions, today
from bench.results import Row, append_results, format_table
from bot.core.tokens import usable_vocabulary_tokens
from engine.rare_tokens import RARE_FROM, rare_tokens
from engine.tiny import byte_level_tokens, write_bpe_files

CLIP_VOCAB_SIZE = 49408
CLIP_MERGES = CLIP_VOCAB_SIZE - 256 - 256 - 2
"""openai/CLIP keeps the first 49152 - 256 - 2 merges of its BPE file (simple_tokenizer.py)."""
ANCHOR_PROMPT = "a photo of sks dog"
ANCHOR_IDS = [49406, 320, 1125, 539, 48136, 1929, 49407]
"""The prompt's ids from openai/CLIP's own ``SimpleTokenizer`` (with start and end tokens)."""
COLUMNS = ["rule", "words", "after the bot's filters", "dropped", "sample of those kept"]


class Rule(NamedTuple):
    name: str
    lengths: tuple[int, ...]
    rare_from: float


RULES = (
    Rule(f"engine default: 3 letters, ids ≥ {RARE_FROM:g} of the vocabulary", (3,), RARE_FROM),
    Rule("3 letters, ids ≥ 0.75 of the vocabulary", (3,), 0.75),
    Rule(f"4 letters, ids ≥ {RARE_FROM:g}", (4,), RARE_FROM),
    Rule(f"2 letters, ids ≥ {RARE_FROM:g}", (2,), RARE_FROM),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path, help="tokenizer folder or CLIP's bpe .txt.gz")
    parser.add_argument(
        "--source-label", help="how RESULTS.md names the source (default: file name + sha256)"
    )
    parser.add_argument("--sample", type=int, default=12, help="words shown per rule")
    parser.add_argument(
        "--list", action="store_true", help="also print every word of the default rule"
    )
    parser.add_argument("--no-results", action="store_true", help="print only, append nothing")
    return parser.parse_args(argv)


def write_clip_tokenizer(bpe_gz: Path, folder: Path) -> None:
    """Write ``vocab.json`` and ``merges.txt`` for ``transformers.CLIPTokenizer`` from CLIP's
    BPE file, as ``simple_tokenizer.py`` builds its vocabulary: each byte's character, the same
    with ``</w>``, the first :data:`CLIP_MERGES` merges joined, then the two specials."""
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]  # the first line is a version header
    tokens = [*byte_level_tokens(), *("".join(m.split()) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    write_bpe_files(folder, {token: i for i, token in enumerate(tokens)}, merges)


def load_tokenizer(source: Path, scratch: Path) -> Any:
    """A CLIPTokenizer from a tokenizer folder, or rebuilt from CLIP's BPE file (checked
    against ids openai/CLIP's own tokenizer gives)."""
    if source.is_dir():
        return CLIPTokenizer.from_pretrained(str(source))
    write_clip_tokenizer(source, scratch)
    tokenizer = CLIPTokenizer.from_pretrained(str(scratch))
    ids = tokenizer(ANCHOR_PROMPT).input_ids
    if len(tokenizer) != CLIP_VOCAB_SIZE or ids != ANCHOR_IDS:
        raise SystemExit(
            f"{source} does not rebuild CLIP's tokenizer: {len(tokenizer)} entries, "
            f"{ANCHOR_PROMPT!r} → {ids} (CLIP: {CLIP_VOCAB_SIZE}, {ANCHOR_IDS})"
        )
    return tokenizer


def spread(words: list[str], count: int) -> list[str]:
    """``count`` words evenly spaced through ``words`` (vocabulary order), so a sample shows
    the early and the late end alike."""
    if len(words) <= count:
        return words
    return [words[i * len(words) // count] for i in range(count)]


def measure(tokenizer: Any, sample: int) -> tuple[list[Row], list[str], list[str]]:
    """One row per rule; and the default rule's kept and dropped words."""
    rows: list[Row] = []
    kept_default: list[str] = []
    dropped_default: list[str] = []
    for rule in RULES:
        words = rare_tokens([tokenizer], lengths=rule.lengths, rare_from=rule.rare_from)
        kept = usable_vocabulary_tokens(json.dumps(words))
        rows.append(
            {
                COLUMNS[0]: rule.name,
                COLUMNS[1]: len(words),
                COLUMNS[2]: len(kept),
                COLUMNS[3]: len(words) - len(kept),
                COLUMNS[4]: " ".join(spread(kept, sample)),
            }
        )
        if rule is RULES[0]:
            kept_default = kept
            dropped_default = sorted(set(words) - set(kept), key=words.index)
    return rows, kept_default, dropped_default


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    digest = hashlib.sha256(
        args.source.read_bytes()
        if args.source.is_file()
        else (args.source / "vocab.json").read_bytes()
    ).hexdigest()
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = load_tokenizer(args.source, Path(scratch))
        rows, kept, dropped = measure(tokenizer, args.sample)
        anchor = tokenizer(ANCHOR_PROMPT).input_ids
    label = args.source_label or f"{args.source.name} (sha256 {digest[:12]})"
    versions = library_versions()
    context = [
        f"source: {label}; {len(tokenizer)} vocabulary entries; {ANCHOR_PROMPT!r} → {anchor}",
        f"versions: python {versions['python']}, transformers {versions['transformers']}",
        "rule: engine.rare_tokens.rare_tokens (whole words, lower-case ASCII, no vowels or y, "
        "one token); filters: bot.core.tokens.usable_vocabulary_tokens",
    ]
    notes = [f"dropped by the bot's filters (default rule): {' '.join(dropped)}"]
    print("\n".join(context), end="\n\n")
    print(format_table(COLUMNS, rows), end="\n\n")
    print(notes[0])
    if args.list:
        print(f"\nkept (default rule, vocabulary order): {' '.join(kept)}")
    if not args.no_results:
        append_results(f"rare tokens, {label} — {today()}", context, COLUMNS, rows, notes)


if __name__ == "__main__":
    main()
