"""``dsv3 prepare``: tokenize a corpus once, with N worker processes, into a directory every rank reads.

    dsv3 prepare my_corpus/ --output prepared/my_corpus --workers 16      # train a BPE on a sample
    dsv3 prepare my_corpus/ --output prepared/my_corpus --tokenizer hf_checkpoint_dir/
    dsv3 prepare --output prepared/stdlib                                 # the standard library
    dsv3 prepare --verify prepared/my_corpus                              # read every shard's checksum
    dsv3 fit --config configs/tiny.yaml --data.data_path prepared/my_corpus

Rerunning the same command after a kill resumes it (finished work units are kept); rerunning it on a
finished directory returns at once. The split and shard options must then be the ones the training
config would use only for raw corpora: a prepared directory carries its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dsv3_lightning.data.prepare import PrepareSettings, prepare_corpus
from dsv3_lightning.data.store import open_prepared, verify_checksums
from dsv3_lightning.tokenizer import load_tokenizer


def _parser() -> argparse.ArgumentParser:
    defaults = PrepareSettings()
    p = argparse.ArgumentParser(prog="dsv3 prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_path", nargs="?", default=None, help="corpus file or directory (default: the standard library)")
    p.add_argument("--output", type=Path, help="the prepared directory to write (resumed when unfinished)")
    p.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json, or a directory holding one (a HF checkpoint)")
    p.add_argument("--vocab_size", type=int, default=defaults.vocab_size, help="BPE vocabulary when training one")
    p.add_argument("--tokenizer_sample_bytes", type=int, default=defaults.tokenizer_sample_bytes)
    p.add_argument("--val_fraction", type=float, default=defaults.val_fraction)
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the document split")
    p.add_argument("--shard_tokens", type=int, default=defaults.shard_tokens)
    p.add_argument("--max_corpus_bytes", type=int, default=None)
    p.add_argument("--verify", type=Path, default=None, metavar="DIR", help="check a prepared directory's checksums")
    return p


def main(argv: list[str]) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.verify is not None:
        start = time.perf_counter()
        read = verify_checksums(open_prepared(args.verify))
        print(f"{args.verify}: every shard matches index.json ({read / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s)")
        return
    if args.output is None:
        raise SystemExit("dsv3 prepare: give --output DIR (where the shards and index.json go), or --verify DIR")
    tokenizer = None
    if args.tokenizer is not None:
        path = Path(args.tokenizer).expanduser()
        tokenizer = load_tokenizer(path / "tokenizer.json" if path.is_dir() else path)
    settings = PrepareSettings(
        data_path=args.data_path, max_corpus_bytes=args.max_corpus_bytes, val_fraction=args.val_fraction,
        seed=args.seed, vocab_size=args.vocab_size, tokenizer_sample_bytes=args.tokenizer_sample_bytes,
        shard_tokens=args.shard_tokens,
    )  # fmt: skip
    start = time.perf_counter()
    index = prepare_corpus(settings, args.output, workers=args.workers, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    tokens = sum(index["splits"][s]["tokens"] for s in ("train", "val"))
    stats = index.get("stats", {})
    rate = stats.get("tokens_this_run", 0) / max(stats.get("seconds", 0.0), 1e-9)
    print(
        f"{args.output}: {tokens / 1e6:.2f}M tokens ({index['splits']['train']['tokens'] / 1e6:.2f}M train), "
        f"{sum(len(index['splits'][s]['shards']) for s in ('train', 'val'))} shards, {seconds:.1f} s"
        + (f", {rate:,.0f} tokens/s tokenizing with {args.workers} worker(s)" if rate else "")
    )
